"""Benchmark: a Deployment of idle pods under a real kubelet and API server, crishim vs containerd.

One control plane on loopback (``tests/rig/cluster.py``) and one node, ``localhost``, whose
kubelet is restarted on the other runtime between rounds; only one runtime and one kubelet
run at a time. Rounds alternate (crishim, containerd, containerd, crishim, ...). Each round:

1. start the runtime (private root, state, socket, own bridge and subnet), pull the images
   through the CRI (no pull is timed), start kubelet on it and wait until the node is Ready;
2. create a Deployment of ``--replicas`` idle busybox pods and time until all are Ready
   (a watch on the pods: the time of the event that made the last one Ready);
3. steady state with them up: CPU of the runtime with its per-pod helpers (conmons; shims)
   and of kubelet over ``--steady`` seconds, as a share of one core; PSS and RSS of the
   runtime with its helpers at the end;
4. delete the Deployment and time until the API has no pod left, and until the runtime has
   no ready sandbox nor running container; then stop kubelet, remove the stopped sandboxes
   through the CRI (kubelet's own GC would, a minute later), check that nothing is left and
   stop the runtime.

It prints each round, then medians and the ratios crishim / containerd. Only ratios in one
run mean anything on this machine. ``--profile DIR`` records crishim with py-spy during
step 2 of its rounds and prints the functions most often on top of the stack.

It starts pods for several minutes: run it under the pod lock, which it then holds for up
to about 20 minutes with the defaults:
``flock /tmp/crishim-podrig.lock python -m tests.bench.bench_deployment [--rounds 2]``.
Needs the control-plane binaries (``CRISHIM_TEST_KUBE_BIN_DIR`` or the single variables of
``tests/rig/cluster.py``) and containerd; says so and exits when they are missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.bench.bench_steady import cpu_seconds
from tests.bench.runtimes import Containerd, Crishim, Images, pids_whose_cmdline_has, push_images
from tests.cluster.node import ClusterNode
from tests.rig.cluster import ControlPlane, Pod, deployment, kube_binaries, pod_ready
from tests.rig.registry import Registry

NAMESPACE = "default"
NAME = "idle"
SELECTOR = f"app={NAME}"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
READY_TIMEOUT = 300.0


@dataclass
class Round:
    runtime: str
    ready_s: float = 0.0
    create_cpu_s: float = 0.0  # CPU seconds of the runtime and its helpers until all Ready
    gone_s: float = 0.0
    idle_s: float = 0.0
    restarts: int = 0
    runtime_cpu: float = 0.0  # % of one core, runtime and helpers
    kubelet_cpu: float = 0.0
    pss_mib: float = 0.0
    rss_mib: float = 0.0
    helpers: int = 0
    left: list[str] = field(default_factory=list)
    calls: str = ""

    def line(self) -> str:
        left = f"; LEFT {self.left}" if self.left else ""
        return (
            f"{self.runtime:<10} ready {self.ready_s:6.2f} s (runtime CPU "
            f"{self.create_cpu_s:5.2f} s)  deleted {self.gone_s:6.2f} s  "
            f"runtime idle {self.idle_s:6.2f} s  restarts {self.restarts}  | steady: runtime "
            f"{self.runtime_cpu:4.1f} % of a core, kubelet {self.kubelet_cpu:4.1f} %, "
            f"PSS {self.pss_mib:6.1f} MiB, RSS {self.rss_mib:6.1f} MiB "
            f"({self.helpers} helpers){left}" + (f"\n{self.calls}" if self.calls else "")
        )


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process, from smaps_rollup (0, 0 once it is gone)."""
    found = {"Pss:": 0, "Rss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":", 1)[0] + ":"
            if key in found:
                found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["Pss:"], found["Rss:"]


def runtime_pids(node: ClusterNode) -> list[int]:
    """The runtime's own pid and its per-pod helpers' (conmons; containerd's shims)."""
    runtime = node.runtime
    if isinstance(runtime, Crishim):
        assert runtime.proc.proc is not None
        own = runtime.proc.proc.pid
        return [own, *pids_whose_cmdline_has(str(runtime.proc.state), "conmon")]
    assert runtime.proc is not None
    return [runtime.proc.pid, *pids_whose_cmdline_has(str(runtime.base), "containerd-shim")]


def steady(node: ClusterNode, seconds: float, result: Round) -> None:
    """CPU over ``seconds`` and memory at the end, with the pods up."""
    pids = runtime_pids(node)
    assert node.kubelet.proc is not None
    kubelet = node.kubelet.proc.pid
    before = sum(cpu_seconds(p) for p in pids), cpu_seconds(kubelet)
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    result.runtime_cpu = (sum(cpu_seconds(p) for p in pids) - before[0]) / elapsed * 100
    result.kubelet_cpu = (cpu_seconds(kubelet) - before[1]) / elapsed * 100
    memory = [memory_kib(p) for p in pids]
    result.pss_mib = sum(m[0] for m in memory) / 1024
    result.rss_mib = sum(m[1] for m in memory) / 1024
    result.helpers = len(pids) - 1


class Profiler:
    """py-spy recording one process into raw (collapsed) stacks."""

    def __init__(self, py_spy: str, pid: int, output: Path) -> None:
        self.output = output
        self.proc = subprocess.Popen(
            [py_spy, "record", "-p", str(pid), "-o", str(output), "--format", "raw",
             "-r", "200", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def top_entries(raw: Path, count: int = 15) -> list[str]:
    """The functions most often on top of the stack (self) and on it at all (total)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = stack.split(";")
        samples += int(number)
        own[frames[-1]] += int(number)
        for frame in set(frames):
            total[frame] += int(number)
    if samples == 0:
        return ["(no samples)"]
    lines = [f"{samples} samples; self:"]
    lines += [f"  {n / samples * 100:5.1f} %  {f}" for f, n in own.most_common(count)]
    lines.append("total (on the stack):")
    lines += [f"  {n / samples * 100:5.1f} %  {f}" for f, n in total.most_common(count)]
    return lines


Calls = dict[str, tuple[int, float]]
METRIC = "crishim_cri_request_duration_seconds"


def crishim_calls(runtime: Crishim) -> Calls:
    """crishim's CRI calls so far from its /metrics: method -> (count, seconds in all)."""
    marker = "serving metrics on "
    lines = [line for line in runtime.proc.log().splitlines() if marker in line]
    if not lines:
        return {}
    url = lines[-1].split(marker, 1)[1].strip()
    calls: dict[str, list[float]] = {}
    for line in httpx.get(url, timeout=10, trust_env=False).text.splitlines():
        if not line.startswith((f"{METRIC}_sum{{", f"{METRIC}_count{{")):
            continue
        labels, value = line.rsplit(" ", 1)
        method = labels.split('method="', 1)[1].split('"', 1)[0]
        entry = calls.setdefault(method, [0.0, 0.0])
        entry[0 if labels.startswith(f"{METRIC}_count") else 1] = float(value)
    return {method: (int(count), total) for method, (count, total) in calls.items()}


def calls_between(before: Calls, after: Calls, count: int = 8) -> str:
    """The CRI methods crishim spent most time in between two readings."""
    spent = {
        method: (n - before.get(method, (0, 0.0))[0], total - before.get(method, (0, 0.0))[1])
        for method, (n, total) in after.items()
    }
    top = sorted(spent.items(), key=lambda item: item[1][1], reverse=True)[:count]
    return "  crishim CRI calls while creating: " + ", ".join(
        f"{method} {n}x {total:.2f} s" for method, (n, total) in top if n
    )


def one_round(
    plane: ControlPlane,
    node: ClusterNode,
    images: Images,
    args: argparse.Namespace,
    profile: Path | None,
) -> Round:
    result = Round(node.name)
    node.start()
    try:
        profiler = None
        if profile is not None and isinstance(node.runtime, Crishim):
            assert node.runtime.proc.proc is not None
            profiler = Profiler(args.py_spy, node.runtime.proc.proc.pid, profile)
        calls_before = crishim_calls(node.runtime) if isinstance(node.runtime, Crishim) else {}
        cpu_before = sum(cpu_seconds(p) for p in runtime_pids(node))
        since = plane.list_resource_version(PODS)
        manifest = deployment(NAME, args.replicas, images.busybox)
        started = time.monotonic()
        with plane.client() as client:
            client.post(DEPLOYMENTS, json=manifest).raise_for_status()

        replicas: int = args.replicas

        def all_ready(pods: dict[str, Pod]) -> bool:
            return sum(pod_ready(p) for p in pods.values()) >= replicas

        result.ready_s = plane.watch_pods(NAMESPACE, SELECTOR, all_ready, READY_TIMEOUT, since)
        result.ready_s -= started
        result.create_cpu_s = sum(cpu_seconds(p) for p in runtime_pids(node)) - cpu_before
        if profiler is not None:
            profiler.stop()
        if isinstance(node.runtime, Crishim):
            result.calls = calls_between(calls_before, crishim_calls(node.runtime))
        listed = plane.get(f"{PODS}?labelSelector={SELECTOR}")
        assert listed is not None
        result.restarts = sum(
            s.get("restartCount", 0)
            for p in listed["items"]
            for s in p["status"].get("containerStatuses", [])
        )
        time.sleep(args.settle)
        steady(node, args.steady, result)

        since = plane.list_resource_version(PODS)
        started = time.monotonic()
        with plane.client() as client:
            params = {"propagationPolicy": "Background"}
            client.delete(f"{DEPLOYMENTS}/{NAME}", params=params).raise_for_status()
        result.gone_s = plane.watch_pods(NAMESPACE, SELECTOR, lambda p: not p, 300, since)
        result.gone_s -= started
        deadline = time.monotonic() + 120
        while node.running():
            if time.monotonic() > deadline:
                result.left.append(f"still running after 120 s: {node.running()[:4]}")
                break
            time.sleep(0.2)
        result.idle_s = time.monotonic() - started
    finally:
        result.left += node.stop()
    return result


def summary(rounds: list[Round]) -> list[str]:
    by: dict[str, list[Round]] = {"crishim": [], "containerd": []}
    for item in rounds:
        by[item.runtime].append(item)
    metrics: dict[str, Callable[[Round], float]] = {
        "ready (s)": lambda r: r.ready_s,
        "CPU of runtime+helpers until ready (s)": lambda r: r.create_cpu_s,
        "deleted (s)": lambda r: r.gone_s,
        "runtime idle after delete (s)": lambda r: r.idle_s,
        "steady CPU runtime+helpers (% core)": lambda r: r.runtime_cpu,
        "steady CPU kubelet (% core)": lambda r: r.kubelet_cpu,
        "steady PSS runtime+helpers (MiB)": lambda r: r.pss_mib,
        "steady RSS runtime+helpers (MiB)": lambda r: r.rss_mib,
    }
    lines = [f"{'median':<38} {'crishim':>9} {'containerd':>11} {'ratio':>7}"]
    for label, metric in metrics.items():
        ours = statistics.median(metric(r) for r in by["crishim"])
        theirs = statistics.median(metric(r) for r in by["containerd"])
        ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
        lines.append(f"{label:<38} {ours:9.2f} {theirs:11.2f} {ratio}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Deployment benchmark under a real kubelet")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per runtime")
    parser.add_argument("--replicas", type=int, default=60)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of CPU measure")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before it")
    parser.add_argument("--profile", type=Path, help="py-spy crishim's create phase into DIR")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = parser.parse_args()
    binaries, why = kube_binaries()
    if why:
        print(f"bench_deployment: skipped: {why}")
        return
    if not Containerd.available():
        print("bench_deployment: skipped: containerd not found (Debian package containerd)")
        return
    if os.geteuid() != 0:
        print("bench_deployment: skipped: kubelet and pods need root")
        return
    print(
        f"bench_deployment: {args.rounds} rounds per runtime of {args.replicas} pods; it runs "
        "pods for up to ~20 min: hold the pod lock (flock /tmp/crishim-podrig.lock) for it",
        flush=True,
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with Registry() as registry, tempfile.TemporaryDirectory(prefix="crishim-bench-") as tmp:
        base = Path(tmp)
        images = push_images(registry)
        plane = ControlPlane(base / "plane", binaries)
        rounds: list[Round] = []
        started = time.monotonic()
        plane.start()
        print(f"control plane up in {time.monotonic() - started:.1f} s", flush=True)
        try:
            nodes = {
                "crishim": ClusterNode(
                    plane, Crishim(base / "rt"), base / "kubelet-crishim", (images.busybox,)
                ),
                "containerd": ClusterNode(
                    plane,
                    Containerd(base / "rt", registry.host, images.pause),
                    base / "kubelet-containerd",
                    (images.busybox, images.pause),
                ),
            }
            for index in range(args.rounds):
                order = ["crishim", "containerd"] if index % 2 == 0 else ["containerd", "crishim"]
                for name in order:
                    profile = None
                    if args.profile is not None and name == "crishim":
                        profile = args.profile / f"crishim-round{index + 1}.txt"
                    result = one_round(plane, nodes[name], images, args, profile)
                    rounds.append(result)
                    print(f"round {index + 1}: {result.line()}", flush=True)
                    if profile is not None and profile.exists():
                        print("\n".join(top_entries(profile)), flush=True)
        finally:
            plane.stop()
    for line in summary(rounds):
        print(line)
    if any(r.left for r in rounds):
        sys.exit("bench_deployment: something was left behind (see LEFT above)")


if __name__ == "__main__":
    main()

"""Faults around a pod that shares one PID namespace (root): its infra process (catatonit
under conmon) and its CNI network are set up, and torn down, at the same time. Whichever
fails, what the other made is undone; a stopped pod is removed without the runtime; and a
crishim killed with the pod half made sweeps it at its restart, also when runc had lost
the infra container. Pods are on a CNI network of loopback and fake plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from crishim.api import v1
from tests.rig.faults import (
    CNI_BIN,
    NETWORK,
    Binaries,
    binaries_fixture,  # noqa: F401 - the module-scoped fixture ``binaries``
    faulty_fixture,  # noqa: F401 - the per-test fixture ``faulty``
    require_host_tools,
    run_pod_error,
    script,
    start_rig,
    stop_rig,
)
from tests.rig.fixtures import PushedImage
from tests.rig.host import cgroups_of, conmons_of
from tests.rig.pods import PodRig

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

SHARED_PID = v1.NamespaceMode.POD


def recording_plugin(path: Path, calls: Path) -> None:
    """A CNI plugin that succeeds with an empty result and writes each command to ``calls``
    (a new file)."""
    calls.unlink(missing_ok=True)
    script(
        path,
        f'echo "$CNI_COMMAND" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then echo \'{"cniVersion": "1.0.0"}\'; fi\n',
    )


async def test_a_shared_pid_pod_whose_network_fails_has_its_infra_process_undone(
    faulty: Binaries,
) -> None:
    calls = faulty.bin_dir / "ft-slow-fail.calls"
    runc_root = faulty.rig.proc.state / "runtimes" / "runc"
    # ADD waits until the infra process, started alongside it, is known to runc; then fails.
    script(
        faulty.bin_dir / "ft-slow-fail",
        f'echo "$CNI_COMMAND" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        "  for i in $(seq 200); do\n"
        f'    if [ -e "{runc_root}/$CNI_CONTAINERID/state.json" ]; then\n'
        f"      echo infra-created >> {calls}; break\n"
        "    fi\n"
        "    sleep 0.05\n"
        "  done\n"
        '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "no addresses left"}\'\n'
        "  exit 1\n"
        "fi\n",
    )
    faulty.write_conflist("ft-slow-fail")
    error = await run_pod_error(faulty.rig, "slow-fail", pid=SHARED_PID)
    assert error.status is Status.UNAVAILABLE
    assert error.message == (
        f"CNI plugin ft-slow-fail (ADD) of network {NETWORK} failed: no addresses left"
    )
    assert calls.read_text().split() == ["ADD", "infra-created", "DEL"]
    # The infra process, its conmon and runc's state are gone (the fixture's check).


async def test_a_shared_pid_pod_whose_infra_process_fails_has_its_network_undone(
    faulty: Binaries,
) -> None:
    calls = faulty.bin_dir / "ft-record.calls"
    recording_plugin(faulty.bin_dir / "ft-record", calls)
    faulty.write_conflist("ft-record")
    faulty.conmon.unlink()
    script(faulty.conmon, 'echo "conmon: broken on purpose" >&2\nexit 1\n')
    error = await run_pod_error(faulty.rig, "bad-infra", pid=SHARED_PID)
    assert error.status is Status.INTERNAL
    assert (error.message or "").endswith(" exited with status 1: conmon: broken on purpose")
    # The ADD that ran alongside was finished, then undone.
    assert calls.read_text().split() == ["ADD", "DEL"]


def command(runtime_call: str) -> str:
    """A runtime call without crishim's global options (``--root R --log-format json``)."""
    return runtime_call.split(" --log-format json ", 1)[1]


async def test_a_stopped_shared_pid_pod_is_removed_without_the_runtime(faulty: Binaries) -> None:
    rig = faulty.rig
    calls = faulty.bin_dir / "ft-record.calls"
    recording_plugin(faulty.bin_dir / "ft-record", calls)
    faulty.write_conflist("ft-record")
    config = rig.sandbox_config("counted", pid=SHARED_PID)
    reply = await rig.runtime.run_pod_sandbox(
        v1.RunPodSandboxRequest(config=config, runtime_handler="counted")
    )
    pod = reply.pod_sandbox_id
    assert calls.read_text().split() == ["ADD"]
    started = faulty.runtime_calls.read_text().splitlines()
    assert [command(line) for line in started if " start " in line] == [f"start {pod}"]
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    # The infra process is killed and deleted, and the network torn down, once.
    stopped = faulty.runtime_calls.read_text().splitlines()[len(started) :]
    assert [command(line) for line in stopped] == [f"kill {pod} 9", f"delete --force {pod}"]
    assert calls.read_text().split() == ["ADD", "DEL"]
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert faulty.runtime_calls.read_text().splitlines()[len(started) :] == stopped
    assert calls.read_text().split() == ["ADD", "DEL"]


@pytest_asyncio.fixture(name="plain", loop_scope="module")
async def plain_fixture(
    tmp_path: Path, busybox_pushed: PushedImage
) -> AsyncIterator[tuple[PodRig, Path]]:
    """crishim with only runc (the module's "bad" runtime would fail every recovery
    delete, and recovery keeps what it could not delete for the next start), CNI plugins
    searched in a directory of the test's own first; nothing may be left afterwards."""
    require_host_tools()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    config = f'[cni]\nbin_dirs = ["{bin_dir}", "{CNI_BIN}"]\n'
    rig = await start_rig(tmp_path / "crishim", config, busybox_pushed.ref)
    try:
        yield rig, bin_dir
        await asyncio.wait_for(rig.remove_all_pods(), 60)
        await rig.assert_nothing_left()
    finally:
        await stop_rig(rig)


def gone(pid: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (PID 1 here reaps no orphans) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    return check


@pytest.mark.parametrize("runc_state", ["kept", "lost"])
async def test_a_shared_pid_pod_cut_short_by_sigkill_is_swept_at_the_restart(
    plain: tuple[PodRig, Path], runc_state: str
) -> None:
    rig, bin_dir = plain
    calls = bin_dir / "ft-hold.calls"
    release = bin_dir / "ft-hold.release"
    runc_root = rig.proc.state / "runtimes" / "runc"
    # ADD holds the run once runc knows the infra container, until the test releases it.
    script(
        bin_dir / "ft-hold",
        f'echo "$CNI_COMMAND $CNI_CONTAINERID" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        "  for i in $(seq 200); do\n"
        f'    [ -e "{runc_root}/$CNI_CONTAINERID/state.json" ] && break\n'
        "    sleep 0.05\n"
        "  done\n"
        f"  echo infra-created >> {calls}\n"
        f'  for i in $(seq 600); do [ -e "{release}" ] && break; sleep 0.05; done\n'
        '  echo \'{"cniVersion": "1.0.0"}\'\n'
        "fi\n",
    )
    conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{"type": "ft-hold"}]}
    (rig.proc.cni_conf_dir / "10-hold.conflist").write_text(json.dumps(conflist))
    config = rig.sandbox_config("cut-short", pid=SHARED_PID)
    run = asyncio.ensure_future(rig.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config)))

    async def infra_created() -> bool:
        return calls.exists() and "infra-created" in calls.read_text()

    await rig.until(infra_created, "the infra container, while the ADD is held", timeout=15)
    pod = calls.read_text().split()[1]
    rig.created.add(pod)  # its cgroups are among what must not be left
    assert conmons_of(rig.proc), "the infra process has no conmon"
    # crishim dies with the pod half made: no record, an infra process under conmon, its
    # cgroup, runc's state, namespace pins and a CNI cache entry.
    rig.close()
    rig.proc.kill()
    if runc_state == "lost":
        # As if runc had been killed inside its create: the process is gone and runc knows
        # nothing, but the cgroup runc made for it is still there.
        init_pid = json.loads((runc_root / pod / "state.json").read_text())["init_process_pid"]
        for pid in [*conmons_of(rig.proc), init_pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await rig.until(gone(init_pid), "the infra process to die")
        shutil.rmtree(runc_root / pod)
        assert cgroups_of({pod}), "no cgroup of the infra process to leave behind"
    await asyncio.to_thread(rig.proc.start)
    rig.connect()
    release.touch()
    with pytest.raises(StreamTerminatedError):  # the call died with its connection
        await asyncio.wait_for(run, 5)
    # The restart swept all of it (the fixture checks everything), the network by a DEL.
    assert (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items == []
    assert calls.read_text().split()[-2:] == ["DEL", pod]
    await rig.assert_nothing_left()
    assert "removed 1 half-made or half-removed pod(s)" in rig.proc.log()

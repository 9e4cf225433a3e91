"""Static pod manifests of the kubelet suite (plain dicts, written as JSON)."""

from __future__ import annotations

from typing import Any

NAMESPACE = "crishim-kl"
WEB_PORT = 8080
WEB_TEXT = "written-by-the-init-container"
SHELL_GREETING = "hello-from-the-shell-container"
CRASH_EXIT_CODE = 3


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    spec = {"terminationGracePeriodSeconds": 2, **spec}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def _container(name: str, image: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        **extra,
    }


def _every_second(check: dict[str, Any]) -> dict[str, Any]:
    # An exec probe is an ExecSync (runc exec): on a busy two-CPU machine it can take more
    # than kubelet's default second, which would count as a failure.
    return {**check, "periodSeconds": 1, "timeoutSeconds": 5, "failureThreshold": 3}


def web_pod(image: str) -> dict[str, Any]:
    """An init container writes a page into an emptyDir; busybox httpd serves it (with an
    HTTP readiness probe on the pod IP), a second container has exec liveness and
    readiness probes, a third just sleeps."""
    shared = [{"name": "shared", "mountPath": "/shared"}]
    return _pod(
        "web",
        {
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [
                _container(
                    "init",
                    image,
                    ["sh", "-c", f"echo {WEB_TEXT} > /shared/index.html"],
                    volumeMounts=shared,
                )
            ],
            "containers": [
                _container(
                    "web",
                    image,
                    ["busybox", "httpd", "-f", "-p", str(WEB_PORT), "-h", "/shared"],
                    volumeMounts=shared,
                    ports=[{"containerPort": WEB_PORT}],
                    readinessProbe=_every_second(
                        {"httpGet": {"path": "/index.html", "port": WEB_PORT}}
                    ),
                ),
                _container(
                    "probed",
                    image,
                    ["sh", "-c", "touch /tmp/healthy; exec sleep 100000"],
                    livenessProbe=_every_second({"exec": {"command": ["cat", "/tmp/healthy"]}}),
                    readinessProbe=_every_second(
                        {"exec": {"command": ["test", "-f", "/tmp/healthy"]}}
                    ),
                ),
                _container("plain", image, ["sleep", "100000"]),
            ],
        },
    )


def crash_pod(image: str) -> dict[str, Any]:
    """A container that prints a line and exits with CRASH_EXIT_CODE, restarted always."""
    command = ["sh", "-c", f"echo crashing; exit {CRASH_EXIT_CODE}"]
    return _pod("crash", {"containers": [_container("crash", image, command)]})


def shell_pod(image: str, name: str = "shell") -> dict[str, Any]:
    """One long-running shell that greets once, then ticks every 200 ms."""
    script = f"echo {SHELL_GREETING}; while :; do sleep 0.2; done"
    return _pod(name, {"containers": [_container("shell", image, ["sh", "-c", script])]})

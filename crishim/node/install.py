"""``crishim node install`` and ``crishim node uninstall``: the steps in order, the record,
and the rollback of an install that fails half-way.

install    takes every step of :mod:`crishim.node.steps` in order. A step already in the
           record (an earlier install) is applied again with its recorded observations,
           so a second install changes nothing and an upgrade replaces only what changed;
           a new step is observed and recorded first. When a step fails, the steps this
           run started are undone in reverse order and the node is as it was.
uninstall  undoes every recorded step in reverse order, dropping each from the record
           as soon as it is undone: run again after a failure, it goes on where it stopped.

Both hold a lock on the node, so that two runs never interleave. Switching kubelet from
one runtime to the other removes the pods of the runtime it leaves (kubelet starts them
anew on the other; they would run twice). Run by a DaemonSet, the pod doing the work is
one of them: from a container, an install that still has kubelet to switch, and every
uninstall, are handed to a transient unit of the host's systemd that runs this image's
crishim in this container's mount namespace, and so lives on when the pod is removed.
kubelet then starts the DaemonSet's pod on the other runtime, where it finds the work done.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from crishim import __version__
from crishim.errors import CrishimError
from crishim.node.files import remove_tree
from crishim.node.kubelet_step import kubelet_on_crishim
from crishim.node.layout import (
    INSTALLED_MARKER,
    NODE_UNIT_NAME,
    OPT_DIR,
    RECORD_FILE,
    SAVED_DIR,
)
from crishim.node.record import InstallRecord, StepRecord
from crishim.node.steps import STEPS, Node, Step, missing_dirs, preflight

__all__ = ["InstallFailed", "install", "uninstall"]


#: seconds between looks at the host's unit a DaemonSet's run handed its work to
HAND_OFF_POLL = 1.0
#: how long that unit may take (it waits for kubelet and crishim, each up to two minutes)
HAND_OFF_TIMEOUT = 900.0


class InstallFailed(CrishimError):
    """A step failed; what was done in this run has been undone (or says what was not)."""


def _steps(node: Node) -> list[Step]:
    return [s for s in STEPS if node.from_rootfs or s.name != "rootfs"]


@contextmanager
def _node_lock(node: Node) -> Iterator[None]:
    """One install or uninstall at a time on a node (a DaemonSet's pod recreated by
    kubelet on the other runtime while the first one still works, a run by hand): an
    exclusive lock on the host's root directory, which every mount namespace shares and
    which leaves no file behind."""
    fd = os.open(node.host_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            node.say("waiting for the install or uninstall already running on this node")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _hand_off(node: Node, argv: list[str], done: Callable[[], bool]) -> None:
    """Run ``crishim node <argv>`` as the host's transient unit, in this container's mount
    namespace (this image's crishim, the host's root where this process sees it), and
    wait for it. For a DaemonSet's pod: switching kubelet removes the pods of the runtime
    it leaves, this one among them, and the work must go on without it."""
    while node.host.unit_active(NODE_UNIT_NAME):  # an earlier hand-off still at work
        time.sleep(HAND_OFF_POLL)
    if done():
        node.say("done already (by an earlier run)")
        return
    command = ["nsenter", f"--target={os.getpid()}", "--mount", "--", node.executable]
    command += ["node", *argv, "--host-root", str(node.host_root), "--on-host"]
    node.host.start_transient(NODE_UNIT_NAME, command)
    node.say(
        f"handed to the host's {NODE_UNIT_NAME} (journalctl -u {NODE_UNIT_NAME}); this "
        f"pod may be removed on the way, and kubelet starts it again"
    )
    deadline = time.monotonic() + HAND_OFF_TIMEOUT
    while node.host.unit_active(NODE_UNIT_NAME):
        if time.monotonic() > deadline:
            raise InstallFailed(f"{NODE_UNIT_NAME} still running after {HAND_OFF_TIMEOUT:g}s")
        time.sleep(HAND_OFF_POLL)
    if not done():
        raise InstallFailed(f"{NODE_UNIT_NAME} failed: journalctl -u {NODE_UNIT_NAME}")
    node.say(f"{NODE_UNIT_NAME} finished")


def _in_pod(node: Node) -> bool:
    return not node.on_host and node.host.in_container()


def install(node: Node, *, after_step: Callable[[str], None] | None = None) -> None:
    """Install crishim on the node (again). ``after_step`` is called with each step's name
    once it has been applied (tests inject failures there). From a container, an install
    that has kubelet still to switch is handed to the host (see :func:`_hand_off`)."""
    with _node_lock(node):
        if not (_in_pod(node) and _switches_kubelet(node)):
            _install(node, after_step)
            return
    argv = ["install", "--image-root", str(node.image_root)]
    _hand_off(node, argv, lambda: node.path(INSTALLED_MARKER).exists())


def _switches_kubelet(node: Node) -> bool:
    try:
        preflight(node)
        return not kubelet_on_crishim(node)
    except CrishimError:
        return False  # said by the install itself, which stops before any change


def _install(node: Node, after_step: Callable[[str], None] | None) -> None:
    record_path = node.path(RECORD_FILE)
    record = InstallRecord.load(record_path)
    try:
        preflight(node)
    except CrishimError as exc:
        raise InstallFailed(f"install not started: {exc}") from exc
    if record is None:
        record = InstallRecord(
            crishim_version=__version__, created_dirs=missing_dirs(node, OPT_DIR)
        )
    node.path(OPT_DIR).mkdir(parents=True, exist_ok=True)
    record.crishim_version = __version__
    started: list[StepRecord] = []
    node.say(f"installing crishim {__version__} on {node.host_root}")
    try:
        for step in _steps(node):
            entry = record.step(step.name)
            if entry is None or not entry.done:
                if entry is None:
                    entry = StepRecord(name=step.name, data=step.observe(node))
                    record.steps.append(entry)
                started.append(entry)
                record.complete = False
                record.save(record_path)
            node.say(f"  {step.name}: {step.apply(node, entry.data)}")
            if after_step is not None:
                after_step(step.name)
            entry.done = True
            record.save(record_path)
    except Exception as exc:
        node.say(f"  FAILED: {exc}")
        _roll_back(node, record, started)
        raise InstallFailed(f"install failed, node rolled back: {exc}") from exc
    record.complete = True
    record.save(record_path)
    node.path(INSTALLED_MARKER).write_text(f"{__version__}\n")
    node.say("crishim installed")


def _roll_back(node: Node, record: InstallRecord, started: list[StepRecord]) -> None:
    node.say("rolling back")
    steps = {s.name: s for s in STEPS}
    for entry in reversed(started):
        try:
            node.say(f"  {entry.name}: {steps[entry.name].undo(node, entry.data, purge=True)}")
        except Exception as exc:
            node.say(f"  {entry.name}: could not undo: {exc}")
            record.save(node.path(RECORD_FILE))
            raise InstallFailed(
                f"rollback stopped at {entry.name}: {exc}; `crishim node uninstall` "
                f"goes on from there"
            ) from exc
        record.steps.remove(entry)
        record.save(node.path(RECORD_FILE))
    if not record.steps:
        _drop_record(node, record)


def uninstall(node: Node, *, purge: bool = False) -> None:
    """Undo every recorded install step; with ``purge`` also remove /var/lib/crishim when
    the install created it. From a container, handed to the host (see :func:`_hand_off`):
    it removes crishim's pods, this one among them."""
    with _node_lock(node):
        record = InstallRecord.load(node.path(RECORD_FILE))
        if record is None:
            node.say(f"crishim is not installed on {node.host_root} (no {RECORD_FILE})")
            return
        if not _in_pod(node):
            _uninstall(node, record, purge=purge)
            return
    argv = ["uninstall", *(["--purge"] if purge else [])]
    _hand_off(node, argv, lambda: not node.path(RECORD_FILE).exists())


def _uninstall(node: Node, record: InstallRecord, *, purge: bool) -> None:
    record_path = node.path(RECORD_FILE)
    node.say(f"uninstalling crishim from {node.host_root}")
    node.path(INSTALLED_MARKER).unlink(missing_ok=True)
    record.complete = False
    steps = {s.name: s for s in STEPS}
    for entry in reversed(list(record.steps)):
        node.say(f"  {entry.name}: {steps[entry.name].undo(node, entry.data, purge=purge)}")
        record.steps.remove(entry)
        record.save(record_path)
    _drop_record(node, record)
    node.say("crishim uninstalled")


def _drop_record(node: Node, record: InstallRecord) -> None:
    remove_tree(node.path(SAVED_DIR))
    node.path(INSTALLED_MARKER).unlink(missing_ok=True)
    node.path(RECORD_FILE).unlink(missing_ok=True)
    for directory in reversed(record.created_dirs):
        path = node.path(directory)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()

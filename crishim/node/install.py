"""``crishim node install`` and ``crishim node uninstall``: the steps in order, the record,
and the rollback of an install that fails half-way.

install    takes every step of :mod:`crishim.node.steps` in order. A step already in the
           record (an earlier install) is applied again with its recorded observations,
           so a second install changes nothing and an upgrade replaces only what changed;
           a new step is observed and recorded first. When a step fails, the steps this
           run started are undone in reverse order and the node is as it was.
uninstall  undoes every recorded step in reverse order, dropping each from the record
           as soon as it is undone: run again after a failure, it goes on where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from crishim import __version__
from crishim.errors import CrishimError
from crishim.node.files import remove_tree
from crishim.node.layout import INSTALLED_MARKER, OPT_DIR, RECORD_FILE, SAVED_DIR
from crishim.node.record import InstallRecord, StepRecord
from crishim.node.steps import STEPS, Node, Step, missing_dirs, preflight

__all__ = ["InstallFailed", "install", "uninstall"]


class InstallFailed(CrishimError):
    """A step failed; what was done in this run has been undone (or says what was not)."""


def _steps(node: Node) -> list[Step]:
    return [s for s in STEPS if node.from_rootfs or s.name != "rootfs"]


def install(node: Node, *, after_step: Callable[[str], None] | None = None) -> None:
    """Install crishim on the node (again). ``after_step`` is called with each step's name
    once it has been applied (tests inject failures there)."""
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
    the install created it."""
    record_path = node.path(RECORD_FILE)
    record = InstallRecord.load(record_path)
    if record is None:
        node.say(f"crishim is not installed on {node.host_root} (no {RECORD_FILE})")
        return
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

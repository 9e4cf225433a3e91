"""The installer's record of what it did on a host: ``/opt/crishim/install.json``.

Each step is written down before it changes anything, with what it saw beforehand (the
kubelet endpoint it replaces, whether a directory existed), and marked done after. Undoing
a step needs nothing but its entry, so an uninstall, or the rollback of an install that
stopped half-way (even one killed with the node), reverses exactly what was done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from crishim.errors import FailedPrecondition
from crishim.node.files import write_atomic

__all__ = ["InstallRecord", "StepRecord"]


class StepRecord(BaseModel):
    """One step: its name, whether it finished, and what undoing it needs."""

    name: str
    done: bool = False
    data: dict[str, Any] = {}


class InstallRecord(BaseModel):
    """Every step an install took, in order."""

    format: Literal[1] = 1
    crishim_version: str
    #: directories made for the record (``/opt/crishim``, maybe ``/opt``), outermost first
    created_dirs: list[str]
    complete: bool = False
    steps: list[StepRecord] = []

    def step(self, name: str) -> StepRecord | None:
        """The entry of step ``name``; None when it has not been taken."""
        return next((s for s in self.steps if s.name == name), None)

    @classmethod
    def load(cls, path: Path) -> InstallRecord | None:
        """The record in ``path``; None when there is none."""
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, ValidationError) as exc:
            raise FailedPrecondition(
                f"{path}: not a record of crishim node install: {exc}"
            ) from exc

    def save(self, path: Path) -> None:
        """Write the record (atomically)."""
        write_atomic(path, (self.model_dump_json(indent=2) + "\n").encode())

"""The base of every durable record: an id and a revision."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """An immutable snapshot of an object; each change makes a new one, revision + 1."""

    model_config = ConfigDict(frozen=True)

    id: str
    revision: int = 0

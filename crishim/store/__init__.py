"""Durable records of crishim's objects: atomic versioned JSON files and dumb keyed stores."""

from crishim.store.objects import ObjectStore
from crishim.store.records import RecordError, read_record, write_record

__all__ = ["ObjectStore", "RecordError", "read_record", "write_record"]

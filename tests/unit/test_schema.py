"""Our schema against upstream's, and the generated code against our schema."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
OURS = REPO / "protos"
REFERENCE = REPO.parent / "shared" / "reference" / "cri-api" / "api.proto"


def descriptor(include: Path, proto: Path) -> descriptor_pb2.FileDescriptorProto:
    with tempfile.TemporaryDirectory() as out:
        target = Path(out) / "set.pb"
        status = protoc.main(
            ["protoc", f"-I{include}", f"--descriptor_set_out={target}", str(proto)]
        )
        assert status == 0, f"protoc failed on {proto}"
        fds = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())
    (fd,) = fds.file
    return fd


def wire_contract(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Everything but the file's name, file-level options and comments."""
    contract = descriptor_pb2.FileDescriptorProto()
    contract.CopyFrom(fd)
    contract.ClearField("name")
    contract.ClearField("options")
    contract.ClearField("source_code_info")
    return contract


def test_our_schema_matches_cri_api_v0_36_3() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"reference schema not found at {REFERENCE} (it ships in the shared/ folder)")
    with tempfile.TemporaryDirectory() as scratch:
        # Compile the reference under the same path as ours so imports and names line up.
        ref_path = Path(scratch) / "runtime" / "v1" / "api.proto"
        ref_path.parent.mkdir(parents=True)
        ref_path.write_text(REFERENCE.read_text())
        reference = wire_contract(descriptor(Path(scratch), ref_path))
    ours = wire_contract(descriptor(OURS, OURS / "runtime" / "v1" / "api.proto"))
    assert ours.package == "runtime.v1"
    assert [s.name for s in ours.service] == ["RuntimeService", "ImageService"]
    if ours != reference:
        ours_names = {m.name for m in ours.message_type}
        ref_names = {m.name for m in reference.message_type}
        diff = {
            m.name
            for m in ours.message_type
            if m.name in ref_names
            and m != next(r for r in reference.message_type if r.name == m.name)
        }
        pytest.fail(
            f"wire contract differs: only ours {sorted(ours_names - ref_names)}, only "
            f"upstream {sorted(ref_names - ours_names)}, changed {sorted(diff)}; services or "
            "enums may differ too"
        )


def test_wire_contract_check_catches_a_renumbered_field() -> None:
    proto = (OURS / "runtime" / "v1" / "api.proto").read_text()
    changed = proto.replace("string runtime_name = 2;", "string runtime_name = 20;", 1)
    assert changed != proto, "fixture line not found in the schema"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "runtime" / "v1" / "api.proto"
        path.parent.mkdir(parents=True)
        path.write_text(changed)
        mutated = wire_contract(descriptor(Path(scratch), path))
    assert mutated != wire_contract(descriptor(OURS, OURS / "runtime" / "v1" / "api.proto"))


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(OURS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr

"""A CRI client we did not write: Google's protobuf and grpcio, compiled at run time.

Run as a separate process so that each schema gets its own descriptor pool:

    python -m tests.rig.grpcio_client PROTO_ROOT PROTO_FILE ENDPOINT SERVICE/RPC [REQUEST_JSON]

It compiles PROTO_ROOT/PROTO_FILE with grpcio-tools, calls one RPC (for example
``RuntimeService/Version``) on ENDPOINT (``unix:///path``) and prints the reply as JSON (proto field
names, defaults included) or ``{"error": {"code": ..., "details": ...}}``.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_tools import protoc


def compile_stubs(proto_root: Path, proto_file: str) -> tuple[ModuleType, ModuleType]:
    """Compile the schema into a scratch dir and import (messages, services)."""
    out = Path(tempfile.mkdtemp(prefix="grpcio-stubs-"))
    include = Path(protoc.__file__).parent / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(proto_root / proto_file),
    ]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed on {proto_root / proto_file}")
    sys.path.insert(0, str(out))
    module = proto_file.removesuffix(".proto").replace("/", ".")
    return importlib.import_module(f"{module}_pb2"), importlib.import_module(f"{module}_pb2_grpc")


def call(
    proto_root: Path, proto_file: str, endpoint: str, method: str, request: dict[str, Any]
) -> Any:
    """Make one call and return the reply (or the error) as plain data."""
    messages, services = compile_stubs(proto_root, proto_file)
    service, rpc = method.split("/")
    stub = getattr(services, f"{service}Stub")(grpc.insecure_channel(endpoint))
    req = json_format.ParseDict(request, getattr(messages, f"{rpc}Request")())
    try:
        reply = getattr(stub, rpc)(req, timeout=20)
    except grpc.RpcError as exc:
        return {"error": {"code": exc.code().name, "details": exc.details()}}
    return json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def main() -> None:
    root, proto_file, endpoint, rpc = sys.argv[1:5]
    request = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    print(json.dumps(call(Path(root), proto_file, endpoint, rpc, request)))


if __name__ == "__main__":
    main()

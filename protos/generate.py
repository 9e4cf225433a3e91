"""Regenerate the gRPC code under crishim/api/ from protos/ with betterproto2 (grpclib
service bases): the CRI (``runtime/v1/api.proto`` -> ``crishim.api.v1``) and crishim's own
admin service (``crishim/admin/v1/admin.proto`` -> ``crishim.api.admin_v1``).

Run: ``python protos/generate.py`` (from the dev environment: grpcio-tools and
betterproto2-compiler installed). ``--check`` compares instead of writing and fails when the
committed code is stale. The only change made to the compiler's output is moving each
schema's module into its own package with its own message pool beside it, imported
relatively from there.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
OPTIONS = "client_generation=async,server_generation=async"
POOL_IMPORT_TO = "from .message_pool import default_message_pool"


@dataclass(frozen=True)
class Schema:
    """One proto file and the package its code goes to."""

    proto: str  # path under protos/; its directory is the proto package
    target: Path

    @property
    def package_dir(self) -> str:
        return str(Path(self.proto).parent)

    @property
    def pool_import(self) -> str:
        # The compiler imports the pool from the output root, one dot per package level.
        dots = "." * (len(Path(self.proto).parent.parts) + 1)
        return f"from {dots}message_pool import default_message_pool"


SCHEMAS = (
    Schema("runtime/v1/api.proto", REPO / "crishim" / "api" / "v1"),
    Schema("crishim/admin/v1/admin.proto", REPO / "crishim" / "api" / "admin_v1"),
)


def generate(schema: Schema, out: Path) -> None:
    """Compile ``schema`` and lay the result out as its package in ``out``."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory() as raw:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"--python_betterproto2_out={raw}",
                f"--python_betterproto2_opt={OPTIONS}",
                str(PROTOS / schema.proto),
            ],
            check=True,
            env=env,
            # The compiler formats its output with ruff, which would pick up the nearest
            # pyproject.toml; compiling from the scratch directory keeps the output the same
            # wherever the repository lives.
            cwd=raw,
            stdout=subprocess.DEVNULL,
        )
        module = (Path(raw) / schema.package_dir / "__init__.py").read_text()
        if schema.pool_import not in module:
            raise SystemExit("generate.py: compiler output changed shape; update this script")
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text(module.replace(schema.pool_import, POOL_IMPORT_TO))
        (out / "message_pool.py").write_text((Path(raw) / "message_pool.py").read_text())


def stale_files(schema: Schema) -> list[str]:
    """Generated files of ``schema`` whose committed content differs from a fresh one."""
    target = schema.target
    with tempfile.TemporaryDirectory() as fresh:
        generate(schema, Path(fresh))
        names = sorted(p.name for p in Path(fresh).iterdir())
        committed = sorted(p.name for p in target.iterdir() if p.suffix == ".py")
        stale = [n for n in names if not (target / n).exists()]
        stale += [n for n in committed if n not in names]
        _, mismatch, errors = filecmp.cmpfiles(fresh, target, names, shallow=False)
        return sorted(str(target / name) for name in set(stale + mismatch + errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if args.check:
        stale = [name for schema in SCHEMAS for name in stale_files(schema)]
        if stale:
            print(
                f"stale generated code: {', '.join(stale)}; run: python protos/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for schema in SCHEMAS:
        generate(schema, schema.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

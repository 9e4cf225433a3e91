"""Regenerate crishim/api/v1/ from protos/ with betterproto2 (grpclib service bases).

Run: ``python protos/generate.py`` (from the dev environment: grpcio-tools and
betterproto2-compiler installed). ``--check`` compares instead of writing and fails when the
committed code is stale. The only change made to the compiler's output is moving it under
``crishim.api.v1``: the message pool module sits beside the package and is imported
relatively from there.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
SCHEMA = PROTOS / "runtime" / "v1" / "api.proto"
TARGET = REPO / "crishim" / "api" / "v1"
OPTIONS = "client_generation=async,server_generation=async"
POOL_IMPORT_FROM = "from ...message_pool import default_message_pool"
POOL_IMPORT_TO = "from .message_pool import default_message_pool"


def generate(out: Path) -> None:
    """Compile the schema and lay the result out as the crishim.api.v1 package in ``out``."""
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
                str(SCHEMA),
            ],
            check=True,
            env=env,
            # The compiler formats its output with ruff, which would pick up the nearest
            # pyproject.toml; compiling from the scratch directory keeps the output the same
            # wherever the repository lives.
            cwd=raw,
            stdout=subprocess.DEVNULL,
        )
        module = (Path(raw) / "runtime" / "v1" / "__init__.py").read_text()
        if POOL_IMPORT_FROM not in module:
            raise SystemExit("generate.py: compiler output changed shape; update this script")
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text(module.replace(POOL_IMPORT_FROM, POOL_IMPORT_TO))
        (out / "message_pool.py").write_text((Path(raw) / "message_pool.py").read_text())


def stale_files() -> list[str]:
    """Generated files whose committed content differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        names = sorted(p.name for p in Path(fresh).iterdir())
        committed = sorted(p.name for p in TARGET.iterdir() if p.suffix == ".py")
        stale = [n for n in names if not (TARGET / n).exists()]
        stale += [n for n in committed if n not in names]
        _, mismatch, errors = filecmp.cmpfiles(fresh, TARGET, names, shallow=False)
        return sorted(set(stale + mismatch + errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"stale generated code in {TARGET}: {', '.join(stale)}; "
                "run: python protos/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    generate(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The independent SPDY client of the streaming tests: Node's spdy-transport.

Loaded for every test as a pytest plugin (``tests/conftest.py``): the ``node_client``
fixture installs the client's modules when needed and returns its script; ``run_node``
runs one exchange and returns the client's JSON report.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[1] / "streaming_client"
NODE_SCRIPT = CLIENT_DIR / "spdy_exec.js"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node client with its modules installed (``npm ci`` when they are missing)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the SPDY interop tests need Node.js 18+")
    if not (CLIENT_DIR / "node_modules" / "spdy-transport").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install spdy-transport for the SPDY tests")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed in {CLIENT_DIR}: {done.stderr.strip()[-500:]}")
    return NODE_SCRIPT


async def run_node(script: Path, config: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"node client failed: {out.decode()} {err.decode()}"
    result: dict[str, Any] = json.loads(out)
    return result

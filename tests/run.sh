#!/usr/bin/env bash
# The test command of README.md (CI runs it through .ci/run). On a Debian machine, as root:
# installs the host tools and the Python environment the tests need, prepares the host,
# then runs the linters, the type checker, the layer contracts, the test suite and a short
# benchmark. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: run as root (it installs packages and the tests start runtimes)" >&2
  exit 1
fi

# Host tools the tests start for real.
# debootstrap and systemd-container (systemd-nspawn) build and boot the systemd test bed.
# containerd: its ctr writes archives for the import tests, the kind node's stand-in base
# carries it as kind's does, and the benchmarks compare with it.
# openssl: the cluster rig (tests/rig/pki.py) makes its certificates with it.
# buildah builds the crishim image (docker/build.sh) from a debootstrapped base.
packages=(runc crun conmon catatonit containernetworking-plugins docker-registry busybox-static
          umoci skopeo iproute2 iptables apache2-utils python3-venv debootstrap systemd-container
          containerd openssl buildah)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The project and its dev tools in a private venv.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import crishim, grpclib, betterproto2' # fail early if the install failed

# The SPDY client the streaming tests drive (Node's spdy-transport), pinned by its lock file.
if command -v npm >/dev/null 2>&1; then
  (cd tests/streaming_client && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "== WARNING: npm not found; the SPDY interoperability tests will skip" >&2
fi

# Hybrid cgroup hosts: crun refuses to run while hugetlb is bound to the v2 hierarchy only.
# Binding hugetlb to a v1 hierarchy first makes it work (see DESIGN.md).
if mountpoint -q /sys/fs/cgroup/unified 2>/dev/null \
   && ! grep -qE '^\S+ \S+ cgroup \S*hugetlb' /proc/self/mounts; then
  mkdir -p /sys/fs/cgroup/hugetlb
  if mount -t cgroup -o hugetlb none /sys/fs/cgroup/hugetlb; then
    echo "== bound hugetlb to a v1 hierarchy for crun"
  else
    echo "== WARNING: could not bind hugetlb to v1; crun tests may fail" >&2
  fi
fi

echo "== ruff"
.venv/bin/ruff check crishim protos tests
.venv/bin/ruff format --check crishim protos tests
echo "== mypy"
.venv/bin/mypy crishim protos tests
echo "== import-linter (layers of DESIGN.md)"
.venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest "$@"
echo "== benchmark (short run; full: .venv/bin/python -m tests.bench.bench_list)"
.venv/bin/python -m tests.bench.bench_list --rounds 60

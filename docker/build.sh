#!/usr/bin/env bash
# Build the crishim image (docker/Containerfile) with buildah and put it into a registry
# and/or an OCI archive. Needs no Docker engine; run as root.
#
#   docker/build.sh --push registry.example/crishim:0.1.0
#   docker/build.sh --oci-archive crishim.oci.tar
#
# See docker/README.md for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: docker/build.sh [options]   (at least one of --push, --oci-archive)
  --push REF            push the image to REF (docker://REF) after the build
  --oci-archive FILE    write the image as an OCI archive (tar of an OCI layout) to FILE
  --base IMAGE          the Debian 12 image to build from
                        (default docker.io/library/debian:bookworm-slim)
  --tag NAME            its name in buildah's local storage (default localhost/crishim:VERSION)
  --version VERSION     the org.opencontainers.image.version label (default: pyproject.toml's)
  --source URL          the org.opencontainers.image.source label (default: git remote origin)
  --apt-sources FILE    a deb822 sources file (like /etc/apt/sources.list.d/debian.sources)
                        apt uses during the build instead of the base image's
  --pip-index-url URL   the PyPI index pip uses in the build (default: $PIP_INDEX_URL, else
                        pip's own default)
  --pip-cert FILE       a CA bundle pip trusts in the build (default: $PIP_CERT, if set)
  --tls-verify BOOL     verify TLS when pulling the base and pushing (default true; false for
                        a plain-HTTP registry)
  --no-cache            rebuild every layer
  -h, --help            this text
EOF
}

die() {
  echo "docker/build.sh: $*" >&2
  exit 2
}

repo=$(cd "$(dirname "$0")/.." && pwd)
base=docker.io/library/debian:bookworm-slim
push_ref=
archive=
tag=
version=
source_url=
apt_sources=
pip_index_url=${PIP_INDEX_URL:-}
pip_cert=${PIP_CERT:-}
tls_verify=true
no_cache=()

while [ $# -gt 0 ]; do
  case "$1" in
    --push) push_ref=${2:?--push needs a reference}; shift 2 ;;
    --oci-archive) archive=${2:?--oci-archive needs a file}; shift 2 ;;
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --source) source_url=${2:?--source needs a URL}; shift 2 ;;
    --apt-sources) apt_sources=${2:?--apt-sources needs a file}; shift 2 ;;
    --pip-index-url) pip_index_url=${2?--pip-index-url needs a URL}; shift 2 ;;
    --pip-cert) pip_cert=${2?--pip-cert needs a file}; shift 2 ;;
    --tls-verify) tls_verify=${2:?--tls-verify needs true or false}; shift 2 ;;
    --tls-verify=*) tls_verify=${1#*=}; shift ;;
    --no-cache) no_cache=(--no-cache); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[ -n "$push_ref$archive" ] || { usage >&2; die "say where the image goes: --push REF and/or --oci-archive FILE"; }
case "$tls_verify" in true | false) ;; *) die "--tls-verify takes true or false, not '$tls_verify'" ;; esac
if [ -n "$apt_sources" ]; then
  [ -f "$apt_sources" ] || die "--apt-sources: no file $apt_sources"
  grep -q '^URIs:' "$apt_sources" || die "--apt-sources: $apt_sources is not in deb822 format (no 'URIs:' line)"
fi
if [ -n "$pip_cert" ] && [ ! -f "$pip_cert" ]; then
  die "pip CA bundle $pip_cert (--pip-cert or \$PIP_CERT) is not a file"
fi
[ "$(id -u)" -eq 0 ] || die "run as root (buildah builds here with root's storage)"
command -v buildah >/dev/null || die "buildah not found: apt-get install buildah"

if [ -z "$version" ]; then
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
fi
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)
if [ -n "$revision" ] && [ -n "$(git -C "$repo" status --porcelain -- crishim bundles systemd pyproject.toml docker 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
if [ -z "$source_url" ]; then
  source_url=$(git -C "$repo" remote get-url origin 2>/dev/null || true)
fi
tag=${tag:-localhost/crishim:$version}

# Build secrets: mounted for RUN steps only, never committed.
secrets=()
if [ -n "$pip_cert" ]; then
  secrets+=(--secret "id=pip-cert,src=$(realpath "$pip_cert")")
fi
if [ -n "$apt_sources" ]; then
  secrets+=(--secret "id=apt-sources,src=$(realpath "$apt_sources")")
fi

# The labels that change from build to build go in as --label too: buildah's layer cache
# does not tell builds apart by the values of build arguments, so a cached LABEL step would
# keep an earlier build's values.
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
labels=(
  --label "org.opencontainers.image.version=$version"
  --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.created=$created"
  --label "org.opencontainers.image.source=$source_url"
)

# The context: only what the Containerfile copies, without the bytecode that test runs
# leave in the checkout (it would change crishim's layer and defeat buildah's layer cache).
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --mtime=@0 --owner=0 --group=0 -cf - \
  pyproject.toml README.md crishim bundles systemd docker/Containerfile | tar -C "$context" -xf -

started=$(date +%s)
echo "== building $tag from $base (crishim $version)"
buildah build \
  --layers "${no_cache[@]}" \
  --tls-verify="$tls_verify" \
  --file "$context/docker/Containerfile" \
  --tag "$tag" \
  --build-arg "BASE=$base" \
  --build-arg "PIP_INDEX_URL=$pip_index_url" \
  --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" \
  --build-arg "CREATED=$created" \
  --build-arg "SOURCE=$source_url" \
  "${labels[@]}" \
  "${secrets[@]}" \
  "$context"

if [ -n "$archive" ]; then
  echo "== writing $archive"
  rm -f "$archive"
  buildah push --quiet "$tag" "oci-archive:$archive:crishim:$version"
fi
if [ -n "$push_ref" ]; then
  echo "== pushing to $push_ref"
  buildah push --quiet --tls-verify="$tls_verify" "$tag" "docker://$push_ref"
fi
echo "== built $tag in $(($(date +%s) - started)) s: $(buildah images --noheading --format "{{.ID}} {{.Size}}" "$tag")"

"""``ctr`` for a node that runs crishim instead of containerd (installed as ``ctr`` in the
kind node image): the few containerd client calls kind makes, done by ``crishim images``.

kind runs these inside a node (sigs.k8s.io/kind, pkg/cluster/nodeutils):

- ``kind load docker-image`` and ``kind load image-archive`` pipe an archive into
  ``ctr --namespace=k8s.io images import --all-platforms --digests --snapshotter=<name> -``;
- ``kind load docker-image`` of an image the node has under another name runs
  ``ctr --namespace=k8s.io images tag --force <image ID> <name>``.

Accepted, and nothing else:

- global options: ``--namespace``/``-n`` (``k8s.io`` only: crishim's images are the CRI's;
  the ``CONTAINERD_NAMESPACE`` variable as in ctr), ``--address``/``-a`` (crishim's socket;
  the ``CONTAINERD_ADDRESS`` variable as in ctr; default: crishim's config);
- ``images import [--all-platforms] [--digests] [--snapshotter NAME] FILE|-``: crishim
  keeps this platform's image and records its repo digests either way, and unpacks into its
  own snapshotter, so the three options change nothing;
- ``images tag [--force] SOURCE TARGET``: crishim always moves a tag, as ``--force`` does;
- ``images list|ls [-q]``, for people at a node's shell.

``images`` may be spelled ``image`` or ``i``, as in ctr. Anything else exits 1 (ctr's
failure status) saying so; crictl and ``crishim`` do the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from crishim import cli

__all__ = ["UsageError", "main", "translate"]

NAMESPACE = "k8s.io"
_IMAGES = ("images", "image", "i")
_IGNORED_IMPORT_FLAGS = ("--all-platforms", "--digests")


class UsageError(Exception):
    """The invocation is not one this stand-in accepts."""


def translate(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The ``crishim`` arguments doing what ``ctr argv`` asks; UsageError otherwise."""
    args = list(argv)
    namespace = environ.get("CONTAINERD_NAMESPACE", "default")
    address = environ.get("CONTAINERD_ADDRESS", "")
    while args and args[0].startswith("-"):
        option = args.pop(0)
        name, value = _option(option, args, ("--namespace", "-n", "--address", "-a"))
        if name in ("--namespace", "-n"):
            namespace = value
        else:
            address = value
    if len(args) < 2 or args[0] not in _IMAGES:
        raise UsageError(f'"ctr {" ".join(argv)}" is not supported on this node')
    if namespace != NAMESPACE:
        raise UsageError(
            f'namespace "{namespace}": this node runs crishim, whose images are the '
            f"Kubernetes CRI's; use --namespace={NAMESPACE}"
        )
    command, rest = args[1], args[2:]
    socket = ["--socket", address] if address else []
    if command == "import":
        return ["images", "import", *socket, _import_source(rest)]
    if command == "tag":
        return ["images", "tag", *socket, *_tag_operands(rest)]
    if command in ("list", "ls"):
        quiet = [arg for arg in rest if arg in ("-q", "--quiet")]
        if len(quiet) != len(rest):
            raise UsageError(f'images {command}: only -q is supported, not "{" ".join(rest)}"')
        return ["images", "list", *socket, *(["--quiet"] if quiet else [])]
    raise UsageError(f'"ctr images {command}" is not supported on this node')


def _option(option: str, rest: list[str], names: Sequence[str]) -> tuple[str, str]:
    """``--name=value`` or ``--name value`` for one of ``names``."""
    name, equals, value = option.partition("=")
    if name not in names:
        raise UsageError(f'option "{option}" is not supported on this node')
    if not equals:
        if not rest:
            raise UsageError(f"option {name} needs a value")
        value = rest.pop(0)
    return name, value


def _import_source(args: list[str]) -> str:
    sources = []
    while args:
        arg = args.pop(0)
        if arg in _IGNORED_IMPORT_FLAGS:
            continue
        if arg.startswith("--snapshotter"):
            _option(arg, args, ("--snapshotter",))
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f'images import: option "{arg}" is not supported on this node')
        else:
            sources.append(arg)
    if len(sources) != 1:
        raise UsageError("images import: give one archive, or - for standard input")
    return sources[0]


def _tag_operands(args: list[str]) -> list[str]:
    operands = [arg for arg in args if arg != "--force"]
    if any(arg.startswith("-") for arg in operands) or len(operands) != 2:
        raise UsageError("images tag: usage: images tag [--force] SOURCE TARGET")
    return operands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctr`` stand-in."""
    try:
        translated = translate(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as exc:
        print(f"ctr (crishim): {exc}", file=sys.stderr)
        return 1
    status = cli.main(translated)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``crishim`` command: serve, version, doctor, config, unit, images (import, tag, list),
node (install, uninstall)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from crishim import __version__
from crishim.config import Config, load_config, render_config
from crishim.errors import CrishimError, InvalidArgument
from crishim.services.runtime_info import RUNTIME_API_VERSION, RUNTIME_NAME

log = logging.getLogger("crishim")


def _config_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--config",
        type=Path,
        help="main config file "
        "(default /etc/crishim/crishim.toml; drop-ins from crishim.d/ beside it)",
    )
    flags.add_argument("--root", help="durable state directory (default /var/lib/crishim)")
    flags.add_argument("--state", help="runtime state directory (default /run/crishim)")
    flags.add_argument("--socket", help="CRI socket (default /run/crishim/crishim.sock)")
    flags.add_argument(
        "--host-root",
        dest="host_root_dir",
        help="where crishim sees the node's root file system (default /; config: host_root)",
    )
    flags.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``crishim`` command."""
    parser = argparse.ArgumentParser(
        prog="crishim", description="A Kubernetes CRI runtime running pods with runc or crun."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    flags = _config_flags()
    sub.add_parser("serve", parents=[flags], help="serve the CRI on the unix socket")
    sub.add_parser("version", help="print crishim's version")
    sub.add_parser("doctor", parents=[flags], help="check that this host can run pods")
    config = sub.add_parser("config", parents=[flags], help="print the effective config")
    config.add_argument(
        "--default", action="store_true", help="print the commented default config instead"
    )
    sub.add_parser("unit", help="print the systemd unit (crishim.service) for this crishim")
    images = sub.add_parser("images", help="import, tag and list the images of a running crishim")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    load = images_sub.add_parser(
        "import",
        parents=[flags],
        help="import the images of a docker-archive (docker save) or OCI-archive tar",
        description="Import every image of a docker-archive (docker save) or OCI-archive tar, "
        "plain or compressed, into the running crishim's image store; - reads standard input.",
    )
    load.add_argument("archive", metavar="FILE|-", help="the archive, or - for standard input")
    tag = images_sub.add_parser("tag", parents=[flags], help="give an image another tag")
    tag.add_argument("source", help="the image: an ID or a reference")
    tag.add_argument("target", help="the new tag, e.g. registry.example/app:1")
    listing = images_sub.add_parser("list", aliases=["ls"], parents=[flags], help="list images")
    listing.add_argument(
        "-q", "--quiet", action="store_true", help="print only tags (an untagged image's ID)"
    )
    _node_parser(sub.add_parser("node", help="install crishim on this node's host, or remove it"))
    return parser


def _node_parser(node: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--host-root",
        type=Path,
        default=Path("/"),
        help="where the host's root file system is mounted (the DaemonSet: /host; default /)",
    )
    # The host's transient unit a DaemonSet's pod hands its work to: run here, not again
    # handed off (crishim.node.install).
    where.add_argument("--on-host", action="store_true", help=argparse.SUPPRESS)
    actions = node.add_subparsers(dest="action", required=True, metavar="{install,uninstall}")
    install = actions.add_parser(
        "install",
        parents=[where],
        help="install crishim as a systemd service and switch kubelet to it",
    )
    install.add_argument(
        "--image-root",
        type=Path,
        default=Path("/"),
        help="the root file system crishim runs from, copied to /opt/crishim/rootfs unless it "
        "is the host's own (default /: this container's)",
    )
    uninstall = actions.add_parser(
        "uninstall",
        parents=[where],
        help="switch kubelet back and remove what install did, from its record",
    )
    uninstall.add_argument(
        "--purge", action="store_true", help="also remove /var/lib/crishim (images, state)"
    )
    # How the installed crishim.service starts crishim (crishim.node.enter); not for users.
    enter = actions.add_parser("enter")
    enter.add_argument("--rootfs", required=True)
    enter.add_argument("--pin", required=True)
    enter.add_argument("argv", nargs=argparse.REMAINDER)


def _load(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        {
            "root": args.root,
            "state": args.state,
            "socket": args.socket,
            "host_root": args.host_root_dir,
            "log_level": args.log_level,
        },
    )


def _setup_logging(level: str) -> None:
    # Libraries log at WARNING and above only: grpclib's HTTP/2 stack is very chatty.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("crishim").setLevel(level.upper())


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level)
    from crishim.app import serve

    uvloop.run(serve(config))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from crishim.services.doctor import Level, run_checks

    findings = asyncio.run(run_checks(_load(args)))
    for finding in findings:
        print(finding.line())
    return 1 if any(f.level is Level.FAIL for f in findings) else 0


def _config(args: argparse.Namespace) -> int:
    if args.default:
        print(render_config(Config(), comments=True), end="")
    else:
        print(render_config(_load(args), comments=False), end="")
    return 0


def _unit(args: argparse.Namespace) -> int:
    from crishim.node.unit import crishim_executable, render_unit, unit_path

    print(render_unit(unit_path().read_text(), crishim_executable()), end="")
    return 0


def _node(args: argparse.Namespace) -> int:
    if args.action == "enter":
        from crishim.node.enter import enter_rootfs

        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        enter_rootfs(args.rootfs, args.pin, command)
        return 1  # not reached: enter_rootfs execs or raises

    from crishim.node.host import RealHost
    from crishim.node.install import install, uninstall
    from crishim.node.steps import Node
    from crishim.node.unit import crishim_executable, unit_path

    node = Node(
        host_root=args.host_root,
        image_root=getattr(args, "image_root", Path("/")),
        host=RealHost(),
        executable=crishim_executable(),
        shipped_unit=unit_path().read_text(),
        say=lambda line: print(line, flush=True),
        on_host=args.on_host,
    )
    if args.action == "install":
        install(node)
    else:
        uninstall(node, purge=args.purge)
    return 0


def _version(args: argparse.Namespace) -> int:
    print(
        f"{RUNTIME_NAME} {__version__} (CRI {RUNTIME_API_VERSION}, Python {sys.version.split()[0]})"
    )
    return 0


def _images(args: argparse.Namespace) -> int:
    from crishim.api import client

    socket = Path(_load(args).socket)
    if args.images_command == "import":
        return _import(socket, args.archive)
    if args.images_command == "tag":
        image = asyncio.run(client.tag_image(socket, args.source, args.target))
        print(f"{image.id} {', '.join(image.repo_tags)}")
        return 0
    for found in asyncio.run(client.list_images(socket)):
        if args.quiet:
            print("\n".join(found.repo_tags or [found.id]))
        else:
            print(f"{found.id}  {found.size / 1e6:9.1f} MB  {', '.join(found.repo_tags) or '-'}")
    return 0


def _import(socket: Path, archive: str) -> int:
    from crishim.api import client

    if archive == "-":
        if sys.stdin.isatty():
            raise InvalidArgument("refusing to read an archive from a terminal; pipe one in")
        reply = asyncio.run(client.import_archive(socket, sys.stdin.buffer))
    else:
        try:
            source = open(archive, "rb")  # noqa: SIM115 - closed below, around the async call
        except OSError as exc:
            raise InvalidArgument(f"{archive}: {exc.strerror}") from None
        with source:
            reply = asyncio.run(client.import_archive(socket, source))
    for image in reply.images:
        print(f"imported {image.id} {', '.join(image.repo_tags) or '(no name)'}")
    for note in reply.notes:
        print(f"crishim: note: {note}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crishim`` command."""
    args = build_parser().parse_args(argv)
    commands = {
        "serve": _serve,
        "version": _version,
        "doctor": _doctor,
        "config": _config,
        "unit": _unit,
        "images": _images,
        "node": _node,
    }
    try:
        return commands[args.command](args)
    except CrishimError as exc:
        print(f"crishim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

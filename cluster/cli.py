"""The `tidelog` command line.

The entry point lives in `tidelog.cluster` because it is the one room allowed to import both the
node (for `tidelog node` and `tidelog cluster`) and the client (for everything else); see
docs/DESIGN.md §1 and §9. Each room registers its own sub-commands.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from tidelog.client import cli as client_cli
from tidelog.cluster import commands as cluster_commands
from tidelog.proto.errors import TidelogError


def package_version() -> str:
    try:
        return version("tidelog")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidelog",
        description="tidelog: a Kafka-style distributed partitioned log.",
    )
    parser.add_argument("--version", action="version", version=f"tidelog {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    cluster_commands.register(subparsers)
    client_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except TidelogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

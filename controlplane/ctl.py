"""``synapsectl``: the admin CLI (commands land with issue 8)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapsectl", description="Operate a Synapse fleet through the Admin gRPC API.")
    parser.add_argument("--server", help="Admin address host:port (default: $SYNAPSE_ADMIN_ADDR "
                                         "or 127.0.0.1:50051)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("get", help="list nodes, models or backends")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    print("synapsectl: not built yet (issue 8)")
    return 1

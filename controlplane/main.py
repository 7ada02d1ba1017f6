"""``synapse controlplane``: the OpenAI-compatible API, router, cache and Admin gRPC."""

from __future__ import annotations

import argparse

from controlplane import config
from protos.common import cli


def build_parser(prog: str = "synapse controlplane") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the Synapse control plane: OpenAI-compatible HTTP API, "
        "predicted-TTFT router, response cache, agent registry and Admin gRPC service.")
    cli.add_common_args(parser)
    parser.add_argument("--http-port", type=int, help="override http.port")
    parser.add_argument("--grpc-port", type=int, help="override grpc.port")
    return parser


def main(argv: list[str] | None = None, prog: str = "synapse controlplane") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.bootstrap(config.ControlPlaneSettings, args,
                  {"http.port": args.http_port, "grpc.port": args.grpc_port})
    print("synapse controlplane: the serving path is not built yet (issue 6)")
    return 1

"""``synapse simulator``: the vLLM / TEI stand-in."""

from __future__ import annotations

import argparse

from protos.common import cli
from simulator import config


def build_parser(prog: str = "synapse simulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the engine simulator, a vLLM / TEI stand-in.")
    cli.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "synapse simulator") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.bootstrap(config.SimulatorSettings, args)
    print("synapse simulator: not built yet (issue 4)")
    return 1

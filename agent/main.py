"""``synapse agent``: the node agent."""

from __future__ import annotations

import argparse

from agent import config
from protos.common import cli


def build_parser(prog: str = "synapse agent") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the Synapse node agent: GPU telemetry, engine supervisor, "
        "embedding cache (Node.Embed) and the report stream to the control plane.")
    cli.add_common_args(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "synapse agent") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.bootstrap(config.AgentSettings, args)
    print("synapse agent: not built yet (issue 5)")
    return 1

"""``synapse up``: embedded mode (not built yet, issue 8)."""

from __future__ import annotations

import argparse

from protos.common import cli


def main(argv: list[str] | None = None, prog: str = "synapse up") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run Synapse on this machine in one command: control plane, "
        "one agent, the engine simulator, the in-process embedder and cache.")
    cli.add_common_args(parser)
    parser.add_argument("--data-dir", default="./.synapse", help="state directory")
    parser.add_argument("--upstream", metavar="URL",
                        help="a real OpenAI-compatible server to use instead of the simulator")
    parser.parse_args(argv)
    print("synapse up: embedded mode is not built yet (issue 8)")
    return 1

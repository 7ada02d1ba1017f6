"""``synapse agent``: the node agent (see :mod:`agent.app` for what runs)."""

from __future__ import annotations

import argparse
import asyncio
import os

from agent import config
from synapse_common import cli


def build_parser(prog: str = "synapse agent") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the Synapse node agent: GPU telemetry, engine supervisor, "
        "embedding cache (Node.Embed) and the report stream to the control plane.")
    cli.add_common_args(parser)
    group = parser.add_argument_group("agent options (override the config file)")
    group.add_argument("--node-name", help="node name reported to the control plane")
    group.add_argument("--grpc-port", type=int, metavar="PORT",
                       help="Node gRPC port (0 = pick a free one)")
    group.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="/metrics port (0 = pick a free one)")
    group.add_argument("--control-plane", action="append", metavar="HOST:PORT",
                       help="control-plane address (repeatable; replaces the configured list)")
    return parser


def overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"node_name": args.node_name, "grpc.port": args.grpc_port,
            "metrics.port": args.metrics_port, "control_plane.addresses": args.control_plane}


def main(argv: list[str] | None = None, prog: str = "synapse agent") -> int:
    args = build_parser(prog).parse_args(argv)
    secret_env: set[str] = set()     # kept from the engines (agent.process)
    settings = cli.bootstrap(config.AgentSettings, args, overrides(args), secret_env)
    # The supervisor forks engines while gRPC threads run; gRPC's fork handlers are for
    # children that use gRPC, which engines never do (and they log a line per fork).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from agent import app  # imports grpc: after the fork setting above

    try:
        import uvloop
    except ImportError:  # not on every platform; asyncio's loop works too
        return asyncio.run(app.run(settings, frozenset(secret_env)))
    return uvloop.run(app.run(settings, frozenset(secret_env)))

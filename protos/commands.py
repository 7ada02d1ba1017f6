"""The ``synapse`` command: dispatches to each process's own ``main``.

The process packages (``agent``, ``controlplane``, ``simulator``) must not import each
other, and ``protos`` sits below all three, so the dispatcher names their entry modules
as strings and imports only the one that was asked for. That also keeps ``synapse agent``
from paying for the control plane's imports.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("controlplane.embedded", "run Synapse on this machine: control plane, one agent, "
                                    "the engine simulator, embedder and cache (embedded mode)"),
    "controlplane": ("controlplane.main", "run the control plane (OpenAI-compatible API, "
                                          "router, cache, Admin gRPC)"),
    "agent": ("agent.main", "run the node agent (GPU telemetry, engine supervisor, "
                            "embedding cache, reporter)"),
    "simulator": ("simulator.main", "run the engine simulator (a vLLM / TEI stand-in)"),
}

USAGE = "usage: synapse [-h] {" + ",".join(COMMANDS) + "} ..."


def _help() -> str:
    lines = [USAGE, "", "Synapse: a self-hosted LLM inference fabric.", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'synapse COMMAND --help' for a command's options.",
              "Admin CLI: synapsectl --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return 0 if args else 2
    if args[0] == "--version":
        from importlib import metadata
        print(f"synapse {metadata.version('synapse-fabric')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\nsynapse: error: unknown command {name!r} "
              f"(choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest, prog=f"synapse {name}")
    return int(result or 0)


def synapsectl_main() -> int:
    module = importlib.import_module("controlplane.ctl")
    return int(module.main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

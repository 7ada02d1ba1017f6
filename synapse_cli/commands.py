"""The ``synapse`` command: dispatches to each process's own ``main``.

This package sits above ``agent``, ``controlplane`` and ``simulator`` (an import-linter
contract), so it imports their entry modules directly; each import happens inside its
command's function, so ``synapse agent`` does not pay for the control plane's imports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Main = Callable[..., object]


def _up() -> Main:
    from controlplane import embedded
    return embedded.main


def _controlplane() -> Main:
    from controlplane import main
    return main.main


def _agent() -> Main:
    from agent import main
    return main.main


def _simulator() -> Main:
    from simulator import main
    return main.main


COMMANDS: dict[str, tuple[Callable[[], Main], str]] = {
    "up": (_up, "run Synapse on this machine: control plane, one agent, "
                "the engine simulator, embedder and cache (embedded mode)"),
    "controlplane": (_controlplane, "run the control plane (OpenAI-compatible API, "
                                    "router, cache, Admin gRPC)"),
    "agent": (_agent, "run the node agent (GPU telemetry, engine supervisor, "
                      "embedding cache, reporter)"),
    "simulator": (_simulator, "run the engine simulator (a vLLM / TEI stand-in)"),
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
    entry = COMMANDS[name][0]()
    result = entry(rest, prog=f"synapse {name}")
    return result if isinstance(result, int) else 0


def synapsectl_main() -> int:
    from controlplane import ctl
    return int(ctl.main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

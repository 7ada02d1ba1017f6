"""``synapsectl``: operate a Synapse fleet through the Admin gRPC service.

kubectl habits: ``get nodes|models|backends|usage``, ``describe node NAME``,
``cordon|uncordon|drain NAME``, ``deploy``/``undeploy``, ``cache invalidate|calibrate``,
``stats``, ``explain``. Aligned tables by default, ``-o json|yaml`` for machines.

Connection: ``--server`` or ``$SYNAPSE_ADMIN_ADDR`` (default ``127.0.0.1:50051``); the admin
token from ``--token-file``, ``$SYNAPSE_ADMIN_TOKEN_FILE`` or ``$SYNAPSE_ADMIN_TOKEN`` (this
client reads those variables itself: it is a CLI, not a configured process). Exit codes:
0 done, 1 the server said no (one line with the gRPC status and message), 2 usage.

``cordon``/``uncordon`` of a name no node has registered under is recorded (a node can be
cordoned before it joins: ``admin_grpc._detail_or_intent``) and exits 0, since what was
asked is stored and applies when that node registers; the output says "not registered
yet" and a warning on stderr names the nearest known node, for the operator who mistyped.
A reader that stops early (``synapsectl get nodes | head -1``) is not an error: the rest
of the output is dropped quietly, exit 0.

Every number on the command line is checked as it is parsed
(:mod:`synapse_common.cli_numbers`): a negative, non-finite or out-of-range value is a
usage error naming its option (exit 2), never a traceback from protobuf or a conversion,
nor a gRPC deadline that overflows into an instant ``DEADLINE_EXCEEDED``; the cache tools'
numbers are bounded where each tool declares its options. ``--server`` (and
``$SYNAPSE_ADMIN_ADDR``) must be ``host:port`` with a port in 1..65535 (gRPC would take
port 99999 modulo 65536), or a gRPC target with a scheme (``unix:``, ``dns:``...). gRPC's C
core logs at its own level (a TLS handshake with a plain-text port prints an INFO line
before synapsectl's one-line error); unless the user set ``GRPC_VERBOSITY``, synapsectl
sets it to NONE before gRPC is imported, which is when gRPC reads it: every failure reaches
the user as synapsectl's own line with gRPC's status and details. A ``--ca-file`` that is
unreadable or holds no PEM certificate is a usage error too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from controlplane import ctl_render
from protos import enums
from synapse_common import cli_numbers

DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
ENGINES = enums.ENGINE_KIND.names()
# Longest call or drain wait taken: gRPC's deadline overflows (an instant DEADLINE_EXCEEDED)
# long before a float does.
MAX_SECONDS = 7 * 86_400.0
MAX_MEMORY_GB = 2**64 // 1024**3 - 1       # sent in bytes, a uint64
MAX_TENSOR_PARALLEL = 64                   # the most GPUs the Admin service places for one engine
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


class UsageError(Exception):
    """Bad command line: exit 2."""


def _address(text: str, what: str = "") -> str:
    """``host:port`` with a port in 1..65535 (``[v6]:port`` for IPv6), or a gRPC target
    with a scheme (``unix:/path``), passed as it is."""
    if text.startswith(GRPC_SCHEMES):
        return text
    host, _, port = text.rpartition(":")
    bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not host or bare_v6 or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{what}not an address host:port with a port in 1..65535: {text!r}")
    return text


def _connection(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str | None]:
    server = args.server or environ.get("SYNAPSE_ADMIN_ADDR") or DEFAULT_SERVER
    if not args.server:
        try:
            _address(server, "$SYNAPSE_ADMIN_ADDR: ")
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
    if args.tls and args.ca_file:
        _check_ca_file(args.ca_file)
    token_file = args.token_file or environ.get("SYNAPSE_ADMIN_TOKEN_FILE")
    if token_file:
        try:
            token = pathlib.Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:   # sent as no key, the server would only say a key is missing
            raise UsageError(f"token file {token_file} is empty: it should hold the admin "
                             "key") from None
        return server, token
    return server, environ.get("SYNAPSE_ADMIN_TOKEN") or None


def _check_ca_file(path: str) -> None:
    """A ``--ca-file`` gRPC could not use fails later as a traceback (unreadable) or a C-core
    log line and a vague handshake error (not PEM): said here, naming the file."""
    try:
        text = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --ca-file {path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--ca-file {path} holds no PEM certificate") from None


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # The same options are accepted before and after the command (kubectl habit); on
    # subcommands they default to SUPPRESS so they never overwrite a value given earlier.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--server", type=_address, default=default(None),
                        help=f"Admin address host:port (default: $SYNAPSE_ADMIN_ADDR or "
                             f"{DEFAULT_SERVER})")
    parser.add_argument("--token-file", metavar="PATH", default=default(None),
                        help="file holding the admin token")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect with TLS")
    parser.add_argument("--ca-file", metavar="PATH", default=default(None),
                        help="CA bundle for --tls")
    parser.add_argument("--timeout", type=cli_numbers.number(0, MAX_SECONDS, low_open=True),
                        default=default(30.0), help="seconds per call")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"),
                        default=default("table"), help="output format")


class _Subparsers:
    """Adds every subcommand with the global options attached."""

    def __init__(self, action: Any, parent: argparse.ArgumentParser) -> None:
        self.action, self.parent = action, parent

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.parent], **kwargs)  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapsectl", description="Operate a Synapse fleet through the Admin gRPC API.",
        epilog="Environment: SYNAPSE_ADMIN_ADDR, SYNAPSE_ADMIN_TOKEN, SYNAPSE_ADMIN_TOKEN_FILE.")
    _add_global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, suppress=True)
    sub = _Subparsers(parser.add_subparsers(dest="command", metavar="COMMAND"), common)
    _add_get(sub)
    _add_node_commands(sub)
    _add_model_commands(sub)
    _add_cache(sub)
    sub.add_parser("stats", help="request, cache and latency figures")
    explain = sub.add_parser("explain", help="how a request would be routed")
    explain.add_argument("--model", required=True)
    explain.add_argument("--prompt", required=True, help="one user message")
    explain.add_argument("--session", default="", help="x-session-id for affinity")
    explain.add_argument("--max-tokens", type=cli_numbers.count(), default=0)
    explain.add_argument("--tenant", default="",
                         help="route it as this tenant's request: engines' prefix caches "
                         "are partitioned per tenant, so only then are its cached prefixes "
                         "counted")
    explain.add_argument("--cache-salt", default="",
                         help="the cache_salt the tenant's request would carry")
    return parser


def _add_get(sub: Any) -> None:
    get = sub.add_parser("get", help="list nodes, models, backends or usage")
    get.add_argument("kind", choices=("nodes", "node", "models", "model", "backends", "backend",
                                      "usage"))
    get.add_argument("--tenant", default="", help="usage: of this tenant only")
    get.add_argument("--since", default="24h", type=_duration,
                     help="usage: the days overlapping this long back (30m, 24h, 7d)")
    describe = sub.add_parser("describe", help="show one node in detail")
    describe.add_argument("kind", choices=("node",))
    describe.add_argument("name")


def _add_node_commands(sub: Any) -> None:
    cordon = sub.add_parser("cordon", help="stop routing new requests to a node (durable)")
    cordon.add_argument("name")
    cordon.add_argument("--reason", default="")
    uncordon = sub.add_parser("uncordon", help="route to a node again (also ends a drain)")
    uncordon.add_argument("name")
    drain = sub.add_parser("drain", help="stop routing to a node and drain its engines")
    drain.add_argument("name")
    drain.add_argument("--wait", action="store_true", help="wait until in-flight reaches 0")
    seconds = cli_numbers.number(0, MAX_SECONDS)
    drain.add_argument("--timeout-seconds", type=seconds, default=0.0)
    drain.add_argument("--grace-seconds", type=seconds, default=0.0)


def _add_model_commands(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="start an engine for a model on nodes")
    deploy.add_argument("model")
    deploy.add_argument("--node", action="append", default=[], help="node (repeatable); "
                        "none = placement by free VRAM")
    deploy.add_argument("--engine", choices=ENGINES, default="vllm")
    deploy.add_argument("--replicas", type=cli_numbers.count(), default=0)
    deploy.add_argument("--memory-gb", type=cli_numbers.number(0, MAX_MEMORY_GB), default=0.0,
                        help="declared VRAM need")
    deploy.add_argument("--served-model-name", action="append", default=[])
    deploy.add_argument("--max-model-len", type=cli_numbers.count(), default=0)
    deploy.add_argument("--gpu-memory-utilization", type=cli_numbers.number(0, 1), default=0.0,
                        help="share of each GPU's memory (default: from --memory-gb)")
    deploy.add_argument("--tensor-parallel-size",
                        type=cli_numbers.integer(0, MAX_TENSOR_PARALLEL), default=0,
                        metavar="N",
                        help="GPUs per engine (passed to vLLM; placement picks N GPUs)")
    deploy.add_argument("--task", choices=("generate", "embed"), default="generate")
    deploy.add_argument("--extra-arg", action="append", default=[],
                        help="argument passed to the engine (repeatable)")
    undeploy = sub.add_parser("undeploy", help="stop a model's control-plane-managed engines")
    undeploy.add_argument("model")
    undeploy.add_argument("--node", action="append", default=[])


def _add_cache(sub: Any) -> None:
    cache = sub.add_parser("cache", help="response cache: invalidate, calibrate, tune-embedder, "
                           "tune-pair-scorer")
    cache_sub = _Subparsers(cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND"),
                            sub.parent)
    inval = cache_sub.add_parser("invalidate", help="drop cache entries (both layers)")
    target = inval.add_mutually_exclusive_group(required=True)
    target.add_argument("--tenant")
    target.add_argument("--model")
    target.add_argument("--all", action="store_true")
    calibrate = cache_sub.add_parser(
        "calibrate", help="fit the semantic-cache verifier and its operating point")
    try:
        calibrate_mod = importlib.import_module("controlplane.calibrate")
    except ImportError:  # the verifier fitting module is optional until it lands
        calibrate.set_defaults(calibrate_missing=True)
    else:
        calibrate_mod.add_arguments(calibrate)
    tune = cache_sub.add_parser(
        "tune-embedder", help="fine-tune the cache's embedder on labelled pairs, with its "
        "verifier")
    importlib.import_module("controlplane.tune_embedder").add_arguments(tune)
    scorer = cache_sub.add_parser(
        "tune-pair-scorer", help="train the cache's pair scorer (a cross-encoder the agents "
        "run) on labelled pairs, and stack it on the verifier")
    importlib.import_module("controlplane.pair_scorer_fit").add_arguments(scorer)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    # Read by gRPC when it is imported (ctl_client, later): its C core's INFO lines (a
    # failed TLS handshake) would come before synapsectl's own one-line error. A process
    # that imported gRPC already (a test calling main) keeps its environment as it is.
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        code = _main(argv, environ)
        sys.stdout.flush()      # inside the try: a closed pipe fails here, not at exit
    except BrokenPipeError:
        # The reader went away: Python would print a traceback, and another when it
        # flushes stdout at exit, unless stdout points somewhere that cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    return code


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.command or (args.command == "cache" and not args.cache_command):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "cache" and args.cache_command == "calibrate":
        if getattr(args, "calibrate_missing", False):
            print("synapsectl: error: cache calibrate is not available in this build",
                  file=sys.stderr)
            return EXIT_REFUSED
        return int(importlib.import_module("controlplane.calibrate").run(args))
    if args.command == "cache" and args.cache_command == "tune-embedder":
        return int(importlib.import_module("controlplane.tune_embedder").run(args))
    if args.command == "cache" and args.cache_command == "tune-pair-scorer":
        return int(importlib.import_module("controlplane.pair_scorer_fit").run(args))
    try:
        server, token = _connection(args, os.environ if environ is None else environ)
        from controlplane import ctl_client
        with ctl_client.AdminClient(server, token, tls=args.tls, ca_file=args.ca_file,
                                    timeout=args.timeout) as client:
            result = _dispatch(client, args)
    except UsageError as exc:
        print(f"synapsectl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # gRPC errors, rendered in one line
        from controlplane import ctl_client
        message = ctl_client.describe_error(exc, _what(args))
        if message is None:
            raise
        print(f"synapsectl: error: {message}", file=sys.stderr)
        return EXIT_REFUSED
    _print(result, args.output)
    return EXIT_OK


def _what(args: argparse.Namespace) -> str:
    """What the command asked the Admin service for, as typed (``cordon gpu-a``,
    ``get nodes``), for the line that says it was refused."""
    words = [args.command, getattr(args, "cache_command", None), getattr(args, "kind", None),
             getattr(args, "name", None) or getattr(args, "model", None)]
    return " ".join(str(w) for w in words if isinstance(w, str) and w)


def _print(result: ctl_render.Rendered, output: str) -> None:
    if output == "json":
        print(json.dumps(result.data, indent=2, sort_keys=False))
    elif output == "yaml":
        print(yaml.safe_dump(result.data, sort_keys=False).rstrip())
    else:
        print(result.table)


def _dispatch(client: Any, args: argparse.Namespace) -> ctl_render.Rendered:
    handlers: dict[str, Callable[[Any, argparse.Namespace], ctl_render.Rendered]] = {
        "get": _get, "describe": lambda c, a: ctl_render.node_detail(c.get_node(a.name)),
        "cordon": lambda c, a: _node_intent(c, a.name, "cordon", c.cordon(a.name, a.reason)),
        "uncordon": lambda c, a: _node_intent(c, a.name, "uncordon", c.uncordon(a.name)),
        "drain": lambda c, a: ctl_render.drain(c.drain(a.name, a.wait, a.timeout_seconds,
                                                       a.grace_seconds)),
        "deploy": lambda c, a: ctl_render.placements(c.deploy(a), "deployed"),
        "undeploy": lambda c, a: ctl_render.placements(c.undeploy(a.model, a.node), "removed"),
        "cache": lambda c, a: ctl_render.invalidated(c.invalidate(a.tenant, a.model, a.all)),
        "stats": lambda c, a: ctl_render.stats(c.stats()),
        "explain": lambda c, a: ctl_render.explain(
            c.explain(a.model, a.prompt, a.session, a.max_tokens, a.tenant, a.cache_salt)),
    }
    return handlers[args.command](client, args)


def _node_intent(client: Any, name: str, verb: str, detail: Any) -> ctl_render.Rendered:
    """A cordon's or uncordon's answer, saying so when no node of that name is known."""
    known = [n.name for n in client.list_nodes().nodes]
    if name in known:
        return ctl_render.node_detail(detail, registered=True)
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    print(f"synapsectl: warning: no node named {name!r} is registered{hint}; the {verb} is "
          "recorded and applies when a node of that name registers", file=sys.stderr)
    return ctl_render.node_detail(detail, registered=False)


def _duration(text: str) -> float:
    """Seconds in ``30s``, ``30m``, ``24h`` or ``7d`` (a bare number is seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 24h, 7d)"
                                         ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r}")
    return seconds


def _get(client: Any, args: argparse.Namespace) -> ctl_render.Rendered:
    if args.kind == "usage":
        return ctl_render.usage(client.usage(args.tenant, args.since))
    kind = args.kind.rstrip("s")
    if kind == "node":
        return ctl_render.nodes(client.list_nodes())
    if kind == "model":
        return ctl_render.models(client.list_models())
    return ctl_render.backends(client.list_models())

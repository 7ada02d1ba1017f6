"""``synapse simulator``: the vLLM / TEI stand-in.

Start-up: flags → ``cli.bootstrap`` overrides (flags beat ``--profile``, which beats the
config file and ``SYNAPSE_*``), build the app, listen, then print
``simulator listening on http://HOST:PORT`` (the real port when ``--port 0``) so a
supervisor can find it. SIGTERM or SIGINT → graceful shutdown, exit 0: stop accepting connections, give
in-flight generation :data:`SHUTDOWN_GRACE_S` to finish, abort the rest (their
connections close without an answer, never with a truncated one posing as complete),
close. uvloop when available.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from simulator import app as sim_app
from simulator import config, profiles
from simulator import tasks as sim_tasks
from synapse_common import cli

log = logging.getLogger("simulator")
SHUTDOWN_GRACE_S = 3.0
CLOSE_TIMEOUT_S = 1.0  # aiohttp's own wait for handlers once the engine is drained

FAULTS_HELP = """\
Faults can also be changed while running: POST /sim/faults with a JSON object using the
same names (error_rate, crash_after, hang, stall_after_chunks, stall_s, slow_start),
e.g. curl -d '{"error_rate": 0.5}' http://HOST:PORT/sim/faults ; GET /sim/faults shows
the current ones. Fault delays are wall seconds, not scaled by --time-scale."""

# flag dest -> dotted settings path
OVERRIDES = {
    "engine": "engine", "host": "host", "port": "port", "model": "model",
    "served_model_name": "served_model_names", "time_scale": "time_scale", "seed": "seed",
    "answer_origin": "answer_origin",
    "max_num_seqs": "profile.max_num_seqs", "num_gpu_blocks": "profile.num_gpu_blocks",
    "block_size": "profile.block_size", "max_model_len": "profile.max_model_len",
    "max_num_batched_tokens": "profile.max_num_batched_tokens",
    "prefill_s_per_token": "profile.prefill_s_per_token",
    "decode_base_s": "profile.decode_base_s", "decode_per_seq_s": "profile.decode_per_seq_s",
    "error_rate": "faults.error_rate", "crash_after": "faults.crash_after",
    "stall_after_chunks": "faults.stall_after_chunks", "stall_s": "faults.stall_s",
    "slow_start": "faults.slow_start_s", "embedder": "embedder",
    "max_client_batch_size": "max_client_batch_size", "embed_dim": "embed_dim",
    "max_input_length": "max_input_length", "task": "tasks", "max_audio_mb": "max_audio_mb",
    "responses_store": "responses_store",
}


def build_parser(prog: str = "synapse simulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, epilog=FAULTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the engine simulator, a vLLM / TEI stand-in for machines without "
                    "GPUs. Flags override the config file.")
    cli.add_common_args(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--engine", choices=("vllm", "tei", "speech"),
                   help="what to imitate: vllm (default), tei, or speech (a text-to-speech "
                        "server)")
    s.add_argument("--task", action="append", metavar="TASK",
                   help="what the engine serves; repeatable (default per engine: vllm "
                        f"{','.join(sim_tasks.DEFAULTS['vllm'])}; tei embed; speech speech). "
                        "Others: rerank, score, transcription (vllm), rerank (tei)")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port, 0 = pick one (default 8000)")
    s.add_argument("--model", help="model id")
    s.add_argument("--served-model-name", nargs="+", action="extend", metavar="NAME",
                   help="name(s) clients use; repeatable (default: --model)")
    s.add_argument("--seed", type=int, help="seed for deterministic output")
    s.add_argument("--answer-origin", action="store_true", default=None,
                   help="name the producing request in each whole answer (`origin`)")
    m = parser.add_argument_group("latency model")
    m.add_argument("--time-scale", type=float,
                   help="multiplies every modelled delay (0.01 = 100x faster; 0 = instant)")
    m.add_argument("--profile", metavar="NAME|FILE.yaml",
                   help=f"built-in profile ({', '.join(profiles.BUILTIN)}) or a YAML file "
                        "of profile fields")
    m.add_argument("--max-num-seqs", type=int, help="concurrent sequences")
    m.add_argument("--num-gpu-blocks", type=int, help="KV cache capacity in blocks")
    m.add_argument("--block-size", type=int, help="tokens per KV block")
    m.add_argument("--max-model-len", type=int, help="longest prompt + output")
    m.add_argument("--max-num-batched-tokens", type=int, help="token budget per step")
    m.add_argument("--prefill-s-per-token", type=float, help="prefill seconds per token")
    m.add_argument("--decode-base-s", type=float, help="decode step seconds at batch 1")
    m.add_argument("--decode-per-seq-s", type=float, help="added seconds per running seq")
    f = parser.add_argument_group("faults (also at run time: POST /sim/faults)")
    f.add_argument("--error-rate", type=float, help="fraction of requests answered 500")
    f.add_argument("--crash-after", type=int, metavar="N",
                   help="exit with status 3 after answering N requests")
    f.add_argument("--hang", action="store_true", default=None,
                   help="accept requests (and /health) and never answer")
    f.add_argument("--stall-after-chunks", type=int, metavar="N",
                   help="stop streams after N chunks, stay silent, then drop the connection")
    f.add_argument("--stall-s", type=float, help="silence before the drop (default 2 s)")
    f.add_argument("--slow-start", type=float, metavar="S",
                   help="/health answers 503 for the first S seconds")
    a = parser.add_argument_group("Responses and audio")
    a.add_argument("--responses-store", action="store_true", default=None,
                   help="keep /v1/responses answers in memory for previous_response_id "
                        "(vLLM's VLLM_ENABLE_RESPONSES_API_STORE)")
    a.add_argument("--max-audio-mb", type=float,
                   help="largest transcription upload in MiB (default 25, as vLLM)")
    t = parser.add_argument_group("TEI mode")
    t.add_argument("--embedder", choices=("hash", "minilm"),
                   help="hashed vectors (simulated, default) or all-MiniLM-L6-v2 in-process")
    t.add_argument("--max-client-batch-size", type=int, help="inputs per request (422 above)")
    t.add_argument("--max-input-length", type=int, help="tokens per input (413 above)")
    t.add_argument("--embed-dim", type=int, help="hashed-vector dimension")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    if args.profile:
        try:
            fields = profiles.load(args.profile)
        except profiles.ProfileError as exc:
            cli.fail(f"config error: {exc}")
        # One override per field: the profile merges into the file's, field by field.
        out.update({f"profile.{key}": value for key, value in fields.items()})
    for dest, path in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[path] = value
    if args.hang:
        out["faults.hang"] = True
    return out


async def serve(settings: config.SimulatorSettings) -> int:
    app = sim_app.build(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           handler_cancellation=True, shutdown_timeout=CLOSE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"simulator: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    port = _bound_port(runner, settings.port)
    _announce(settings, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    for running_site in list(runner.sites):
        await running_site.stop()  # no new connections while draining
    aborted = await sim_app.drain(app, SHUTDOWN_GRACE_S)
    if aborted:
        log.warning("aborted %d unfinished sequences at shutdown", aborted)
    await runner.cleanup()
    return 0


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback


def _announce(settings: config.SimulatorSettings, port: int) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    served = settings.served_model_names or [settings.model]
    # stdout, flushed: supervisors parse this line to find the port.
    print(f"simulator listening on http://{host}:{port}", flush=True)
    log.info("engine simulator (%s) serving %s, time scale %g, SIMULATED output",
             settings.engine, ", ".join(served), settings.time_scale)
    if sim_app.effective_max_model_len(settings) < settings.profile.max_model_len:
        log.warning("max_model_len clamped to %d: the KV cache (%d blocks of %d) holds no more",
                    sim_app.effective_max_model_len(settings), settings.profile.num_gpu_blocks,
                    settings.profile.block_size)


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # not on every platform; asyncio's loop works, only slower
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def main(argv: list[str] | None = None, prog: str = "synapse simulator") -> int:
    args = build_parser(prog).parse_args(argv)
    settings = cli.bootstrap(config.SimulatorSettings, args, overrides=overrides_from(args))
    with contextlib.suppress(KeyboardInterrupt):
        return _run(serve(settings))
    return 0

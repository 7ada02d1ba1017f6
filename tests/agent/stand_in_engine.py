"""A minimal vLLM stand-in for supervisor tests while (or where) the simulator is absent.

Accepts the simulator's command line (``--engine --host --port --model
--served-model-name --time-scale …``, unknown flags ignored), answers ``/health`` and a
vLLM V1 ``/metrics``. ``--exit-code N`` exits at once; ``--busy-file PATH`` reports one
running request while PATH exists (drain tests); ``--sick-file PATH`` makes ``/health``
answer 503 while PATH exists (liveness tests). With ``VLLM_API_KEY`` in its environment
it guards ``/health`` and ``/metrics`` with it (stricter than vLLM, as llama-server guards
``/metrics``) and prints its settings, key included, at start (as TEI does).
``--fail-while PATH`` exits with 3 at once while PATH exists (crash-loop tests);
``--grandchild-pid-file PATH`` starts a sleeping child first, as vLLM starts its engine
core, and writes its pid to PATH; ``--serve-in-child`` serves from a child process, as
vLLM's API server may (the port is then held by the engine's descendant).
``POST /v1/completions`` (the agent's warm-up) appends ``{"body", "authorization"}`` as
one JSON line to ``--completions-file PATH``, waits while ``--completions-hold PATH``
exists, and answers ``--completions-status`` (200 by default) with a one-token answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys

from aiohttp import web

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{model}"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{model}"}} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} 0.25
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",num_gpu_blocks="1000"}} 1.0
"""


def _busy(path: str | None) -> bool:
    return bool(path) and os.path.exists(path)  # a local stat: fine on the loop


def _append(path: str, line: str) -> None:
    with open(path, "a") as out:  # a local append: fine on the loop
        out.write(line + "\n")


def _guard(key: str) -> object:
    @web.middleware
    async def check(request: web.Request, handler: object) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.Response(status=401)
        return await handler(request)  # type: ignore[operator,no-any-return]
    return check


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--exit-code", type=int, default=None)
    parser.add_argument("--busy-file", default=None)
    parser.add_argument("--sick-file", default=None)
    parser.add_argument("--fail-while", default=None)
    parser.add_argument("--grandchild-pid-file", default=None)
    parser.add_argument("--serve-in-child", action="store_true")
    parser.add_argument("--completions-file", default=None)
    parser.add_argument("--completions-hold", default=None)
    parser.add_argument("--completions-status", type=int, default=200)
    args, _ = parser.parse_known_args()
    if args.exit_code is not None:
        print("stand-in engine: exiting at once", flush=True)
        return args.exit_code
    if _busy(args.fail_while):
        print("stand-in engine: failing while", args.fail_while, "exists", flush=True)
        return 3
    if args.grandchild_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path(args.grandchild_pid_file).write_text(str(child.pid))
    if args.serve_in_child:
        argv = [a for a in sys.argv if a != "--serve-in-child"]
        return subprocess.call([sys.executable, *argv])
    key = os.environ.get("VLLM_API_KEY")
    app = web.Application(middlewares=[_guard(key)] if key else [])
    if key:
        print(f"Args {{ port: {args.port}, api_key: Some(\"{key}\") }}", flush=True)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=503 if _busy(args.sick_file) else 200)

    app.router.add_get("/health", health)

    async def metrics(request: web.Request) -> web.Response:
        busy = _busy(args.busy_file)
        return web.Response(text=METRICS.format(model=args.model, running=float(busy)))

    app.router.add_get("/metrics", metrics)

    async def completions(request: web.Request) -> web.Response:
        seen = {"body": await request.json(),
                "authorization": request.headers.get("Authorization")}
        if args.completions_file:
            _append(args.completions_file, json.dumps(seen))
        while _busy(args.completions_hold):  # noqa: ASYNC110 - a file the test removes
            await asyncio.sleep(0.05)
        return web.json_response({"choices": [{"text": "!", "logprobs": {}}]},
                                 status=args.completions_status)

    app.router.add_post("/v1/completions", completions)
    print(f"stand-in engine on {args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

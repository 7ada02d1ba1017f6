"""``synapse up``: Synapse on one machine, in one command (embedded mode).

Starts the control plane and one node agent as child processes that talk real gRPC over
loopback — the same code paths as production. The agent runs a fake GPU source (chosen
explicitly), supervises the generation backend (the engine simulator; with ``--engine
vllm`` a real vLLM from the engine tier, see :mod:`controlplane.embedded_engine`; none with
``--upstream URL``, when a real OpenAI-compatible server stands behind Synapse) and
serves embeddings from the in-process all-MiniLM-L6-v2 model; the control plane keeps L1
in process and L2 in a Milvus Lite file under ``--data-dir``.

Keys: a dev API key, an admin key and the agent token (which the agent presents to the
control plane, and the control plane to the agent's Node service) are generated once and
kept in ``<data-dir>/secrets/`` (mode 0600); the configs refer to those files, so no key is
written into a config file or a log. ``--api-key`` uses a key of your choice instead.

Ctrl-C or SIGTERM stops the agent first (it drains and stops its engines), then the
control plane; every child runs in its own process group and is killed if it lingers.
A ``synapse up`` that dies without stopping them (SIGKILL, the OOM killer) takes them with
it: each child gets SIGTERM from the kernel when its parent dies
(:mod:`synapse_common.parent_death`), and the agent's engines follow the agent.

One stack per data dir: ``synapse up`` holds an exclusive ``flock`` on
``<data-dir>/up.lock`` for its whole life, and its children hold the same open file (a
flock belongs to it, so the kernel drops the lock only when the last of them has
exited, however they exit: a ``synapse up`` killed leaves children that drain for a
while). A second ``synapse up`` on the same data dir exits 1 saying which process holds
it, before it writes a config or starts a process: two stacks would share its journals,
its Milvus Lite file and its keys, and both would answer.

The children's output goes through a pipe into ``<data-dir>/logs/<name>.log``, capped
like the agent's engine logs (:mod:`synapse_common.capped_log`: 10 MiB, one ``.1`` kept),
instead of growing with every request for as long as the stack runs; the pipe is read
by a log keeper process per child (:mod:`controlplane.embedded_log`), which outlives a
killed ``synapse up`` until the child's output ends, so what children write while they
drain is kept. Their ERROR lines are echoed on this process's stderr too. Every wait of
the start ends at once when a child exits or an engine's start cannot succeed
(:class:`StartWatch`), printing the log's last lines and path. What is refused before
anything starts (``--config``, flag values out of range, ``SYNAPSE_*`` variables
overriding what the generated configs write) and those watches live in
:mod:`controlplane.embedded_checks`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any, cast

import yaml

from controlplane import embedded_checks, embedded_engine, embedded_log
from controlplane.core import upstream_kinds
from synapse_common import capped_log, cli, engines, parent_death
from synapse_common import clock as clocks
from synapse_common.ports import free_ports

DEFAULT_MODEL = embedded_engine.SIMULATOR_MODEL
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
START_TIMEOUT_S = 240.0
HEALTH_CHECK_TIMEOUT_S = 2.0
LOCK_FILE = "up.lock"
# How long a stopping child gets before SIGKILL. The control plane on a laptop has no
# load balancer to drain from (no drain delay) and gives its requests less than this.
CHILD_STOP_GRACE_S = 20.0
CONTROL_PLANE_STOP = {"drain_delay_s": 0.0, "shutdown_grace_s": CHILD_STOP_GRACE_S / 2}
# How long a report of a child's end waits for its log keeper to write the child's last
# lines (it ends at once unless a grandchild still holds the child's output).
KEEPER_DRAIN_S = 5.0


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run Synapse on this machine in one command: control plane, "
        "one agent (real gRPC over loopback), the engine simulator as the generation backend "
        "(or --upstream), the in-process embedder, in-process L1 and a Milvus Lite L2.")
    cli.add_common_args(parser)
    for action in parser._actions:      # argparse has no public way to reword a help
        if action.dest == "config":
            action.help = embedded_checks.CONFIG_HELP
    parser.add_argument("--data-dir", default="./.synapse", help="state, configs, keys, logs")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP API listens on")
    parser.add_argument("--http-port", type=embedded_checks.port_number, default=8080,
                        help="HTTP port (default: %(default)s; 0 = any free)")
    parser.add_argument("--grpc-port", type=embedded_checks.port_number, default=50051,
                        help="control-plane gRPC port (default: %(default)s; 0 = any free)")
    parser.add_argument("--engine", choices=("simulator", "vllm"), default="simulator",
                        help="the generation backend: the engine simulator, or a real vLLM "
                             "serving SmolLM2-135M on the CPU (install it once with "
                             "`make engines`)")
    parser.add_argument("--model", default=None,
                        help=f"model name served (default: {DEFAULT_MODEL} for the simulator, "
                             f"{engines.MODEL_NAME} for vLLM)")
    parser.add_argument("--alias", action="append", default=None,
                        help="alias of the model (default: llama for the simulator, smollm2 "
                             "for vLLM)")
    parser.add_argument("--upstream", metavar="URL",
                        help="a real OpenAI-compatible server to put behind Synapse instead of "
                             "the simulator (e.g. http://127.0.0.1:11434 for Ollama)")
    parser.add_argument("--upstream-kind", choices=sorted(upstream_kinds.KINDS),
                        help="what the --upstream server is: it decides the health probe "
                             "(ollama: /api/version; openai, a hosted API: GET /v1/models "
                             "with the key, once a minute) and the metrics read")
    parser.add_argument("--upstream-key-file", metavar="PATH",
                        help="file holding the --upstream server's API key (sent as "
                             "'Authorization: Bearer'; never written into a config or a log)")
    parser.add_argument("--upstream-model", metavar="NAME",
                        help="the --upstream server's own name for the model (e.g. "
                             "llama3.1:8b on Ollama); clients keep using --model and its "
                             "aliases, and answers carry the name they asked for")
    parser.add_argument("--time-scale", type=embedded_checks.time_scale, default=0.05,
                        help="simulator clock: 1 = real GPU timings, 0 = instant")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="PATH",
                     help="file holding the API key to use instead of a generated one")
    key.add_argument("--api-key", help="the API key to use instead of a generated one "
                                       "(visible to other local users in the process list: "
                                       "prefer --api-key-file)")
    parser.add_argument("--no-cache", action="store_true", help="turn the response cache off")
    return parser



def _port(requested: int, name: str, host: str, spare: int) -> int:
    """``requested``, checked free, or ``spare`` (a free port) when it is 0."""
    if requested == 0:
        return spare
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, requested))
        except OSError:
            cli.fail(f"synapse up: port {requested} ({name}) is in use: stop what holds it or "
                     f"pass --{name}-port 0 for a free one", code=1)
    return requested


def _secret_file(directory: pathlib.Path, name: str, value: str | None) -> pathlib.Path:
    path = directory / name
    if value is not None or not path.exists():
        path.write_text((value or f"sk-synapse-{secrets.token_urlsafe(24)}") + "\n")
    path.chmod(0o600)
    return path


def data_directory(path: pathlib.Path) -> pathlib.Path:
    """``path`` made ready as the data dir: created mode 0700, or an existing one of this
    user tightened to 0700 (said on stderr). It holds cached answers (L1 journal, L2),
    prompts (Milvus Lite), the cache feedback log and the logs, each written with the
    umask's mode: the directory's own mode is what keeps other local users out of all of
    them (its ``logs`` folder is made 0700 too). A directory of another user that others
    may enter is refused (exit 1), as is one that cannot be made or written (exit 2)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
        (path / "logs").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        cli.fail(f"synapse up: cannot use --data-dir {path}: {exc.strerror or exc}; choose a "
                 "folder this user can write", code=2)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        if path.stat().st_uid != os.getuid():
            cli.fail(f"synapse up: {path} belongs to another user and is open to others "
                     f"(mode {mode:04o}): it would hold cached answers and prompts; choose "
                     "a --data-dir of your own", code=1)
        path.chmod(0o700)
        print(f"synapse up: {path} was mode {mode:04o}; now 0700 (it holds cached answers "
              "and prompts)", file=sys.stderr, flush=True)
    return path


def chosen_api_key(args: argparse.Namespace) -> str | None:
    """The API key asked for (``--api-key-file``, else ``--api-key``, said to be visible
    in the process list), or None for a generated one."""
    if args.api_key_file:
        try:
            key = pathlib.Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            cli.fail(f"synapse up: cannot read --api-key-file: {exc.strerror}", code=2)
        if not key:
            cli.fail("synapse up: --api-key-file is empty", code=2)
        return key
    if args.api_key is not None:
        print("synapse up: --api-key is visible to other local users in the process list; "
              "--api-key-file keeps it out", file=sys.stderr, flush=True)
    return cast(str | None, args.api_key)


def _write_configs(args: argparse.Namespace, data: pathlib.Path, ports: dict[str, int],
                   gen: embedded_engine.Generation) -> dict[str, Any]:
    """The two configs written in ``data``, once no ``SYNAPSE_*`` variable of this shell
    overrides what they write (exit 2 naming it; the others are named once)."""
    secret_dir = data / "secrets"
    secret_dir.mkdir(parents=True, exist_ok=True)
    secret_dir.chmod(0o700)
    api_key_file = _secret_file(secret_dir, "dev-api-key", chosen_api_key(args))
    admin_key_file = _secret_file(secret_dir, "admin-key", None)
    agent_token = {"file": str(_secret_file(secret_dir, "agent-token", None))}
    cp: dict[str, Any] = {
        "replica_id": "embedded", "data_dir": str(data),
        "http": {"host": args.host, "port": ports["http"], **CONTROL_PLANE_STOP},
        "grpc": {"host": "127.0.0.1", "port": ports["grpc"]},
        "auth": {"admin_key": {"file": str(admin_key_file)}, "agent_token": agent_token,
                 "tenants": [{"name": "dev", "keys": [{"file": str(api_key_file)}]}]},
        "models": [{"name": gen.model, "aliases": gen.aliases}],
        "cache": {"enabled": not args.no_cache, "milvus_uri": str(data / "l2.db"),
                  "embed_model": EMBED_MODEL},
    }
    if args.upstream:
        cp["upstreams"] = [_upstream(args, gen.model)]
    agent = {
        "node_name": "local",
        "control_plane": {"addresses": [f"127.0.0.1:{ports['grpc']}"], "report_interval_s": 1,
                          "token": agent_token},
        "grpc": {"host": "127.0.0.1", "port": ports["node"],
                 "advertise_address": f"127.0.0.1:{ports['node']}"},
        "metrics": {"host": "127.0.0.1", "port": ports["metrics"]},
        "telemetry": {"source": "fake", "fake_gpus": [{"name": "Simulated GPU 80GB",
                                                       "memory_total_gb": 80}]},
        "backends": [gen.backend] if gen.backend else [],
        "embedder": {"kind": "minilm", "model": EMBED_MODEL},
        "supervisor": {"log_dir": str(data / "logs" / "engines"), "drain_grace_s": 5,
                       "stop_grace_s": 5, **gen.supervisor},
    }
    refused, others = embedded_checks.env_overrides((cp, agent), os.environ)
    if refused:
        cli.fail(embedded_checks.env_refused_message(refused), code=2)
    if notice := embedded_checks.env_notice(others, os.environ):
        print(notice, file=sys.stderr, flush=True)
    for name, doc in (("controlplane.yaml", cp), ("agent.yaml", agent)):
        (data / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"api_key": api_key_file.read_text().strip(), "admin_key_file": admin_key_file}


def _upstream(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The control plane's entry for ``--upstream`` and its ``--upstream-*`` options."""
    entry: dict[str, Any] = {"name": "upstream", "url": args.upstream, "models": [model]}
    if args.upstream_kind:
        entry["kind"] = args.upstream_kind
    if args.upstream_model:
        entry["model_names"] = {model: args.upstream_model}
    if args.upstream_key_file:
        entry["api_key"] = {"file": str(pathlib.Path(args.upstream_key_file).resolve())}
    return entry


def _check_upstream_args(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in ("upstream_kind", "upstream_key_file",
                                                        "upstream_model") if getattr(args, name)]
    if given and not args.upstream:
        cli.fail(f"synapse up: {', '.join(given)} need{'' if len(given) > 1 else 's'} --upstream URL",
                 code=2)
    if args.upstream and (problem := embedded_checks.upstream_url_problem(args.upstream)):
        cli.fail(f"synapse up: {problem}", code=2)
    key_file = args.upstream_key_file
    if key_file and not (os.access(key_file, os.R_OK) and pathlib.Path(key_file).is_file()):
        cli.fail(f"synapse up: --upstream-key-file {key_file}: not a readable file", code=2)


def embedder_serving(address: str) -> bool:
    """Whether the agent at ``address`` (plaintext gRPC) has its embedder loaded: its
    health service says ``synapse.v1.Node`` SERVING only then (open, no key needed)."""
    from controlplane import ctl_client
    return ctl_client.health_serving(address, "synapse.v1.Node", HEALTH_CHECK_TIMEOUT_S)


def serves(models: Any, model: str, backend: str | None) -> bool:
    """Whether ``models`` (a ListModelsResponse) has a routable backend of ``model`` named
    ``backend`` (any of its backends when None: a static upstream). Another model's
    backend does not count: deploys persist in the data dir and come back at the next
    start, ready long before a vLLM that is still loading."""
    return any(b.routable and (backend is None or b.backend == backend)
               for m in models.models if m.name == model for b in m.backends)


def generation_ready(grpc_addr: str, admin_key_file: pathlib.Path, model: str,
                     backend: str | None) -> bool:
    """:func:`serves`, asked of the control plane's Admin service with the admin key."""
    from controlplane import ctl_client
    try:
        with ctl_client.AdminClient(grpc_addr, admin_key_file.read_text().strip(),
                                    timeout=HEALTH_CHECK_TIMEOUT_S) as admin:
            return serves(admin.list_models(), model, backend)
    except Exception:   # grpc's RpcError (only ctl_client imports grpc), the key unread:
        return False    # not ready yet; the wait's time-out says what went wrong


def _cache_ready(base: str) -> bool:
    """Whether the control plane's /ready says it is ready: it waits, a bounded time,
    for the semantic cache's store to open (:mod:`controlplane.api.readiness`)."""
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=2) as resp:
            return int(resp.status) == 200
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError, AttributeError):
            return json.loads(exc.read()).get("reason") not in ("cache opening", None)
        return False
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return False


def hold_data_dir(data: pathlib.Path) -> IO[bytes]:
    """The data dir's lock, held until the returned file is closed or this process ends;
    exits 1 naming the holder when another ``synapse up`` has it."""
    lock = os.fdopen(os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().decode(errors="replace").strip() or "unknown"
        lock.close()
        cli.fail(f"synapse up: another synapse up (pid {holder}) is running with --data-dir "
                 f"{data}; stop it first (Ctrl-C there, or kill {holder}), or choose another "
                 "--data-dir", code=1)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock


class Child:
    """One child process in its own process group that dies with this one, its output
    kept in a size-capped log file by a log keeper process (:mod:`controlplane.embedded_log`)
    that outlives this one until the child's output ends."""

    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path,
                 max_log_bytes: int = capped_log.MAX_BYTES, keep_fds: tuple[int, ...] = ()
                 ) -> None:
        """``keep_fds``: descriptors the child holds open too (the data dir's lock)."""
        self.name = name
        self.log_path = log_path
        read, write = os.pipe()
        try:
            self._keeper = subprocess.Popen(
                embedded_log.command(name, log_path, max_log_bytes), stdin=read,
                stdout=subprocess.DEVNULL, start_new_session=True)
            # Unbuffered: what a Python child printed reaches its log even when it dies
            # by a signal (its logging flushes each record; print() would not).
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONUNBUFFERED": "1"}
            env.pop("SYNAPSE_CONFIG_PATH", None)
            self.popen = subprocess.Popen(argv, stdout=write, stderr=write,
                                          stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True, pass_fds=keep_fds,
                                          preexec_fn=parent_death.preexec())
        finally:
            os.close(read)
            os.close(write)     # the keeper's input ends when the child's output does

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        return embedded_checks.tail(self.log_path, lines)

    def ended(self, during: str = "") -> str | None:
        """None while the child runs; else its exit status, its log's path and last
        lines, read once its keeper wrote what the child left in the pipe. The one form
        every report of a child's end takes (``during``: " while waiting for …")."""
        if self.alive():
            return None
        self._keeper_done(KEEPER_DRAIN_S)
        return (f"{self.name} exited with status {self.popen.returncode}{during}; its last "
                f"lines ({self.log_path}):\n{self.tail()}")

    def _keeper_done(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the keeper to end (it goes on alone when a
        grandchild still holds the child's output)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._keeper.wait(timeout=timeout)

    def stop(self, grace_s: float) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._keeper_done(KEEPER_DRAIN_S)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


class Stopping(Exception):
    """Ctrl-C or SIGTERM arrived."""


class StartWatch:
    """What ends a start early, the one check every wait of the start makes: a child that
    exited, or (once the agent runs, :attr:`engines`) an engine whose start cannot
    succeed. Each says so at once, with the log's last lines and path, instead of at the
    end of the wait's time-out."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.engines: embedded_checks.EngineLogWatch | None = None

    def problem(self, what: str) -> str | None:
        """Why the start, waiting for ``what``, cannot succeed; None while it may."""
        if self.engines is not None and (log := self.engines.failing()) is not None:
            return (f"the engine cannot start (waiting for {what}); its last lines "
                    f"({log}):\n{embedded_checks.tail(log)}")
        for child in self.children:
            if (ended := child.ended(f" while waiting for {what}")) is not None:
                return ended
        return None


def _wait_for(what: str, ready: Callable[[], bool], watch: StartWatch, timeout: float
              ) -> None:
    """Wait for ``ready``; RuntimeError when ``watch`` sees a problem, or at ``timeout``."""
    print(f"  … {what}", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            print(f"  ✓ {what}", flush=True)
            return
        if (problem := watch.problem(what)) is not None:
            raise RuntimeError(problem)
        clocks.block(0.2)
    logs = f"; see the logs in {watch.children[0].log_path.parent}" if watch.children else ""
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{logs}")


def _banner(base: str, api_key: str, model: str, admin_key_file: pathlib.Path,
            grpc_addr: str, bin_dir: pathlib.Path) -> str:
    """What to paste: the venv's own python and synapsectl by path (neither is on PATH
    outside make, and only the venv has the openai client: the ``client`` extra)."""
    return f"""
Synapse is ready (embedded mode).

  Endpoint:  {base}/v1
  API key:   {api_key}
  Model:     {model}

  curl -i {base}/v1/chat/completions \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "temperature": 0, "messages": [{{"role": "user", "content": "Hello!"}}]}}'
  (run it twice: the second answer carries x-synapse-cache: hit-exact)

  {bin_dir / "python"} -c 'from openai import OpenAI
c = OpenAI(base_url="{base}/v1", api_key="{api_key}")
print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

  SYNAPSE_ADMIN_ADDR={grpc_addr} SYNAPSE_ADMIN_TOKEN_FILE={admin_key_file} {bin_dir / "synapsectl"} get nodes
  curl -s {base}/metrics -H "Authorization: Bearer $(cat {admin_key_file})" | head
  (/metrics lists every tenant's traffic: it takes the admin key, not an API key)

Press Ctrl-C to stop.
""".rstrip()


def main(argv: list[str] | None = None, prog: str = "synapse up") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.config:
        cli.fail(embedded_checks.CONFIG_REFUSED, code=2)
    if args.upstream and args.engine != "simulator":
        cli.fail("synapse up: --upstream and --engine exclude each other", code=2)
    _check_upstream_args(args)
    data = data_directory(pathlib.Path(args.data_dir).resolve())
    lock = hold_data_dir(data)      # held for the life of the process
    # Five distinct ports at once (two free_port() calls may return the same one).
    spare = free_ports(5, avoid={args.http_port, args.grpc_port})
    ports = {"http": _port(args.http_port, "http", args.host, spare[0]),
             "grpc": _port(args.grpc_port, "grpc", "127.0.0.1", spare[1]),
             "node": spare[2], "metrics": spare[3], "engine": spare[4]}
    try:
        gen = embedded_engine.choose(args, ports["engine"])
    except engines.EngineTierMissing as exc:
        cli.fail(f"synapse up --engine vllm: {exc}", code=1)
    written = _write_configs(args, data, ports, gen)
    bin_dir = pathlib.Path(sys.executable).parent
    synapse = str(bin_dir / "synapse") if (bin_dir / "synapse").exists() else "synapse"
    extra: list[str] = []
    if args.log_format:
        extra += ["--log-format", args.log_format]
    if args.log_level:
        extra += ["--log-level", args.log_level]

    def on_signal(signum: int, frame: object) -> None:
        raise Stopping()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watch = StartWatch()
    children = watch.children
    held = (lock.fileno(),)         # the children hold the data dir as long as they live
    base = f"http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{ports['http']}"
    print(f"Starting Synapse (embedded mode) in {data}", flush=True)
    try:
        children.append(Child("control plane", [synapse, "controlplane", "--config",
                                                str(data / "controlplane.yaml"), *extra],
                              data / "logs" / "controlplane.log", keep_fds=held))
        _wait_for(f"control plane on {base}", lambda: _http_status(f"{base}/health") == 200,
                  watch, 60)
        watch.engines = embedded_checks.EngineLogWatch(data / "logs" / "engines")
        children.append(Child("agent", [synapse, "agent", "--config", str(data / "agent.yaml"),
                                        *extra], data / "logs" / "agent.log", keep_fds=held))
        grpc_addr = f"127.0.0.1:{ports['grpc']}"
        backend = gen.backend["name"] if gen.backend else None
        _wait_for(f"{gen.what} ready", lambda: generation_ready(
            grpc_addr, written["admin_key_file"], gen.model, backend), watch, START_TIMEOUT_S)
        # The agent loads the embedding model in the background; the semantic cache and
        # /v1/embeddings need it, so "ready" waits for it: asked of the agent's gRPC
        # health service, not with the dev key (each try would be the tenant's usage).
        _wait_for("embedder loaded", lambda: embedder_serving(f"127.0.0.1:{ports['node']}"),
                  watch, START_TIMEOUT_S)
        if not args.no_cache:
            _wait_for("semantic cache store open", lambda: _cache_ready(base), watch,
                      START_TIMEOUT_S)
        print(_banner(base, written["api_key"], gen.model, written["admin_key_file"],
                      grpc_addr, bin_dir), flush=True)
        while all(c.alive() for c in children):
            clocks.block(0.5)
        dead = next(c for c in children if not c.alive())
        print(f"\n{dead.ended()}", file=sys.stderr)
        return 1
    except Stopping:
        print("\nStopping…", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"synapse up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):  # the agent first: it drains its engines
            child.stop(grace_s=CHILD_STOP_GRACE_S)
        lock.close()                # the next synapse up on this data dir may start
        print("Stopped.", flush=True)

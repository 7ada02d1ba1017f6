"""Fleet helpers shared by the reliability and security suites and by ``bench/chaos.py``.

A *fleet* is made of real processes started through :class:`tests.harness.ProcessPool`:
``synapse controlplane`` replicas, ``synapse agent`` nodes supervising ``synapse
simulator`` engines, TEI-mode simulators, redis-server. This module writes their config
files (one place, so every suite agrees on ports, keys and the time scale), starts them
and offers the few probes the suites need (admin stats, raw HTTP, secret scanning).

Design decisions:

* Keys are long random-looking literals per fleet; :func:`scan_for_secrets` greps every
  log file the pool produced (and any error bodies a test collected) for them, so a
  leak anywhere in a suite fails that suite.
* Raw HTTP goes through :mod:`http.client` / sockets, not the openai client, where a test
  must send bytes no client library would (invalid UTF-8, header injection).
* Engines run with a small ``--time-scale`` so that tests spend seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import pathlib
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from synapse_common import engine_key
from tests import harness

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
EMBED = "BAAI/bge-small-en-v1.5"
TENANT_KEY = "sk-rel-team-7f3a9c1e5b2d4f60"
OTHER_KEY = "sk-rel-other-2c8e4a6b0d1f3e57"
ADMIN_KEY = "sk-rel-admin-9e1b7d3c5a2f4e68"
UPSTREAM_KEY = "sk-rel-upstream-4d6f8a0c2e1b3d59"
REDIS_PASSWORD = "rel-redis-pw-6a8c0e2f4b1d3e57"
AGENT_TOKEN = "rel-agent-token-8c2e4a6f0b1d3957"
# the keys the agent's engines require are its own, new at every start
# (harness.engine_key_at reads one); the key derived from AGENT_TOKEN is what an older
# agent's engines required, and a secret all the same
SECRETS = (TENANT_KEY, OTHER_KEY, ADMIN_KEY, UPSTREAM_KEY, REDIS_PASSWORD, AGENT_TOKEN,
           engine_key.derive(AGENT_TOKEN) or "")


def write_yaml(path: pathlib.Path, data: dict[str, Any]) -> pathlib.Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ``SYNAPSE_TEST_WORKERS=N`` (``make test``'s pass over the serving suites): every fleet
# control plane runs as a pod of N serving processes (``http.workers``) where its state can
# be shared; one without Redis gets a database of the session's redis-server
# (``tests/conftest.py``), which sets :data:`POD_REDIS`.
WORKERS = int(os.environ.get("SYNAPSE_TEST_WORKERS", "1"))
POD_REDIS: list[str] = []       # the session's redis-server URL (without a database)
_databases = itertools.count(1)


def as_pod(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``http.workers`` = :data:`WORKERS` when it can run as a pod."""
    if WORKERS <= 1 or "workers" in cfg.get("http", {}):
        return cfg
    from controlplane import config, workers
    if not (cfg.get("redis") or {}).get("url") and POD_REDIS:
        cfg["redis"] = {**cfg.get("redis", {}),
                        "url": f"{POD_REDIS[0]}/{next(_databases) % 16}"}
    if workers.why_one(config.ControlPlaneSettings.model_validate(cfg)) is None:
        cfg.setdefault("http", {})["workers"] = WORKERS
    return cfg


def controlplane_config(name: str, http_port: int, grpc_port: int, data_dir: pathlib.Path,
                        **sections: Any) -> dict[str, Any]:
    """A control-plane config on loopback with two tenants and the admin key (a pod of
    :data:`WORKERS` processes where it can be)."""
    cfg: dict[str, Any] = {
        "replica_id": name, "data_dir": str(data_dir),
        "http": {"host": "127.0.0.1", "port": http_port, "max_body_bytes": 1024 * 1024,
                 "upstream_first_byte_timeout_s": 5.0, "upstream_idle_timeout_s": 5.0},
        "grpc": {"host": "127.0.0.1", "port": grpc_port},
        "auth": {"admin_key": ADMIN_KEY, "agent_token": AGENT_TOKEN, "tenants": [
            {"name": "team", "keys": [TENANT_KEY]},
            {"name": "other", "keys": [OTHER_KEY]}]},
        "models": [{"name": MODEL, "aliases": ["llama"]}],
        "registry": {"node_down_after_s": 3, "upstream_probe_interval_s": 0.5},
        "cache": {"semantic_enabled": False},
        "logging": {"level": "info"},
    }
    harness.with_sections(cfg, sections)
    return as_pod(cfg)


def simulator_argv(port: int, model: str = MODEL, *extra: str,
                   time_scale: float = 0.01) -> list[str]:
    return ["synapse", "simulator", "--host", "127.0.0.1", "--port", str(port), "--model",
            model, "--time-scale", str(time_scale), *extra]


@dataclasses.dataclass(frozen=True)
class Simulated:
    """A control plane in front of one simulator, routing to it (:func:`start_simulated`)."""
    cp: harness.ManagedProcess
    base: str               # the control plane's HTTP URL
    grpc_port: int
    sim_url: str


def start_simulated(pool: harness.ProcessPool, tmp_path: pathlib.Path, *,
                    time_scale: float = 0.01, env: dict[str, str] | None = None,
                    name: str = "cp", **sections: Any) -> Simulated:
    """A simulator serving :data:`MODEL` and a control plane whose one upstream it is
    (named ``name``, ``sections`` merged into :func:`controlplane_config`'s, ``env`` its
    environment), started in ``pool`` and waited for until it routes to the simulator."""
    sim = harness.free_port()
    sim_url = f"http://127.0.0.1:{sim}"
    pool.start("sim", simulator_argv(sim, MODEL, time_scale=time_scale),
               ready_url=sim_url + "/health")
    port, grpc = harness.free_port(), harness.free_port()
    cfg = controlplane_config(name, port, grpc, tmp_path / "cp-data", **{
        "upstreams": [{"name": "sim", "url": sim_url, "models": [MODEL]}], **sections})
    base = f"http://127.0.0.1:{port}"
    cp = pool.start("cp", ["synapse", "controlplane", "--config",
                           str(write_yaml(tmp_path / "cp.yaml", cfg))],
                    env=env, ready_url=base + "/health")
    harness.wait_until(lambda: backends_ready(base) == 1, 30, "the simulator", proc=cp)
    return Simulated(cp, base, grpc, sim_url)


def tei_argv(port: int, model: str = EMBED) -> list[str]:
    return ["synapse", "simulator", "--engine", "tei", "--host", "127.0.0.1", "--port",
            str(port), "--model", model]


def agent_config(node: str, cp_grpc: Sequence[str], engines: dict[str, int], log_dir: pathlib.Path,
                 *, time_scale: float = 0.01, tei_url: str | None = None,
                 embed_model: str = EMBED, node_port: int = 0) -> dict[str, Any]:
    """An agent on loopback supervising one simulator per entry of ``engines`` (name→port)."""
    sim = str(harness.VENV_BIN / "synapse")
    backends = [{"name": n, "engine": "simulator", "model": MODEL, "served_model_names": [MODEL],
                 "port": port, "extra_args": ["--time-scale", str(time_scale)]}
                for n, port in engines.items()]
    cfg: dict[str, Any] = {
        "node_name": node,
        "control_plane": {"addresses": list(cp_grpc), "report_interval_s": 0.5,
                          "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                          "token": AGENT_TOKEN},
        "grpc": {"host": "127.0.0.1", "port": node_port or harness.free_port()},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "telemetry": {"source": "fake", "interval_s": 1},
        "supervisor": {"log_dir": str(log_dir), "scrape_interval_s": 0.5,
                       "probe_interval_s": 0.5, "probe_timeout_s": 1.0,
                       "unhealthy_after": 2, "backoff_initial_s": 0.2, "backoff_max_s": 1.0,
                       "stop_grace_s": 2.0, "drain_grace_s": 2.0,
                       "simulator_command": [sim, "simulator"]},
        "backends": backends,
    }
    port = cfg["grpc"]["port"]
    cfg["grpc"]["advertise_address"] = f"127.0.0.1:{port}"
    if tei_url:
        cfg["embedder"] = {"kind": "tei", "tei_url": tei_url, "model": embed_model,
                           "request_timeout_s": 2.0}
    return cfg


# -- probes -------------------------------------------------------------------------------


def get_json(url: str, key: str | None = ADMIN_KEY, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stats(base_url: str) -> dict[str, Any]:
    return dict(get_json(f"{base_url}/api/v1/stats"))


def backends_ready(base_url: str) -> int:
    try:
        return int(stats(base_url)["backends_ready"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return -1


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def is_envelope(self) -> bool:
        """True when the body is the OpenAI error envelope."""
        try:
            data = self.json()
        except ValueError:
            return False
        err = data.get("error") if isinstance(data, dict) else None
        return (isinstance(err, dict) and isinstance(err.get("message"), str)
                and isinstance(err.get("type"), str) and "param" in err and "code" in err)


def request(base_url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, key: str | None = TENANT_KEY,
            timeout: float = 30.0) -> Reply:
    """One raw HTTP request (bytes as given); the response whatever its status."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_exchange(base_url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh socket and read what comes back until the server closes
    or goes quiet (for requests no HTTP library will build)."""
    host, port = base_url.removeprefix("http://").split(":")
    out = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except TimeoutError:
            pass
    return out


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def chat_body(content: str = "Hello there", **extra: Any) -> bytes:
    return json.dumps({"model": "llama", "max_tokens": 4,
                       "messages": [{"role": "user", "content": content}], **extra}).encode()


def still_serving(base_url: str) -> None:
    """Assert the gateway still answers a plain chat completion after an abuse."""
    reply = request(base_url, "POST", "/v1/chat/completions", chat_body("still there?"))
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.json()["choices"][0]["message"]["content"]


def node_embeds(address: str) -> bool:
    """True once an agent's ``Node.Embed`` answers (its model loads after start-up)."""
    import grpc

    from protos.synapse.v1 import node_pb2, node_pb2_grpc
    from tests import node_auth
    with node_auth.channel(address) as channel:
        try:
            node_pb2_grpc.NodeStub(channel).Embed(node_pb2.EmbedRequest(texts=["ping"]),
                                                  timeout=5)
        except grpc.RpcError:
            return False
    return True


# -- secrets ------------------------------------------------------------------------------


def scan_for_secrets(paths: Iterable[pathlib.Path], texts: Iterable[str | bytes] = (),
                     secrets: Sequence[str] = SECRETS) -> list[str]:
    """Where any secret appears: ``file:line`` for log files, ``body #i`` for texts."""
    found: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1):
            found.extend(f"{path.name}:{n}: {s[:10]}…" for s in secrets if s in line)
    for i, text in enumerate(texts):
        s_text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        found.extend(f"body #{i}: {s[:10]}…" for s in secrets if s in s_text)
    return found


def log_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*.log") if p.is_file())


# -- TLS ------------------------------------------------------------------------------------


def self_signed_cert(folder: pathlib.Path, host: str = "127.0.0.1") -> tuple[str, str]:
    """A self-signed certificate for ``host`` (as IP SAN and CN) made with the openssl CLI."""
    openssl = harness.tool("openssl", "the TLS tests need its CLI: apt-get install openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host},DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)

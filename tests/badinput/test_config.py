"""Malformed config files stop every command with exit code 2 and one line that names
the file and the field — no traceback, and no configured secret in the message.

The real console scripts are run (``synapse controlplane|agent|simulator --config F``):
what an operator sees is what is tested.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from tests import fleet, harness

S = fleet.ADMIN_KEY
CASES = [
    # (command, file content, text the one line must contain)
    ("controlplane", "http:\n  port: abc\n", "http.port"),
    ("controlplane", "http: [1, 2\n", "expected"),
    ("controlplane", "- a\n- b\n", "mapping"),
    ("controlplane", "htpp:\n  port: 1\n", "htpp"),
    ("controlplane", "http:\n  prot: 1\n", "http.prot"),
    ("controlplane", "http:\n  port: 70000\n", "http.port"),
    ("controlplane", "auth:\n  admin_key: {file: /nonexistent/key}\n", "auth.admin_key"),
    ("controlplane", f"auth:\n  admin_key: {{literal: {S}}}\n", "auth.admin_key"),
    ("controlplane", f"auth:\n  admin_key: [{S}]\n", "auth.admin_key"),
    ("controlplane", f"auth:\n  tenants:\n  - name: a\n    keys: [{S}]\n"
                     "    requests_per_second: fast\n", "requests_per_second"),
    ("controlplane", f"auth:\n  tenants:\n  - {{name: a, keys: [{S}]}}\n  - {{name: a}}\n",
     "duplicate tenant"),
    ("controlplane", f"auth:\n  tenants:\n  - {{name: a, keys: {S}}}\n", "auth.tenants.0.keys"),
    ("controlplane", f"auth:\n  agent_token: {{literal: {S}, extra: 1}}\n", "auth.agent_token"),
    ("controlplane", "upstreams:\n- {name: x, url: 'ftp://h', models: [m]}\n", "upstreams.0.url"),
    # a tab in user:password@ works (the client drops it) but got the password past the mask
    ("controlplane", f'upstreams:\n- {{name: x, url: "http://u:{S}\\t@h", models: [m]}}\n',
     "upstreams.0.url: holds whitespace or control characters"),
    ("controlplane", f"upstreams:\n- {{name: x, url: 'http://u:{S} @h', models: [m]}}\n",
     "upstreams.0.url: holds whitespace"),
    ("controlplane", "upstreams:\n- {name: x, url: 'http://a', models: [m]}\n"
                     "- {name: x, url: 'http://b', models: [m]}\n", "upstreams[1].name"),
    ("controlplane", "models:\n- {name: a, fallbacks: [b]}\n- {name: b, fallbacks: [a]}\n",
     "a cycle: a -> b -> a"),
    ("controlplane", "models:\n- {name: a, fallbacks: [nowhere]}\n", "models[0].fallbacks"),
    ("controlplane", "upstreams:\n- {name: x, url: 'http://a', models: [m], kind: ollma}\n",
     "upstreams.0.kind"),
    # a large request would time out holding seats instead of going on
    ("controlplane", "fairness:\n  queue: {deadline_s: 5, max_seat_hold_s: 5}\n",
     "fairness.queue: max_seat_hold_s (5) is not below deadline_s (5)"),
    # one half of a TLS pair used to serve plain text, saying nothing
    ("controlplane", "http:\n  tls_cert_file: /etc/tls/tls.crt\n", "http: tls_key_file"),
    ("controlplane", "grpc:\n  tls_key_file: /etc/tls/tls.key\n", "grpc: tls_cert_file"),
    ("controlplane", "\x00\x01binary\xff", ""),
    ("agent", "backends:\n- {name: 'Bad Name', engine: simulator, model: m}\n", "backends.0.name"),
    ("agent", "control_plane:\n  report_interval_s: -1\n", "control_plane.report_interval_s"),
    ("agent", f"control_plane:\n  token: [{S}]\n", "control_plane.token"),
    ("simulator", "faults:\n  error_rate: 2\n", "faults.error_rate"),
    ("simulator", "{{{{", ""),
    # a repeated key used to replace the first silently: this second auth: opened the API,
    # the admin key and the tenants gone (found by the operator probe)
    ("controlplane", f"auth:\n  admin_key: {S}\nmodels: []\nauth:\n  enabled: false\n",
     "line 4: duplicate key 'auth' (first at line 1"),
    ("controlplane", "http:\n  host: 127.0.0.1\n  port: 1\n  host: 0.0.0.0\n",
     "line 4: duplicate key 'host' in http"),
    ("controlplane", f"auth:\n  tenants:\n  - name: a\n    keys: [{S}]\n    name: b\n",
     "line 5: duplicate key 'name' in auth.tenants.0"),
    ("agent", "node_name: a\nnode_name: b\n", "line 2: duplicate key 'node_name'"),
    ("simulator", "faults:\n  error_rate: 0\nfaults: {}\n", "line 3: duplicate key 'faults'"),
    # YAML's .inf passed every "> 0" check: cache entries kept for ever
    ("controlplane", "cache:\n  ttl_s: .inf\n", "cache.ttl_s: input should be a finite number"),
    ("controlplane", "fairness:\n  queue:\n    deadline_s: .inf\n", "fairness.queue.deadline_s"),
    ("agent", "control_plane:\n  report_interval_s: .inf\n", "control_plane.report_interval_s"),
    # a file: started, with only a later error about usage_pending.jsonl
    ("controlplane", "data_dir: /dev/null\n", "data_dir: exists and is no directory"),
    # gRPC takes a C int: above, the server did not start (OverflowError)
    ("controlplane", "grpc:\n  max_message_bytes: 99999999999999999999\n",
     "grpc.max_message_bytes"),
    # aiohttp's C parser takes an unsigned long: above, every request failed
    ("controlplane", "http:\n  max_header_bytes: 99999999999999999999999\n",
     "http.max_header_bytes"),
]


@pytest.mark.parametrize(("command", "content", "names"), CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_malformed_config_exits_2_with_one_line(tmp_path: pathlib.Path, command: str,
                                                content: str, names: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content.encode("utf-8", "surrogateescape")
                     if "\xff" not in content else content.encode("latin-1"))
    done = subprocess.run([harness.console_script("synapse"), command, "--config", str(path)],
                          capture_output=True, text=True, timeout=60, errors="replace")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("config error:") and str(path) in lines[0], lines[0]
    assert names in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert S not in done.stderr + done.stdout


def test_missing_config_file_is_named(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.yaml"
    done = subprocess.run([harness.console_script("synapse"), "controlplane", "--config",
                           str(missing)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and str(missing) in done.stderr, done.stderr


def _refused(path: pathlib.Path) -> str:
    done = subprocess.run([harness.console_script("synapse"), "controlplane", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and S not in done.stderr + done.stdout
    return lines[0]


@pytest.mark.parametrize("where", ["tenants", "key_file"])
def test_an_admin_key_that_is_a_tenants_key_stops_the_control_plane(
        tmp_path: pathlib.Path, where: str) -> None:
    """The control plane used to start, and that tenant's key then read every tenant's
    stats and deployed and drained over Admin gRPC."""
    tenant = f"- {{name: a, keys: [{S}]}}\n"
    auth = f"auth:\n  allow_unauthenticated_agents: true\n  admin_key: {S}\n"
    if where == "key_file":
        (tmp_path / "keys.yaml").write_text(tenant)
        auth += f"  key_file: {tmp_path / 'keys.yaml'}\n"
    else:
        auth += "  tenants:\n  " + tenant
    (tmp_path / "config.yaml").write_text(auth)
    line = _refused(tmp_path / "config.yaml")
    assert "auth.admin_key" in line and "tenant 'a'" in line, line


def test_a_short_response_id_key_stops_the_control_plane(tmp_path: pathlib.Path) -> None:
    """A one-character key signed every /v1/responses id: guessed from one id offline,
    it would let a tenant continue another's conversation."""
    (tmp_path / "config.yaml").write_text(
        "auth:\n  allow_unauthenticated_agents: true\n  response_id_key: sk-s3cr\n")
    line = _refused(tmp_path / "config.yaml")
    assert "response_id_key" in line and "16 characters" in line and "sk-s3cr" not in line


def test_a_bad_tenant_in_the_key_file_is_one_line_that_quotes_no_key(
        tmp_path: pathlib.Path) -> None:
    """pydantic's own message spans lines and quotes the input: a key, there."""
    (tmp_path / "keys.yaml").write_text(f"- {{name: a, keys: {S}}}\n")
    (tmp_path / "config.yaml").write_text(
        f"auth:\n  allow_unauthenticated_agents: true\n  key_file: {tmp_path / 'keys.yaml'}\n")
    line = _refused(tmp_path / "config.yaml")
    assert "auth.key_file" in line and "tenant 0" in line and "keys" in line, line


@pytest.mark.parametrize(("section", "field"), [
    ("  admin_key: {file: EMPTY}\n", "admin_key"),
    ("  agent_token: {file: EMPTY}\n", "agent_token"),
    ("  tenants:\n  - {name: a, keys: [{file: EMPTY}]}\n", "keys.0"),
    ("  key_file: KEYS\n", "keys.0"),
])
def test_an_empty_secret_file_stops_the_control_plane(tmp_path: pathlib.Path, section: str,
                                                      field: str) -> None:
    """A secret file that exists but is empty (a Secret key with no value) used to start a
    control plane that acted as if the secret were absent, saying nothing: the tenant
    could never authenticate, the admin routes refused every call, no agent registered
    (found by the operator probe)."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    (tmp_path / "keys.yaml").write_text(f"- {{name: a, keys: [{{file: {empty}}}]}}\n")
    (tmp_path / "config.yaml").write_text(
        "auth:\n  allow_unauthenticated_agents: true\n"
        + section.replace("EMPTY", str(empty)).replace("KEYS", str(tmp_path / "keys.yaml")))
    line = _refused(tmp_path / "config.yaml")
    assert field in line and "is empty" in line, line


@pytest.mark.parametrize(("section", "field"), [("http", "tls_cert_file"),
                                                ("grpc", "tls_key_file")])
def test_a_tls_file_that_cannot_be_read_is_named(tmp_path: pathlib.Path, section: str,
                                                 field: str) -> None:
    """It used to start and fail at listen with '[Errno 2] No such file or directory',
    naming neither the setting nor the path."""
    missing = tmp_path / "missing.pem"
    present = tmp_path / "present.pem"
    present.write_text("not a certificate")
    other = "tls_key_file" if field == "tls_cert_file" else "tls_cert_file"
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {field}: {missing}\n  {other}: {present}\n"
                    "auth:\n  allow_unauthenticated_agents: true\n")
    line = _refused(path)
    assert f"{section}.{field}" in line and str(missing) in line, line


def test_an_http_tls_pair_that_does_not_load_is_named(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    path = tmp_path / "config.yaml"
    path.write_text(f"http:\n  tls_cert_file: {cert}\n  tls_key_file: {key}\n"
                    "auth:\n  allow_unauthenticated_agents: true\n")
    assert "http.tls_cert_file / http.tls_key_file" in _refused(path)


def test_a_repeated_key_in_the_key_file_is_named(tmp_path: pathlib.Path) -> None:
    """The key file is read by the same loader: a tenant whose second ``keys:`` replaced
    the first would have lost keys without a word."""
    (tmp_path / "keys.yaml").write_text(f"- name: a\n  keys: [{S}]\n  keys: []\n")
    (tmp_path / "config.yaml").write_text(
        f"auth:\n  allow_unauthenticated_agents: true\n  key_file: {tmp_path / 'keys.yaml'}\n")
    line = _refused(tmp_path / "config.yaml")
    assert "auth.key_file" in line and str(tmp_path / "keys.yaml") in line, line
    assert "line 3: duplicate key 'keys' in 0" in line, line


def test_an_open_api_and_a_limit_for_no_model_are_said_at_start(
        tmp_path: pathlib.Path) -> None:
    """``auth.enabled: false`` used to start without a word while every tenant's key and
    limit was ignored; a tenant's limit for a model nothing serves (a typo) likewise."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data_dir: {tmp_path / 'data'}\nhttp: {{host: 127.0.0.1, port: 0}}\n"
        "grpc: {host: 127.0.0.1, port: 0}\nmodels: [{name: m, aliases: [mm]}]\n"
        "auth:\n  enabled: false\n  tenants:\n"
        f"  - {{name: a, keys: [{S}], models: {{mm: {{tokens_per_minute: 5}}, "
        "nosuch: {tokens_per_minute: 5}}}\n"
        "  - {name: b, key_sha256: ['" + "0" * 64 + "']}\n")
    proc = harness.ManagedProcess("cp", [harness.console_script("synapse"), "controlplane",
                                         "--config", str(path)], tmp_path / "cp.log")
    try:
        harness.wait_until(lambda: "listening" in proc.output(), 60, "the control plane",
                           proc=proc)
    finally:
        proc.stop()
    out = (tmp_path / "cp.log").read_text(errors="replace")
    warnings = [line for line in out.splitlines() if " WARNING " in line]
    assert any("auth.enabled is false: /v1 is open" in w and "2 configured tenants (2 keys)"
               in w for w in warnings), out
    assert any("auth.tenants[a].models: 'nosuch' is no configured model" in w
               for w in warnings), out
    assert not any("'mm'" in w for w in warnings), out
    assert S not in out


def test_a_redis_url_of_another_scheme_is_named_never_quoted(tmp_path: pathlib.Path) -> None:
    """The Redis client's own error ('Redis URL must specify one of the following
    schemes') named neither the file nor the setting."""
    path = tmp_path / "config.yaml"
    path.write_text(f"redis:\n  url: 'http://user:{S}@127.0.0.1:1/0'\n"
                    "auth:\n  allow_unauthenticated_agents: true\n")
    line = _refused(path)
    assert line == ("config error: redis.url: must start with redis://, rediss://, unix:// "
                    "(the Redis client takes no other)"), line

"""What ``synapse up`` refuses before it starts anything (``--config``, bad flag values,
``SYNAPSE_*`` variables that override what it writes) and what it watches while its
children run (their ERROR lines on its terminal, an engine whose start cannot succeed)."""

from __future__ import annotations

import io
import pathlib
import sys

import pytest

from controlplane import embedded, embedded_checks, embedded_engine


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """``synapse up argv``'s exit-2 message (it must exit 2 before starting anything)."""
    with pytest.raises(SystemExit) as stop:
        embedded.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_config_is_refused_not_silently_ignored(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`synapse up --config /nonexistent` started with the generated configs, silently."""
    err = refused(capsys, ["--config", "/nonexistent", "--data-dir", str(tmp_path / "d")])
    assert "--config is not used" in err and "writes its own" in err
    assert not (tmp_path / "d").exists()
    assert "not accepted by synapse up" in embedded.build_parser("synapse up").format_help()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "fast"])
def test_a_bad_time_scale_is_refused_naming_the_flag(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    """`--time-scale -1` waited 240 s while the simulator crash-looped on it."""
    err = refused(capsys, [f"--time-scale={value}", "--data-dir", str(tmp_path / "d")])
    assert "--time-scale" in err and "Traceback" not in err
    assert embedded.build_parser("x").parse_args(["--time-scale", "0"]).time_scale == 0


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
@pytest.mark.parametrize("value", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_refused_naming_the_flag(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], flag: str,
        value: str) -> None:
    """`--http-port 70000` was an OverflowError traceback from bind."""
    err = refused(capsys, [f"{flag}={value}", "--data-dir", str(tmp_path / "d")])
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["notaurl", "ftp://host", "http://", "http://h:99999",
                                 "https://user:s3cret@:80"])
def test_an_upstream_that_is_no_http_url_is_refused_naming_the_flag(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], url: str) -> None:
    """It failed late, through the control plane's error naming the generated file."""
    err = refused(capsys, ["--upstream", url, "--data-dir", str(tmp_path / "d")])
    assert "--upstream" in err and "s3cret" not in err
    assert not (tmp_path / "d").exists()
    assert embedded_checks.upstream_url_problem("http://127.0.0.1:11434") is None
    assert embedded_checks.upstream_url_problem("https://api.example.com/v1") is None


def test_an_upstream_option_without_upstream_says_needs(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, ["--upstream-model", "m", "--data-dir", str(tmp_path / "d")])
    assert "--upstream-model needs --upstream URL" in err


def write_configs(tmp_path: pathlib.Path) -> None:
    args = embedded.build_parser("synapse up").parse_args(["--data-dir", str(tmp_path)])
    ports = {"http": 1, "grpc": 2, "node": 3, "metrics": 4, "engine": 5}
    embedded._write_configs(args, tmp_path, ports, embedded_engine.choose(args, 5))


@pytest.mark.parametrize("name", ["SYNAPSE_HTTP__PORT", "SYNAPSE_HTTP", "SYNAPSE_DATA_DIR",
                                  "SYNAPSE_AUTH__KEY_FILE", "SYNAPSE_CONTROL_PLANE__TOKEN",
                                  "SYNAPSE_GRPC__HOST", "SYNAPSE_CACHE__MILVUS_URI"])
def test_a_shell_variable_overriding_what_up_writes_is_refused(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """SYNAPSE_HTTP__PORT=9077 moved the control plane while `up` polled its own port."""
    monkeypatch.setenv(name, "9077")
    with pytest.raises(SystemExit) as stop:
        write_configs(tmp_path)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "9077" not in err
    assert not (tmp_path / "controlplane.yaml").exists()


def test_other_inherited_variables_are_named_without_their_values(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNAPSE_CACHE__TTL_S", "s3cret-ttl")
    monkeypatch.setenv("SYNAPSE_HTTP__MAX_BODY_BYTES", "s3cret-body")
    monkeypatch.setenv("SYNAPSE_CONFIG_PATH", "/etc/x.yaml")
    write_configs(tmp_path)
    err = capsys.readouterr().err
    assert "SYNAPSE_CACHE__TTL_S, SYNAPSE_HTTP__MAX_BODY_BYTES" in err
    assert "SYNAPSE_CONFIG_PATH is not used" in err and "s3cret" not in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "controlplane.yaml").exists()


ERRORS = ("import json\nfor i in range(30):\n"
          "    print(f'2026-01-01T00:00:00.000Z INFO    x: fine {i}')\n"
          "    print(f'2026-01-01T00:00:00.000Z ERROR   usage: could not be stored {i}')\n"
          "print(json.dumps({'ts': 't', 'level': 'critical', 'logger': 'l', 'msg': 'json'}))\n")


def test_a_childs_error_lines_reach_the_terminal_rate_limited(
        tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A full disk: the children's ERROR lines went only to the data dir's logs."""
    log = tmp_path / "cp.log"
    child = embedded.Child("control plane", [sys.executable, "-c", ERRORS], log)
    child.popen.wait(timeout=60)
    child.stop(grace_s=1)
    child._keeper_done(60)      # its keeper, a process of its own, may be slow on a busy machine
    # (only the echo's lines: this process's own libraries may write there too, such as
    # gRPC's note on forking while its threads run)
    err = [line for line in capfd.readouterr().err.splitlines()
           if line.startswith("synapse up: ")]
    assert err[:embedded_checks.ECHO_PER_MINUTE] == [
        f"synapse up: control plane: 2026-01-01T00:00:00.000Z ERROR   usage: could not be "
        f"stored {i}" for i in range(embedded_checks.ECHO_PER_MINUTE)]
    assert err[embedded_checks.ECHO_PER_MINUTE:] == [
        f"synapse up: control plane: more errors in {log} (at most "
        f"{embedded_checks.ECHO_PER_MINUTE} a minute are shown here)"]
    assert log.read_text().count("ERROR") == 30     # the log keeps them all


def test_error_echo_shows_a_few_a_minute_then_where_the_rest_are(
        tmp_path: pathlib.Path) -> None:
    now = [0.0]
    out = io.StringIO()
    echo = embedded_checks.ErrorEcho("agent", tmp_path / "agent.log", out, per_minute=3,
                                     clock=lambda: now[0])
    lines = [b"2026-01-01T00:00:00.000Z INFO    a: fine",
             *(f"2026-01-01T00:00:00.000Z ERROR   a: bad {i}".encode() for i in range(5)),
             b'{"ts": "t", "level": "critical", "logger": "l", "msg": "json"}',
             b'{"ts": "t", "level": "info", "logger": "l", "msg": "error"}']
    echo.feed(b"\n".join(lines)[:50])       # a line split across pieces
    echo.feed(b"\n".join(lines)[50:] + b"\n")
    shown = out.getvalue().splitlines()
    assert shown[:3] == [f"synapse up: agent: 2026-01-01T00:00:00.000Z ERROR   a: bad {i}"
                         for i in range(3)]
    assert shown[3] == (f"synapse up: agent: more errors in {tmp_path / 'agent.log'} (at "
                        "most 3 a minute are shown here)")
    assert len(shown) == 4
    now[0] = 60.0
    echo.feed(lines[6] + b"\n" + lines[-1] + b"\n")
    assert out.getvalue().splitlines()[4:] == [f"synapse up: agent: {lines[6].decode()}"]


def test_an_engine_whose_start_cannot_succeed_ends_the_wait_with_its_log(
        tmp_path: pathlib.Path) -> None:
    """The simulator crash-looped on a config error while `up` waited 240 s in silence."""
    engines = tmp_path / "engines"
    engines.mkdir()
    old = engines / "simulator.log"
    old.write_text("config error: from an earlier start\n")
    watch = embedded_checks.EngineLogWatch(engines)
    assert watch.failing() is None                  # what earlier starts wrote is past
    with old.open("a") as f:
        f.write("[synapse-agent] started pid 7\nsimulating\n")
    assert watch.failing() is None
    with old.open("a") as f:
        f.write("config error: time_scale: must be finite\n")
    start = embedded.StartWatch()
    start.engines = watch
    with pytest.raises(RuntimeError) as failed:
        embedded._wait_for("agent, simulator and embedder ready", lambda: False, start, 30)
    assert str(old) in str(failed.value) and "time_scale: must be finite" in str(failed.value)
    fresh = engines / "vllm.log"
    fresh.write_text("[synapse-agent] exited with code 1; crashloop: 5 restarts in 600s\n")
    assert watch.failing() == fresh


def test_a_variable_setting_again_a_number_up_writes_is_only_named(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The test harness gives every process SYNAPSE_HTTP__DRAIN_DELAY_S=0: `up` writes 0."""
    monkeypatch.setenv("SYNAPSE_HTTP__DRAIN_DELAY_S", "0")
    write_configs(tmp_path)
    assert "SYNAPSE_HTTP__DRAIN_DELAY_S" in capsys.readouterr().err
    docs = ({"grpc": {"port": 2}, "cache": {"enabled": True}}, {"grpc": {"port": 3}})
    refused, _ = embedded_checks.env_overrides(docs, {"SYNAPSE_GRPC__PORT": "3",
                                                      "SYNAPSE_CACHE__ENABLED": "1"})
    assert refused == ["SYNAPSE_CACHE__ENABLED", "SYNAPSE_GRPC__PORT"]
    assert embedded_checks.env_overrides(docs, {"SYNAPSE_CACHE__ENABLED": "true"}) == (
        [], ["SYNAPSE_CACHE__ENABLED"])


def test_a_variable_setting_again_a_text_up_writes_is_only_named(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNAPSE_GRPC__HOST=127.0.0.1, the host `up` writes, was refused as an override."""
    monkeypatch.setenv("SYNAPSE_GRPC__HOST", "127.0.0.1")
    monkeypatch.setenv("SYNAPSE_DATA_DIR", str(tmp_path))
    write_configs(tmp_path)
    err = capsys.readouterr().err
    assert "SYNAPSE_DATA_DIR, SYNAPSE_GRPC__HOST" in err and str(tmp_path) not in err
    docs = ({"grpc": {"host": "127.0.0.1"}, "auth": {"admin_key": {"file": "/k"}}},)
    refused, _ = embedded_checks.env_overrides(docs, {"SYNAPSE_GRPC__HOST": "'127.0.0.1'",
                                                      "SYNAPSE_AUTH__ADMIN_KEY__FILE": "/k"})
    assert refused == ["SYNAPSE_AUTH__ADMIN_KEY__FILE", "SYNAPSE_GRPC__HOST"]

"""``synapse up``'s data dir: cached answers, prompts and logs live under it, each file
with the umask's mode, so the directory's own mode must keep other local users out."""

from __future__ import annotations

import collections.abc
import os
import pathlib

import pytest

from controlplane import embedded


@pytest.fixture(autouse=True)
def usual_umask() -> collections.abc.Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_data_dir_is_private(tmp_path: pathlib.Path) -> None:
    """It was 0755 with ``l1.sqlite``, ``cache_feedback.jsonl`` and ``l2.db`` 0644 in it."""
    data = embedded.data_directory(tmp_path / "parent" / ".synapse")
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "logs").stat().st_mode & 0o777 == 0o700


def test_a_data_dir_that_cannot_be_written_is_a_clear_error(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was an OSError traceback (probe finding)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        embedded.data_directory(blocker / ".synapse")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot use --data-dir" in err and "Traceback" not in err


def test_an_existing_open_data_dir_is_tightened_and_said(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / ".synapse"
    data.mkdir(mode=0o755)
    (data / "l1.sqlite").write_text("cached answers")
    embedded.data_directory(data)
    assert data.stat().st_mode & 0o777 == 0o700
    err = capsys.readouterr().err
    assert str(data) in err and "0755" in err and "0700" in err, err


def test_a_private_data_dir_is_left_alone_quietly(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / ".synapse"
    data.mkdir(mode=0o700)
    embedded.data_directory(data)
    assert data.stat().st_mode & 0o777 == 0o700 and capsys.readouterr().err == ""


def test_the_api_key_comes_from_a_file_or_the_command_line_with_a_warning(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = embedded.build_parser("synapse up")
    key = tmp_path / "key"
    key.write_text("sk-from-a-file-0123456789\n")
    assert embedded.chosen_api_key(parser.parse_args(["--api-key-file", str(key)])) == \
        "sk-from-a-file-0123456789"
    assert capsys.readouterr().err == ""
    assert embedded.chosen_api_key(parser.parse_args(["--api-key", "sk-argv-0123"])) == \
        "sk-argv-0123"
    assert "process list" in capsys.readouterr().err
    assert embedded.chosen_api_key(parser.parse_args([])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-key", "a", "--api-key-file", str(key)])
    key.write_text("\n")
    with pytest.raises(SystemExit):
        embedded.chosen_api_key(parser.parse_args(["--api-key-file", str(key)]))


def test_the_control_plane_stops_within_the_time_synapse_up_gives_it(
        tmp_path: pathlib.Path) -> None:
    """``synapse up`` kills a child CHILD_STOP_GRACE_S after its SIGTERM: the control
    plane's drain delay and grace (made for a load balancer's endpoints) must fit in it,
    or Ctrl-C waited the drain and a long request was killed instead of cut cleanly."""
    import yaml

    from controlplane import config, embedded_engine
    args = embedded.build_parser("synapse up").parse_args([])
    data = embedded.data_directory(tmp_path / ".synapse")
    gen = embedded_engine.Generation("m", [], None, {}, "upstream")
    ports = {name: 1 + i for i, name in enumerate(("http", "grpc", "node", "metrics"))}
    embedded._write_configs(args, data, ports, gen)
    http = config.ControlPlaneSettings.model_validate(
        yaml.safe_load((data / "controlplane.yaml").read_text())).http
    assert http.drain_delay_s == 0
    assert http.drain_delay_s + http.shutdown_grace_s < embedded.CHILD_STOP_GRACE_S

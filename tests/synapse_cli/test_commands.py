"""The console scripts: help for every command, exit 2 with one line on bad config."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from tests import harness


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([harness.console_script(argv[0]), *argv[1:]], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, check=False)


def test_synapse_help_lists_every_command() -> None:
    result = run("synapse", "--help")
    assert result.returncode == 0
    for command in ("up", "controlplane", "agent", "simulator"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["up", "controlplane", "agent", "simulator"])
def test_each_subcommand_has_help(command: str) -> None:
    result = run("synapse", command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"synapse {command}" in result.stdout and "--config" in result.stdout


def test_synapsectl_help() -> None:
    result = run("synapsectl", "--help")
    assert result.returncode == 0 and "synapsectl" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run("synapse", "frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_bad_port_exits_2_with_one_line_naming_the_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('http:\n  port: "abc"\n')
    result = run("synapse", "controlplane", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "http.port" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["controlplane", "agent", "simulator"])
def test_bad_env_value_exits_2(command: str) -> None:
    env = {"SYNAPSE_LOGGING__LEVEL": "loud", "SYNAPSE_CONFIG_PATH": ""}
    result = run("synapse", command, env=env)
    assert result.returncode == 2
    assert "logging.level" in result.stderr and "Traceback" not in result.stderr

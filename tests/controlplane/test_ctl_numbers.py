"""synapsectl refuses a bad number or address as it parses the command line, naming the
option (exit 2), and prints nothing of gRPC's own (operator probe: ``--replicas -1`` and
``--memory-gb nan`` were tracebacks, ``--timeout 0`` a DEADLINE_EXCEEDED, ``--server
host:99999`` connected to port 34463, ``--tls`` against a plain-text port printed a gRPC
C-core line before synapsectl's error)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from controlplane import ctl
from protos.synapse.v1 import admin_pb2_grpc
from tests import harness
from tests.controlplane import ctl_testing

BAD = ("-1", "nan", "inf", "-inf", "1e400", "1" + "0" * 30)
# Numbers the parser may take whatever their size, each with why: a time span the Admin
# service refuses beyond ten years (INVALID_ARGUMENT); a count of tenants (more than there
# are moves no model's operating point).
UNBOUNDED_ABOVE = {("get", "--since"), ("cache calibrate", "--min-tenants")}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _numeric(action: argparse.Action) -> bool:
    if not action.option_strings or action.type is None or action.choices:
        return False
    for sample in ("1", "0.5"):
        try:
            value = action.type(sample)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def _parse(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            ctl.build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, err.getvalue()


def test_every_numeric_option_refuses_bad_numbers_naming_itself() -> None:
    options = [(path, action.option_strings[-1])
               for path, parser in _commands(ctl.build_parser())
               for action in parser._actions if _numeric(action)]
    seen = {(" ".join(path), option) for path, option in options}
    assert {("deploy", "--replicas"), ("deploy", "--memory-gb"), ("drain", "--grace-seconds"),
            ("get", "--timeout"), ("cache tune-embedder", "--lr")} <= seen
    taken = []
    for path, option in options:
        for value in BAD:
            code, err = _parse([*path, f"{option}={value}"])
            if code == 0 or "required" in err:     # parsed: only the command was short
                taken.append((" ".join(path), option, value))
                continue
            assert code == 2 and f"argument {option}: " in err, (path, option, value, err)
    assert {(p, o) for p, o, _ in taken} <= UNBOUNDED_ABOVE, taken
    assert all(v == BAD[-1] for _, _, v in taken), taken


@pytest.mark.parametrize("argv", [
    ["deploy", "x", "--node", "local", "--engine", "simulator", "--replicas", "-1"],
    ["deploy", "x", "--memory-gb", "-5"], ["deploy", "x", "--memory-gb", "nan"],
    ["deploy", "x", "--max-model-len", "-1"], ["deploy", "x", "--tensor-parallel-size", "65"],
    ["deploy", "x", "--gpu-memory-utilization", "1.5"],
    ["get", "nodes", "--timeout", "0"], ["--timeout", "-1", "get", "nodes"],
    ["get", "nodes", "--timeout", "1e10"], ["get", "usage", "--since", "nan"],
    ["drain", "gpu-a", "--timeout-seconds", "-1"],
    ["explain", "--model", "m", "--prompt", "p", "--max-tokens", "-1"],
    # more digits than a float holds: was an OverflowError traceback
    ["deploy", "x", "--replicas", "1" + "0" * 400],
    ["cache", "tune-pair-scorer", "--seed", "1" + "0" * 400],
])
def test_a_bad_number_is_a_usage_error_naming_its_option(argv: list[str]) -> None:
    code, out, err = ctl_testing.run([*argv, "--server", "127.0.0.1:1"])
    option = next(a for a in argv if a.startswith("--") and a not in ("--node", "--engine",
                                                                      "--model", "--prompt"))
    assert code == 2 and out == "" and "Traceback" not in err, err
    last = err.splitlines()[-1]     # after argparse's usage lines
    assert last.startswith("synapsectl") and f" error: argument {option}: " in last, err


@pytest.mark.parametrize("server", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1",
                                    "::1:50051", "host:port"])
def test_server_must_be_host_and_a_port_in_range(server: str) -> None:
    code, _, err = ctl_testing.run(["get", "nodes", "--server", server, "--timeout", "2"])
    assert code == 2 and "error: argument --server: " in err, err
    code, _, err = ctl_testing.run(["get", "nodes", "--timeout", "2"],
                                   {"SYNAPSE_ADMIN_ADDR": server})
    assert code == 2 and err == ("synapsectl: error: $SYNAPSE_ADMIN_ADDR: not an address "
                                 f"host:port with a port in 1..65535: {server!r}\n"), err


def test_tls_against_a_plain_text_port_prints_only_synapsectls_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env["SYNAPSE_ADMIN_TOKEN"] = "x"
    with ctl_testing.serve_admin(admin_pb2_grpc.AdminServicer()) as address:
        done = subprocess.run([harness.console_script("synapsectl"), "get", "nodes", "--tls",
                               "--server", address, "--timeout", "3"],
                              capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.startswith("synapsectl: error: ") and done.stderr.count("\n") == 1, \
        done.stderr


def test_a_ca_file_grpc_cannot_use_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    for path, says in ((tmp_path / "missing.pem", "cannot read --ca-file"),
                       (junk, "holds no PEM certificate")):
        code, _, err = ctl_testing.run(["get", "nodes", "--tls", "--ca-file", str(path),
                                        "--server", "127.0.0.1:1", "--timeout", "2"])
        assert code == 2 and err.startswith("synapsectl: error: ") and says in err, err
        assert err.count("\n") == 1, err

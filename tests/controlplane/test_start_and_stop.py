"""``synapse controlplane`` started and stopped as an operator does it, as a real process.

* A start that fails (the HTTP port taken) ends the process with an error even when
  Redis accepts connections but never answers: the app's background loops, whose Redis
  calls time out, are stopped with the failed start rather than left running.
* SIGHUP (the operator's terminal or ssh session closed) stops it as SIGTERM does: the
  stop is logged and the process exits 0 rather than dying on the signal.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests import fleet, harness


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conns.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in conns:
            conn.close()


def _start(tmp_path: pathlib.Path, http_port: int, **sections: object
           ) -> harness.ManagedProcess:
    cfg = fleet.controlplane_config("cp", http_port, harness.free_port(), tmp_path / "data",
                                    cache={"enabled": False}, **sections)
    path = fleet.write_yaml(tmp_path / "cp.yaml", cfg)
    return harness.ManagedProcess(
        "cp", [harness.console_script("synapse"), "controlplane", "--config", str(path)],
        tmp_path / "cp.log")


def test_a_taken_port_ends_the_start_when_redis_never_answers(tmp_path):
    with _silent_listener() as redis_port, \
            socket.create_server(("127.0.0.1", 0)) as taken:
        cp = _start(tmp_path, taken.getsockname()[1],
                    redis={"url": f"redis://127.0.0.1:{redis_port}/0"}, http={"workers": 1})
        try:
            code = cp.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the control plane did not exit:\n{cp.output_tail()}")
        else:
            out = cp.output()
        finally:
            cp.stop()
    assert code != 0
    assert "cannot listen" in out


def test_sighup_stops_the_control_plane_as_sigterm_does(tmp_path):
    port = harness.free_port()
    cp = _start(tmp_path, port)
    try:
        harness.wait_until(lambda: harness.http_ok(f"http://127.0.0.1:{port}/ready"), 60,
                           "the control plane to be ready", proc=cp)
        cp.signal(signal.SIGHUP)
        assert cp.wait(timeout=60) == 0, cp.output_tail()
        assert "stopping:" in cp.output()
    finally:
        cp.stop()

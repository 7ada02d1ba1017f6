"""synapsectl under test: a real gRPC server on a free port playing the Admin service with
a test's servicer, and ``ctl.main`` run in-process with its output captured."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from concurrent import futures

import grpc

from controlplane import ctl
from protos.synapse.v1 import admin_pb2_grpc


@contextlib.contextmanager
def serve_admin(servicer: admin_pb2_grpc.AdminServicer) -> Iterator[str]:
    """``servicer`` served on 127.0.0.1 (a free port) until the block ends: its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``synapsectl argv`` with environment ``env``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ctl.main(argv, environ=env or {})
    return code, out.getvalue(), err.getvalue()

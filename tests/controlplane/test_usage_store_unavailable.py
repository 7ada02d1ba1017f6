"""Admin.GetUsage with the usage store down says so by its own error code
(``usage_store_unavailable``, :class:`controlplane.errors.UsageStoreUnavailable`), not
``no_backend``: an operator's client is told what failed, and when to try again."""

from __future__ import annotations

import grpc
import pytest

from controlplane import errors
from protos.synapse.v1 import admin_pb2, admin_pb2_grpc
from synapse_common import call_metadata
from synapse_common.ports import free_port
from tests.controlplane import cp_testing as t
from tests.controlplane import test_fairness as fair_testing


def test_the_usage_store_being_down_is_a_503_of_its_own_with_retry_after() -> None:
    down = errors.UsageStoreUnavailable("the usage store is unreachable")
    assert down.http_status == 503 and down.code == errors.USAGE_STORE_CODE
    assert errors.USAGE_STORE_CODE == "usage_store_unavailable"
    assert isinstance(down, errors.Unavailable) and "Retry-After" in down.headers()
    assert down.envelope()["error"]["type"] == "service_unavailable"


async def test_get_usage_with_the_usage_store_down_names_the_store() -> None:
    # Nothing listens there: every Redis call of this replica fails.
    s = fair_testing.settings(
        redis={"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_s": 0.2})
    async with t.running(s) as cp, fair_testing.admin_of(cp) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetUsage(admin_pb2.GetUsageRequest(), timeout=20,
                                metadata=(("authorization", f"Bearer {t.ADMIN}"),))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "usage store is unreachable" in (refused.value.details() or "")
    trailer = dict(refused.value.trailing_metadata() or ())
    assert trailer.get(call_metadata.ERROR) == errors.USAGE_STORE_CODE, trailer

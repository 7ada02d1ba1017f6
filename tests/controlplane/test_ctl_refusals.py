"""synapsectl tells a refusal by the Admin service from a service it did not reach (probe
95, F5): with Redis down, a cordon printed "cannot reach the Admin service: cannot store
the change durably", though the service had answered."""

from __future__ import annotations

import asyncio
import pathlib

from tests import harness
from tests.controlplane import ctl_testing
from tests.controlplane import test_admin as admin_testing


async def test_a_cordon_the_service_cannot_store_is_its_refusal_not_unreachable(
        tmp_path: pathlib.Path) -> None:
    redis = harness.RedisServer(tmp_path)
    replica = await admin_testing.Replica(admin_testing.settings(
        redis.url, data_dir=tmp_path / "data")).start()
    agent = admin_testing.AgentStandIn("gpu-a")
    env = {"SYNAPSE_ADMIN_ADDR": replica.address,
           "SYNAPSE_ADMIN_TOKEN": admin_testing.ADMIN_KEY}
    try:
        await agent.connect(replica.address)
        await admin_testing.eventually(
            lambda: replica.services.registry.node("gpu-a") is not None, "node")
        redis.kill()
        for argv, what in ((["cordon", "gpu-a", "--reason", "bad GPU"], "cordon gpu-a"),
                           (["drain", "gpu-a"], "drain gpu-a")):
            code, out, err = await asyncio.to_thread(ctl_testing.run, argv, env)
            assert code == 1 and out == "" and err.count("\n") == 1, err
            assert err.startswith(f"synapsectl: error: the Admin service refused {what} "
                                  "(UNAVAILABLE): cannot store the change durably, so it "
                                  "was not made: "), err
            assert "cannot reach" not in err
        node = replica.services.registry.node("gpu-a")
        assert node is not None and not node.cordoned     # nor made in memory only
    finally:
        await agent.close()
        await replica.stop()
        redis.stop()


def test_an_admin_service_out_of_reach_is_still_said_so() -> None:
    code, _, err = ctl_testing.run(["cordon", "gpu-a", "--server", "127.0.0.1:1",
                                    "--timeout", "2"], {"SYNAPSE_ADMIN_TOKEN": "x"})
    assert code == 1 and err.startswith("synapsectl: error: cannot reach the Admin service")

"""The registry: down after silence, operator intent, commands, static upstreams."""

from __future__ import annotations

import asyncio

from controlplane.core import registry, types


def sim(node: str = "n", name: str = "a") -> types.BackendState:
    return types.BackendState(f"{node}/{name}", node, name, f"http://{name}", ("m",))


def test_node_goes_down_after_silence_and_comes_back_on_report() -> None:
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15)
    reg.register(types.NodeInfo("n"))
    reg.report("n", [sim()])
    assert [b.key for b in reg.routable("m")] == ["n/a"]
    now[0] = 14.0
    assert reg.routable("m")
    now[0] = 15.5
    assert reg.routable("m") == [] and reg.nodes()[0].status == "down"
    reg.report("n", [sim()])
    assert reg.routable("m")


def test_cordon_and_drain_take_a_node_out_of_routing() -> None:
    reg = registry.Registry(lambda: 0.0, down_after_s=15)
    reg.register(types.NodeInfo("n"))
    reg.report("n", [sim()])
    reg.cordon("n")
    assert reg.routable("m") == [] and reg.nodes()[0].status == "cordoned"
    reg.cordon("n", False)
    reg.set_drain("n", True)
    assert reg.routable("m") == [] and reg.nodes()[0].status == "draining"
    reg.set_drain("n", False)
    reg.report("n", [sim()], draining=True)  # the agent itself says it is draining
    assert reg.routable("m") == []


def test_static_upstreams_follow_their_probe() -> None:
    reg = registry.Registry(lambda: 0.0, down_after_s=15)
    reg.set_static([types.BackendState("static/o", "static", "o", "http://o", ("m",),
                                       source="static")])
    assert reg.routable("m")
    reg.set_static_health("static/o", False)
    assert reg.routable("m") == []
    assert reg.all_backends()[0][1] == "health probe failed"


async def test_commands_wait_for_the_ack_and_fail_when_the_stream_goes() -> None:
    reg = registry.Registry(lambda: 0.0, down_after_s=15)
    stream = reg.register(types.NodeInfo("n"))
    task = asyncio.create_task(reg.send_command("n", types.Command("undrain")))
    cid, cmd = await reg.outbox("n").get()
    assert cmd.kind == "undrain"
    reg.ack(cid, False, "not draining")
    assert await task == types.CommandResult(False, "not draining")
    task = asyncio.create_task(reg.send_command("n", types.Command("drain")))
    await reg.outbox("n").get()
    reg.disconnect("n", stream)
    assert await task == types.CommandResult(False, "node disconnected")
    result = await reg.send_command("n", types.Command("drain"))
    assert not result.ok and "not connected" in result.error

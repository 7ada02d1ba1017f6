"""The registry: down after silence, operator intent, commands, static upstreams."""

from __future__ import annotations

import asyncio

import pytest

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


def _closed(reg: registry.Registry, name: str, now: list[float]) -> None:
    """``name`` registers and its stream ends at once, as an invented name's does."""
    reg.disconnect(name, reg.register(types.NodeInfo(name)))
    now[0] += 1.0


def test_invented_names_whose_streams_closed_make_room_for_a_new_node_at_once() -> None:
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15, max_nodes=3,
                            forget_down_after_s=3600)
    for i in range(3):
        _closed(reg, f"fake-{i}", now)
    reg.register(types.NodeInfo("gpu-new"))                 # not refused for an hour
    assert {v.info.name for v in reg.nodes()} == {"fake-1", "fake-2", "gpu-new"}
    reg.register(types.NodeInfo("gpu-other"))                # the closed longest ago goes
    assert {v.info.name for v in reg.nodes()} == {"fake-2", "gpu-new", "gpu-other"}
    reg.register(types.NodeInfo("gpu-third"))
    # names whose streams are open hold their place, silent or not
    now[0] += 60.0
    with pytest.raises(registry.TooManyNodes):
        reg.register(types.NodeInfo("gpu-fourth"))


def test_names_that_served_or_carry_operator_intent_are_kept_to_make_room() -> None:
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15, max_nodes=4,
                            forget_down_after_s=3600)
    served = reg.register(types.NodeInfo("served"))
    reg.report("served", [sim("served")])
    now[0] += 15.0
    reg.report("served", [sim("served")])                    # backends for down_after_s
    reg.disconnect("served", served)
    for name, intent in (("cordoned", reg.cordon), ("drained", reg.set_drain)):
        stream = reg.register(types.NodeInfo(name))
        intent(name, True)
        reg.disconnect(name, stream)
    brief = reg.register(types.NodeInfo("brief"))
    reg.report("brief", [sim("brief")])                      # one report: it never served
    reg.disconnect("brief", brief)
    reg.register(types.NodeInfo("gpu-new"))
    assert {v.info.name for v in reg.nodes()} == {"served", "cordoned", "drained", "gpu-new"}
    with pytest.raises(registry.TooManyNodes):
        reg.register(types.NodeInfo("gpu-other"))
    now[0] += 3601.0                                        # long down: forgotten as before
    reg.register(types.NodeInfo("gpu-other"))
    assert "gpu-other" in {v.info.name for v in reg.nodes()}


def test_a_workers_copy_of_decided_registers_stays_bounded() -> None:
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15, max_nodes=2)
    for i in range(5):
        reg.disconnect(f"fake-{i}", reg.register(types.NodeInfo(f"fake-{i}"), decided=True))
    assert len(reg.nodes()) == 2


def test_one_origin_holds_at_most_its_share_and_a_node_elsewhere_still_registers() -> None:
    """A holder of the agent token opening live streams under invented names from one
    address fills that address's share, not the registry: a real node elsewhere still
    registers. A name that served and closed still holds its place; one that never
    served and closed frees it; a node coming back from its origin takes no second one;
    no origin (this host) is not counted."""
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15, max_nodes=6,
                            max_nodes_per_origin=2)
    served = reg.register(types.NodeInfo("fake-0"), origin="10.0.0.66")
    reg.report("fake-0", [sim("fake-0")])
    now[0] += 15.0
    reg.report("fake-0", [sim("fake-0")])
    reg.disconnect("fake-0", served)                        # served: keeps its place
    reg.register(types.NodeInfo("fake-1"), origin="10.0.0.66")
    with pytest.raises(registry.OriginFull):
        reg.register(types.NodeInfo("fake-2"), origin="10.0.0.66")
    reg.register(types.NodeInfo("gpu-real"), origin="10.0.0.7")
    for i in range(3):
        reg.register(types.NodeInfo(f"local-{i}"))          # no origin: not counted
    again = reg.register(types.NodeInfo("fake-0"), origin="10.0.0.66")   # its own place
    reg.disconnect("fake-0", again)
    assert {v.info.name for v in reg.nodes()} == {"fake-0", "fake-1", "gpu-real", "local-0",
                                            "local-1", "local-2"}
    now[0] += 3600.0
    reg.report("fake-1", [])
    with pytest.raises(registry.OriginFull):                # fake-0 down, not long enough
        reg.register(types.NodeInfo("fake-3"), origin="10.0.0.66")
    now[0] += 1.0                                            # fake-0 long down: no place
    reg.report("fake-1", [])
    reg.register(types.NodeInfo("fake-3"), origin="10.0.0.66")
    assert {"fake-1", "fake-3"} <= {v.info.name for v in reg.nodes()}


def test_a_node_whose_stream_is_open_is_never_forgotten_however_long_it_is_silent() -> None:
    """Making room forgets nodes long down whose streams closed; one silent for longer on
    an open stream keeps its place, so its next report finds it (before, that report
    raised KeyError and the stream failed with a traceback)."""
    now = [0.0]
    reg = registry.Registry(lambda: now[0], down_after_s=15, max_nodes=2,
                            forget_down_after_s=3600)
    silent = reg.register(types.NodeInfo("silent"))
    closed = reg.register(types.NodeInfo("closed"))
    reg.disconnect("closed", closed)
    now[0] += 3601.0
    reg.register(types.NodeInfo("gpu-new"))                  # "closed" makes room
    assert {v.info.name for v in reg.nodes()} == {"silent", "gpu-new"}
    assert reg.report("silent", [sim("silent")], stream_id=silent)
    assert {v.info.name: v.status for v in reg.nodes()}["silent"] == "ready"

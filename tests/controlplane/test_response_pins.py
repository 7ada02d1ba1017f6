"""Responses pins: kept per tenant, so one tenant's answers never unpin another's."""

from __future__ import annotations

from controlplane.core import response_pins


def test_a_flood_of_one_tenants_answers_never_unpins_anothers() -> None:
    pins = response_pins.Pins(limit=10, tenants=2)
    pins.remember("b", "resp_b", "n1/b")
    for i in range(1000):
        pins.remember("a", f"resp_{i}", "n1/a")
    assert pins.backend_of("b", "resp_b") == "n1/b"
    assert pins.backend_of("a", "resp_994") is None          # a's own share: 5
    assert pins.backend_of("a", "resp_995") == "n1/a"
    assert len(pins) == 6 <= 10


def test_a_pin_is_found_only_under_its_tenant_and_tells_the_listener_so() -> None:
    pins = response_pins.Pins()
    heard: list[tuple[str, str, str]] = []
    pins.listener = lambda *pin: heard.append(pin)
    pins.remember("a", "resp_1", "n1/a")
    assert pins.backend_of("b", "resp_1") is None
    assert heard == [("a", "resp_1", "n1/a")]

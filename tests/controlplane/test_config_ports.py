"""Two listeners given one port are refused when the config loads, naming both fields
(the bind error at start named neither)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from controlplane import config


def _settings(**sections: Any) -> config.ControlPlaneSettings:
    return config.ControlPlaneSettings.model_validate(sections)


@pytest.mark.parametrize(("sections", "fields"), [
    ({"http": {"port": 18510}, "grpc": {"port": 18510}}, "http.port and grpc.port"),
    ({"http": {"port": 18510}, "metrics": {"port": 18510}}, "http.port and metrics.port"),
    ({"grpc": {"port": 9100}, "metrics": {"port": 9100}}, "grpc.port and metrics.port"),
    ({"http": {"host": "127.0.0.1", "port": 18510},
      "grpc": {"host": "0.0.0.0", "port": 18510}}, "http.port and grpc.port"),
])
def test_one_port_for_two_listeners_is_refused_naming_both(sections: dict[str, Any],
                                                           fields: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=f"{fields} are both"):
        _settings(**sections)


def test_ports_apart_or_on_other_addresses_or_any_free_port_load() -> None:
    _settings(http={"port": 18510}, grpc={"port": 18511}, metrics={"port": 18512})
    _settings(http={"host": "127.0.0.1", "port": 18510},
              grpc={"host": "127.0.0.2", "port": 18510})
    _settings(http={"port": 0}, grpc={"port": 0}, metrics={"port": 0})

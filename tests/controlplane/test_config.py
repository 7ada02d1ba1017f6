"""Start-up warnings about settings that load but may not do what the operator meant
(:func:`controlplane.config.start_warnings`)."""

from __future__ import annotations

from typing import Any

from controlplane import config

KEY = "sk-tenant-key-0123456789"


def _settings(**sections: Any) -> config.ControlPlaneSettings:
    return config.ControlPlaneSettings.model_validate(sections)


def test_an_open_api_is_said_with_what_it_ignores_never_a_key() -> None:
    settings = _settings(auth={"enabled": False, "tenants": [
        {"name": "a", "keys": [KEY, KEY + "x"]}, {"name": "b", "key_sha256": ["0" * 64]}]})
    said = config.start_warnings(settings, settings.auth.tenants)
    assert said == ["auth.enabled is false: /v1 is open to any client that reaches the HTTP "
                    "port, each served as tenant 'anonymous'; the keys and limits of the 2 "
                    "configured tenants (3 keys) are ignored"]
    assert KEY not in " ".join(said)
    alone = _settings(auth={"enabled": False})
    assert config.start_warnings(alone, []) == [
        "auth.enabled is false: /v1 is open to any client that reaches the HTTP port, each "
        "served as tenant 'anonymous'"]


def test_a_tenants_limit_for_a_model_nothing_configured_serves_is_said() -> None:
    settings = _settings(
        models=[{"name": "m", "aliases": ["alias"]}],
        upstreams=[{"name": "u", "url": "http://h", "models": ["served"]}],
        auth={"tenants": [{"name": "a", "keys": [KEY], "models": {
            "m": {"tokens_per_minute": 5}, "alias": {"tokens_per_minute": 5},
            "served": {"tokens_per_minute": 5}, "nosuch": {"tokens_per_minute": 5}}}]})
    said = config.start_warnings(settings, settings.auth.tenants)
    assert len(said) == 1 and said[0].startswith(
        "auth.tenants[a].models: 'nosuch' is no configured model"), said


def test_the_defaults_say_nothing() -> None:
    settings = _settings(auth={"tenants": [{"name": "a", "keys": [KEY]}]})
    assert config.start_warnings(settings, settings.auth.tenants) == []


def test_a_redis_url_of_another_scheme_is_named_never_quoted() -> None:
    secret = "sk-redis-password-0123456789"
    bad = _settings(redis={"url": f"http://user:{secret}@127.0.0.1:1/0"})
    problem = config.redis_url_problem(bad)
    assert problem is not None and problem.startswith(
        "redis.url: must start with redis://, rediss://, unix://"), problem
    assert secret not in problem
    for good in ("redis://h:6379/0", "rediss://:pw@h", "unix:///run/redis.sock", "REDIS://h"):
        assert config.redis_url_problem(_settings(redis={"url": good})) is None
    assert config.redis_url_problem(_settings()) is None

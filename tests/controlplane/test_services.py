"""Building the services from settings: tenants from inline hashes, secrets and a key file."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from controlplane import errors
from controlplane.api import services
from controlplane.core import tenants
from tests.controlplane import cp_testing as t


def test_tenants_come_from_hashes_secrets_and_the_key_file(tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "tenants.yaml"
    key_file.write_text("- name: filed\n  keys: [sk-from-file-123]\n  allowed_models: [llama]\n")
    s = t.settings(auth={"admin_key": t.ADMIN, "key_file": str(key_file), "tenants": [
        {"name": "hashed", "key_sha256": [tenants.sha256_hex("sk-hashed-123")]},
        {"name": "secret", "keys": ["sk-secret-123"]}]})
    table = services.build(s).tenants
    assert table.authenticate("Bearer sk-hashed-123").name == "hashed"
    assert table.authenticate("Bearer sk-secret-123").name == "secret"
    filed = table.authenticate("bearer sk-from-file-123")
    assert filed.name == "filed" and filed.allowed_models == frozenset({t.MODEL})
    with pytest.raises(errors.Unauthorized):
        table.authenticate("Bearer sk-nobody")
    with pytest.raises(errors.Forbidden):
        table.authenticate_admin("Bearer sk-secret-123")
    table.authenticate_admin(f"Bearer {t.ADMIN}")
    assert "sk-secret-123" not in repr(s)


def test_every_bound_of_a_parsed_body_is_the_http_setting_of_its_name() -> None:
    """The bounds every request body is parsed under are built once, from the config: none
    is left at its default when its setting says otherwise."""
    http = {"max_json_depth": 9, "max_json_containers": 300, "max_messages": 3, "max_n": 2,
            "max_structured_output_bytes": 300, "max_sequences": 5,
            "max_tool_schema_bytes": 301, "request_chat_templates": True,
            "request_media_kwargs": True}
    assert dataclasses.asdict(services.build(t.settings(http=http)).body_limits) == http


def test_a_bad_key_file_names_the_setting(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: x\n  keys: 7\n")
    with pytest.raises(ValueError, match=r"auth\.key_file"):
        services.build(t.settings(auth={"key_file": str(bad)}))
    with pytest.raises(ValueError, match=r"auth\.key_file"):
        services.build(t.settings(auth={"key_file": str(tmp_path / "missing.yaml")}))


@pytest.mark.parametrize("text", [
    "- name: a\n  keys: sk-filed-never-shown-0123: y\n",
    "- {name: a, keys: [sk-filed-never-shown-0123]\n",
    "- name: a\n  keys: [*sk-filed-never-shown-0123]\n",
])
def test_a_key_file_that_is_no_yaml_says_where_and_quotes_no_key(
        tmp_path: pathlib.Path, text: str) -> None:
    """PyYAML's own message shows the lines around the problem: the tenants' keys."""
    bad = tmp_path / "tenants.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError) as caught:
        services.build(t.settings(auth={"key_file": str(bad)}))
    line = str(caught.value)
    assert "sk-filed" not in line, line   # nor a piece of it
    assert line.startswith(f"auth.key_file: {bad}: ") and "\n" not in line, line
    assert "at line " in line and ", column " in line, line


def test_the_admin_key_acts_on_v1_only_as_the_tenant_named_for_it() -> None:
    table = services.build(t.settings()).tenants
    with pytest.raises(errors.Forbidden, match="admin routes"):
        table.authenticate(f"Bearer {t.ADMIN}")
    s = t.settings(auth={"admin_key": t.ADMIN, "admin_tenant": "ops", "tenants": [
        {"name": "ops", "keys": ["sk-ops-123"], "allowed_models": ["llama"],
         "requests_per_second": 2}]})
    ops = services.build(s).tenants.authenticate(f"Bearer {t.ADMIN}")
    assert (ops.name, ops.allowed_models, ops.requests_per_second) == \
        ("ops", frozenset({t.MODEL}), 2)
    with pytest.raises(ValueError, match=r"auth\.admin_tenant: no tenant is named 'nobody'"):
        t.settings(auth={"admin_tenant": "nobody"})


def test_an_unreadable_metrics_token_names_the_setting(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"metrics\.bearer_token_file: cannot read"):
        services.build(t.settings(metrics={"bearer_token_file": str(tmp_path / "none")}))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=r"metrics\.bearer_token_file: .* is empty"):
        services.build(t.settings(metrics={"bearer_token_file": str(tmp_path / "empty")}))


def test_keys_short_enough_to_guess_are_named_at_start_and_never_shown(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "tenants.yaml"
    key_file.write_text("- name: filed\n  keys: [pw-filed]\n")
    s = t.settings(auth={"admin_key": "adm-short", "agent_token": "tok-short",
                         "key_file": str(key_file), "tenants": [
                             {"name": "good", "keys": ["sk-long-enough-0123456789"]},
                             {"name": "weak", "keys": ["sk-long-enough-9876543210", "pw-1"]}]})
    with caplog.at_level("WARNING", logger="synapse.controlplane"):
        services.build(s)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert ("auth.tenants[weak].keys[1], auth.tenants[filed].keys[0], auth.admin_key, "
            "auth.agent_token: shorter than 16 characters") in said
    assert "good" not in said
    assert not any(secret in said for secret in ("pw-filed", "adm-short", "tok-short", "pw-1"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="synapse.controlplane"):
        services.build(t.settings())        # the test keys are long: nothing said
    assert "shorter than" not in caplog.text

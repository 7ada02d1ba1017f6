"""Config errors in values from SYNAPSE_* variables show nothing of the input: not a
validator's message (which may quote the value), nor a key the input wrote."""

from __future__ import annotations

import pathlib

import pytest

from controlplane import config as cp_config
from synapse_common import settings

SECRET = "s3cr3t-P4SS"
BASE = """auth:
  admin_key: admin-key-0123456789
  agent_token: agent-token-0123456789
  tenants: [{name: acme, keys: [key-acme-0123456789]}]
models: [{name: llama}]
"""
ACCOUNT = "[system:serviceaccount:ns:a]"


def error_of(tmp_path: pathlib.Path, environ: dict[str, str], extra: str = "",
             section: str | None = None) -> str:
    """The one-line error of loading the control plane's settings with ``environ``, the
    file ``BASE`` with ``extra`` after its line ``section`` (after all of it by default)."""
    text = (BASE.replace(section, section + extra, 1) if section is not None
            else BASE + extra)
    path = tmp_path / "config.yaml"
    path.write_text(f"data_dir: {tmp_path}\n{text}")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(cp_config.ControlPlaneSettings, str(path), environ=environ)
    return str(err.value)


@pytest.mark.parametrize(("environ", "start"), [
    ({"SYNAPSE_AUTH__AGENT_REVIEW__SERVICE_ACCOUNTS": ACCOUNT,
      "SYNAPSE_AUTH__AGENT_REVIEW__API_SERVER": f"http://admin:{SECRET}@10.0.0.5:6443"},
     "SYNAPSE_AUTH__AGENT_REVIEW__API_SERVER: auth.agent_review.api_server: "),
    ({"SYNAPSE_AUTH__AGENT_REVIEW":
      f"{{service_accounts: {ACCOUNT}, api_server: 'ftp://u:{SECRET}@h'}}"},
     "SYNAPSE_AUTH__AGENT_REVIEW: auth.agent_review.api_server: "),
    ({"SYNAPSE_AUTH__AGENT_REVIEW__SERVICE_ACCOUNTS": f"[{SECRET}]"},
     "SYNAPSE_AUTH__AGENT_REVIEW__SERVICE_ACCOUNTS: auth.agent_review.service_accounts: "),
    ({"SYNAPSE_UPSTREAMS": "[{name: u, url: 'http://127.0.0.1:1', models: [llama], "
                           f"model_names: {{{SECRET}: llama}}}}]"},
     "SYNAPSE_UPSTREAMS: upstreams.0: "),
    ({"SYNAPSE_AUTH": "{" + SECRET + "}"}, "SYNAPSE_AUTH: auth.<key>: unknown setting"),
    ({"SYNAPSE_AUTH__TENANTS": f"[{{name: a, keys: [k-0123456789abcdef], {SECRET}: 1}}]"},
     "SYNAPSE_AUTH__TENANTS: auth.tenants.0.<key>: unknown setting"),
], ids=["url-variable", "url-in-section", "list-item", "model-check-in-list-item",
        "key-of-section", "key-of-list-item"])
def test_an_error_in_a_value_from_a_variable_shows_nothing_of_it(
        tmp_path: pathlib.Path, environ: dict[str, str], start: str) -> None:
    message = error_of(tmp_path, environ)
    assert message.startswith(start), message
    assert SECRET not in message and "\n" not in message


def test_a_check_across_settings_over_a_value_from_a_variable_quotes_nothing(
        tmp_path: pathlib.Path) -> None:
    """A check of the whole (no location) cannot say which value it is about: its message
    is withheld and the variables whose values it covers are named."""
    message = error_of(tmp_path, {"SYNAPSE_AUTH__ADMIN_TENANT": SECRET})
    assert message.startswith(f"{tmp_path / 'config.yaml'}: "), message
    assert "SYNAPSE_AUTH__ADMIN_TENANT" in message and SECRET not in message


def test_a_check_across_settings_from_the_file_alone_keeps_its_message(
        tmp_path: pathlib.Path) -> None:
    """With no SYNAPSE_* variable set, nothing in it came from the environment."""
    message = error_of(tmp_path, {}, "  admin_tenant: nobody\n", section="auth:\n")
    assert "no tenant is named 'nobody'" in message, message


def test_a_url_with_credentials_in_the_file_is_shown_without_them(
        tmp_path: pathlib.Path) -> None:
    message = error_of(tmp_path, {}, f"  agent_review: {{service_accounts: {ACCOUNT}, "
                       f"api_server: 'http://admin:{SECRET}@10.0.0.5:6443'}}\n",
                       section="auth:\n")
    assert "'http://***@10.0.0.5:6443' is plain http" in message, message
    assert SECRET not in message


def test_the_readme_example_of_a_file_error_is_unchanged(tmp_path: pathlib.Path) -> None:
    message = error_of(tmp_path, {"SYNAPSE_CACHE__ENABLED": "false"}, "http: {port: abc}\n")
    assert message == (f"{tmp_path / 'config.yaml'}: http.port: input should be a valid "
                       "integer, unable to parse string as an integer (got 'abc')")


def test_an_error_in_a_file_value_beside_a_section_from_a_variable_names_the_file(
        tmp_path: pathlib.Path) -> None:
    """A variable giving a section as a mapping is merged over the file's section: the
    file's values beside its keys are still the file's, their errors named and quoted so."""
    message = error_of(tmp_path, {"SYNAPSE_HTTP": "{host: 127.0.0.1}"},
                       "http: {port: notanumber}\n")
    assert message.startswith(f"{tmp_path / 'config.yaml'}: http.port: "), message
    assert "notanumber" in message, message

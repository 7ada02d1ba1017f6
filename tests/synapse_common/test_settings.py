"""Config loading: file, SYNAPSE_* overrides, secrets, one-line errors."""

from __future__ import annotations

import logging
import pathlib

import pytest

from agent import config as agent_config
from controlplane import config as cp_config
from simulator import config as sim_config
from synapse_common import settings

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load_cp(tmp_path: pathlib.Path, text: str,
            environ: dict[str, str] | None = None) -> cp_config.ControlPlaneSettings:
    """The control plane's settings from a config file of ``text``, with ``environ`` (none
    by default) as the process environment."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return settings.load(cp_config.ControlPlaneSettings, str(path), environ=environ or {})


def test_wrong_type_names_the_field(tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, "http:\n  port: abc\n")
    message = str(err.value)
    assert "http.port" in message and "integer" in message and "\n" not in message


def test_unknown_key_is_an_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError, match=r"cache\.tll_s: unknown setting"):
        load_cp(tmp_path, "cache:\n  tll_s: 5\n")


def test_env_overrides_single_values(tmp_path: pathlib.Path) -> None:
    env = {"SYNAPSE_HTTP__PORT": "9001", "SYNAPSE_CACHE__ENABLED": "false",
           "SYNAPSE_REPLICA_ID": "cp-7", "SYNAPSE_UNRELATED": "x"}
    loaded = load_cp(tmp_path, "http:\n  port: 8080\n", env)
    assert loaded.http.port == 9001
    assert loaded.cache.enabled is False
    assert loaded.replica_id == "cp-7"


def test_env_override_with_a_typo_under_a_section_is_an_error() -> None:
    with pytest.raises(settings.ConfigError, match="SYNAPSE_HTTP__PROT"):
        settings.load(cp_config.ControlPlaneSettings, None,
                      environ={"SYNAPSE_HTTP__PROT": "1"})


def test_explicit_missing_file_is_an_error() -> None:
    with pytest.raises(settings.ConfigError, match="does not exist"):
        settings.load(cp_config.ControlPlaneSettings, "/nonexistent/config.yaml", environ={})


def test_missing_default_file_gives_defaults() -> None:
    loaded = settings.load(cp_config.ControlPlaneSettings, None, environ={})
    assert loaded.http.port == 8080 and loaded.grpc.port == 50051


def test_broken_yaml_says_where(tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError, match="line"):
        load_cp(tmp_path, "http:\n  port: [1, 2\n")


def test_secrets_from_env_and_file_never_show(tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("sk-admin-from-file\n")
    monkeypatch.setenv("TEAM_KEY", "sk-team-from-env")
    loaded = load_cp(tmp_path, f"""
auth:
  admin_key: {{file: {key_file}}}
  tenants:
    - name: team
      keys: [{{env: TEAM_KEY}}]
""")
    assert loaded.auth.admin_key is not None
    assert loaded.auth.admin_key.get_secret_value() == "sk-admin-from-file"
    assert loaded.auth.tenants[0].keys[0].get_secret_value() == "sk-team-from-env"
    shown = repr(loaded) + str(loaded) + loaded.model_dump_json()
    assert "sk-admin-from-file" not in shown and "sk-team-from-env" not in shown
    assert sorted(settings.secret_values(loaded)) == ["sk-admin-from-file", "sk-team-from-env"]


def test_secret_from_unset_env_names_the_field(tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError, match=r"redis\.url.*SYNAPSE_TEST_SURELY_UNSET"):
        load_cp(tmp_path, "redis:\n  url: {env: SYNAPSE_TEST_SURELY_UNSET}\n")


def test_duplicate_alias_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError, match="'x' is already used"):
        load_cp(tmp_path, "models:\n  - {name: a, aliases: [x]}\n  - {name: b, aliases: [x]}\n")


@pytest.mark.parametrize(("path", "model"), [
    ("embedded/controlplane.yaml", cp_config.ControlPlaneSettings),
    ("embedded/agent.yaml", agent_config.AgentSettings),
    ("production/controlplane.yaml", cp_config.ControlPlaneSettings),
    ("production/agent.yaml", agent_config.AgentSettings),
    ("simulator-profile.yaml", sim_config.SimulatorSettings),
])
def test_examples_load(path: str, model: type, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SYNAPSE_DEV_ADMIN_KEY", "SYNAPSE_DEV_API_KEY", "SYNAPSE_REDIS_URL",
                 "SYNAPSE_MILVUS_URI", "SYNAPSE_MILVUS_TOKEN", "SYNAPSE_DEV_AGENT_TOKEN",
                 "SYNAPSE_AGENT_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    monkeypatch.setenv("SYNAPSE_REDIS_URL", "redis://value-of-synapse_redis_url:6379/0")
    raw = (EXAMPLES / path).read_text()
    data = settings.read_yaml(str(EXAMPLES / path), required=True)
    if "/var/run/secrets" in raw and "auth" in data:
        # Production mounts secret files; stand them in with the file form resolved here
        # (a metrics.bearer_token_file is read at start, not by the settings).
        data["auth"]["admin_key"] = "stand-in-admin-key"
        data["auth"]["key_file"] = None
    loaded = settings.validate(model, data)
    assert isinstance(loaded, model)


def test_logging_redacts_loaded_secrets(tmp_path: pathlib.Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    import io

    from synapse_common import logs

    loaded = load_cp(tmp_path, "auth:\n  admin_key: sk-very-secret-admin\n")
    stream = io.StringIO()
    logs.setup(fmt="json", secrets=settings.secret_values(loaded), stream=stream)
    try:
        logging.getLogger("t").warning("key was %s", "sk-very-secret-admin",
                                       extra={"header": "Bearer sk-very-secret-admin"})
    finally:
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "sk-very-secret-admin" not in text
    assert "***" in text


SECRET = "sk-never-shown-0123456789"
# (root model, config file, environment, the field the line must name)
LEAKS = [
    # a whole section given as its secret: a Redis URL with a password, the admin key,
    # a tenant's key, the agent's token, in the file or in SYNAPSE_*
    (cp_config.ControlPlaneSettings, f'redis: "redis://:{SECRET}@redis:6379"\n', {}, "redis"),
    (cp_config.ControlPlaneSettings, "", {"SYNAPSE_REDIS": f"redis://:{SECRET}@redis"},
     "redis"),
    (cp_config.ControlPlaneSettings, f'auth: "{SECRET}"\n', {}, "auth"),
    (cp_config.ControlPlaneSettings, f'auth:\n  tenants: ["{SECRET}"]\n', {},
     "auth.tenants.0"),
    (cp_config.ControlPlaneSettings, "", {"SYNAPSE_AUTH__TENANTS": f"[{SECRET}]"},
     "auth.tenants.0"),
    (agent_config.AgentSettings, f'control_plane: "{SECRET}"\n', {}, "control_plane"),
    (agent_config.AgentSettings, f'metrics: "{SECRET}"\n', {}, "metrics"),
    # credentials in a URL, where the field is refused for another reason
    (cp_config.ControlPlaneSettings,
     f"upstreams:\n- {{name: x, url: 'ftp://user:{SECRET}@h', models: [m]}}\n", {},
     "upstreams.0.url"),
    (cp_config.ControlPlaneSettings, f"logging:\n  level: 'redis://u:{SECRET}@h'\n", {},
     "logging.level"),
    # a key written one line off, into a field beside the secrets
    (cp_config.ControlPlaneSettings, f"auth:\n  enabled: {SECRET}\n", {}, "auth.enabled"),
    (cp_config.ControlPlaneSettings, f"auth:\n  tenants:\n  - {{name: a, burst: {SECRET}}}\n",
     {}, "auth.tenants.0.burst"),
]


@pytest.mark.parametrize(("model", "text", "environ", "field"), LEAKS,
                         ids=[f"{i}-{f}" for i, (_, _, _, f) in enumerate(LEAKS)])
def test_an_error_never_quotes_a_secret_and_still_names_the_field(
        tmp_path: pathlib.Path, model: type, text: str, environ: dict[str, str],
        field: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(settings.ConfigError) as err:
        settings.load(model, str(path), environ=environ)
    line = str(err.value)
    assert SECRET not in line, line
    assert f": {field}: " in line and "(got a string)" in line, line


def test_a_section_given_as_a_string_says_a_section_was_expected(
        tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, f'redis: "redis://:{SECRET}@redis:6379"\n')
    assert str(err.value).endswith(": redis: expected a section (a mapping of its settings) "
                                   "(got a string)"), err.value


@pytest.mark.parametrize(("text", "shown"), [
    ("http:\n  port: abc\n", "http.port: input should be a valid integer, unable to parse "
                             "string as an integer (got 'abc')"),
    ("logging:\n  level: loud\n", "(got 'loud')"),
    ("http:\n  port: 70000\n", "(got 70000)"),
])
def test_a_plain_value_is_still_quoted(tmp_path: pathlib.Path, text: str, shown: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, text)
    assert shown in str(err.value), err.value


@pytest.mark.parametrize("text", [f"a: *{SECRET}\n", f"a: !{SECRET} x\n", f"a: !'{SECRET} x\n",
                                  f"auth:\n  admin_key: {SECRET}\n   x: [\n"])
def test_broken_yaml_says_where_and_never_what(tmp_path: pathlib.Path, text: str) -> None:
    """PyYAML's own message shows the lines around the problem and names an undefined
    alias or an unknown tag as written."""
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, text)
    line = str(err.value)
    assert SECRET not in line and "at line " in line and ", column " in line, line
    assert "\n" not in line


@pytest.mark.parametrize("value", ["#abcdefgh12345678", "null", "~", "abcdefgh12345678 #tail",
                                   "'quoted-0123456789'", "[a-0123456789]", "12345678901234567"])
def test_a_secret_from_the_environment_is_taken_as_written(value: str) -> None:
    """Read as YAML, the first three were no key at all, and the fourth lost its tail,
    silently."""
    loaded = settings.load(cp_config.ControlPlaneSettings, None,
                           environ={"SYNAPSE_AUTH__ADMIN_KEY": value,
                                    "SYNAPSE_CACHE__MILVUS_TOKEN": value})
    assert loaded.auth.admin_key is not None and loaded.cache.milvus_token is not None
    assert loaded.auth.admin_key.get_secret_value() == value
    assert loaded.cache.milvus_token.get_secret_value() == value
    agent = settings.load(agent_config.AgentSettings, None,
                          environ={"SYNAPSE_CONTROL_PLANE__TOKEN": value})
    assert agent.control_plane.token is not None
    assert agent.control_plane.token.get_secret_value() == value
    sim = settings.load(sim_config.SimulatorSettings, None, environ={"SYNAPSE_API_KEY": value})
    assert sim.api_key is not None and sim.api_key.get_secret_value() == value


def test_a_string_from_the_environment_is_taken_as_written() -> None:
    loaded = settings.load(cp_config.ControlPlaneSettings, None,
                           environ={"SYNAPSE_REPLICA_ID": "cp #7", "SYNAPSE_HTTP__PORT": "9002",
                                    "SYNAPSE_CACHE__ENABLED": "false"})
    assert loaded.replica_id == "cp #7"
    assert loaded.http.port == 9002 and loaded.cache.enabled is False


@pytest.mark.parametrize(("text", "shown"), [
    ("auth:\n  admin_key: x\nauth:\n  enabled: false\n",
     "line 3: duplicate key 'auth' (first at line 1; the later one would replace it)"),
    ("http:\n  port: 1\n  port: 2\n", "line 3: duplicate key 'port' in http"),
    ("upstreams:\n- {name: a, url: 'http://h', models: [m], models: [n]}\n",
     "line 2: duplicate key 'models' in upstreams.0"),
    ("'http': {port: 1}\nhttp: {port: 2}\n", "line 2: duplicate key 'http'"),
])
def test_a_repeated_key_is_refused_with_its_line(tmp_path: pathlib.Path, text: str,
                                                 shown: str) -> None:
    """PyYAML keeps the last of two equal keys: a second ``auth:`` silently replaced the
    first, its tenants and admin key dropped and the API opened."""
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, text)
    line = str(err.value)
    assert line.startswith(f"config file {tmp_path / 'config.yaml'}: ") and shown in line, line


def test_a_merge_key_may_be_overridden_and_aliases_are_walked_once() -> None:
    """``<<: *base`` then a key of base's is YAML's way to override, not a repeated key;
    and nested aliases (a "billion laughs") are checked in the time of their text."""
    assert settings.parse_yaml("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n") == {
        "b": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(12))
    assert len(settings.parse_yaml(bomb)) == 13


def test_a_repeated_key_in_an_environment_value_names_the_variable() -> None:
    with pytest.raises(settings.ConfigError, match=r"^SYNAPSE_HTTP: line 1: duplicate key 'port'"):
        settings.load(cp_config.ControlPlaneSettings, None,
                      environ={"SYNAPSE_HTTP": "{port: 1, port: 2}"})


def test_a_mapping_from_the_environment_merges_into_the_files_section(
        tmp_path: pathlib.Path) -> None:
    """``SYNAPSE_HTTP='{port: 1}'`` used to replace the whole ``http`` section: the file's
    ``host: 127.0.0.1`` was dropped and the API bound every interface."""
    loaded = load_cp(tmp_path, "http:\n  host: 127.0.0.1\n  port: 8080\n"
                     "auth:\n  admin_key: sk-admin-0123456789abcdef\n"
                     "  agent_token: sk-agent-0123456789abcdef\n"
                     "  agent_review:\n    audience: ours\n"
                     "    service_accounts: ['system:serviceaccount:a:old']\n"
                     "  tenants: [{name: a}, {name: b}]\n",
                     {"SYNAPSE_HTTP": "{port: 9001}",
                      "SYNAPSE_AUTH": "{agent_review: {service_accounts: "
                                      "['system:serviceaccount:a:new']}, tenants: [{name: c}]}"})
    assert (loaded.http.host, loaded.http.port) == ("127.0.0.1", 9001)
    review = loaded.auth.agent_review
    assert review is not None and review.audience == "ours"   # merged at depth
    assert review.service_accounts == ["system:serviceaccount:a:new"]   # a list replaces
    assert [t.name for t in loaded.auth.tenants] == ["c"]
    assert loaded.auth.admin_key is not None    # the section's other fields are kept
    assert loaded.auth.admin_key.get_secret_value() == "sk-admin-0123456789abcdef"


def test_a_secret_from_the_environment_replaces_the_files_form(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret's ``{file: …}`` is a value, not a section: merging an ``{env: …}`` into
    it would make a form that is neither."""
    monkeypatch.setenv("SYNAPSE_TEST_REDIS", "redis://:pw@127.0.0.1:1/0")
    loaded = load_cp(tmp_path, f"redis:\n  url: {{file: {tmp_path / 'absent'}}}\n"
                     "  timeout_s: 0.5\n",
                     {"SYNAPSE_REDIS": "{url: {env: SYNAPSE_TEST_REDIS}}"})
    assert loaded.redis.url is not None and loaded.redis.timeout_s == 0.5
    assert loaded.redis.url.get_secret_value() == "redis://:pw@127.0.0.1:1/0"


@pytest.mark.parametrize(("model", "environ", "field"), [
    (cp_config.ControlPlaneSettings, {"SYNAPSE_CACHE__TTL_S": ".inf"}, "cache.ttl_s"),
    (cp_config.ControlPlaneSettings, {"SYNAPSE_AUTH__TENANTS": "[{name: a, weight: .nan}]"},
     "auth.tenants.0.weight"),
    (agent_config.AgentSettings, {"SYNAPSE_CONTROL_PLANE__REPORT_INTERVAL_S": "inf"},
     "control_plane.report_interval_s"),
    (sim_config.SimulatorSettings, {"SYNAPSE_PROFILE__DECODE_BASE_S": ".inf"},
     "profile.decode_base_s"),
])
def test_no_number_setting_is_infinite_or_nan(model: type, environ: dict[str, str],
                                              field: str) -> None:
    """YAML's ``.inf`` passed every ``> 0`` check (a cache entry kept for ever)."""
    with pytest.raises(settings.ConfigError, match=rf"{field}: input should be a finite number"):
        settings.load(model, None, environ=environ)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(settings.ConfigError, match="data_dir: exists and is no directory"):
        load_cp(tmp_path, f"data_dir: {tmp_path / 'file'}\n")
    assert load_cp(tmp_path, f"data_dir: {tmp_path / 'not-yet'}\n").data_dir.endswith("not-yet")


@pytest.mark.parametrize(("variable", "value", "field"), [
    ("SYNAPSE_HTTP__PORT", "SEKRIT-admin-1234567890", "http.port"),
    ("SYNAPSE_CACHE__ENABLED", "SEKRIT-milvus", "cache.enabled"),
    ("SYNAPSE_HTTP", "{port: SEKRIT-in-a-section}", "http.port"),
])
def test_an_error_in_a_value_from_the_environment_names_the_variable_not_the_value(
        tmp_path: pathlib.Path, variable: str, value: str, field: str) -> None:
    """``SYNAPSE_HTTP__PORT=<secret>`` printed the secret ("(got '…')")
    and blamed the config file, which holds no such value."""
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, "http:\n  port: 8080\n", {variable: value})
    message = str(err.value)
    assert message.startswith(f"{variable}: {field}: "), message
    assert "SEKRIT" not in message and "config.yaml" not in message


def test_an_error_in_the_file_still_names_the_file_and_quotes_a_plain_value(
        tmp_path: pathlib.Path) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load_cp(tmp_path, "http:\n  port: abc\n", {"SYNAPSE_CACHE__ENABLED": "false"})
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: http.port: ") and "'abc'" in message

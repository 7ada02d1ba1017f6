"""Loading process settings: one YAML file plus `SYNAPSE_*` overrides, validated by pydantic.

The three processes (control plane, agent, simulator) each own a pydantic root model; this
module is the one place that reads the file and the environment and turns a validation
failure into a single line that names the field.

Rules (documented in the README):

* The file is ``--config PATH``, else ``$SYNAPSE_CONFIG_PATH``, else
  ``/etc/synapse/config.yaml``. The default path may be absent (defaults apply); a path
  that was asked for explicitly must exist.
* ``SYNAPSE_<SECTION>__<FIELD>=value`` overrides one value: the field path in upper case,
  nested levels joined by a double underscore (``SYNAPSE_HTTP__PORT=9000`` sets
  ``http.port``; ``SYNAPSE_NODE_NAME=gpu-1`` sets the top-level ``node_name``). The value
  is parsed as a YAML scalar, so ``true``, ``12`` and ``[a, b]`` work. Variables that name
  no field of this process are ignored (the same environment may serve several processes),
  except under a known section, where an unknown field is an error.
* Secrets are fields typed :data:`Secret`. In YAML they may be a literal, ``{env: NAME}``
  or ``{file: /path}``; they are held as :class:`pydantic.SecretStr`, so ``repr`` and logs
  show ``**********``. :func:`secret_values` lists them for the log redaction filter.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, TypeVar

import pydantic
import yaml

from synapse_common import tasks as task_names

DEFAULT_CONFIG_PATH = "/etc/synapse/config.yaml"
ENV_PREFIX = "SYNAPSE_"
# Variables with the prefix that are not field overrides.
RESERVED_ENV = frozenset({"SYNAPSE_CONFIG_PATH", "SYNAPSE_ADMIN_ADDR", "SYNAPSE_ADMIN_TOKEN",
                          "SYNAPSE_ADMIN_TOKEN_FILE"})

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


class ConfigError(Exception):
    """An unusable configuration; ``str()`` is the one line shown to the operator."""


def _resolve_secret(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"env"}:
            name = str(value["env"])
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            return os.environ[name]
        if set(value) == {"file"}:
            path = pathlib.Path(str(value["file"]))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        raise ValueError("expected a string, {env: NAME} or {file: PATH}")
    return value


Secret = Annotated[pydantic.SecretStr, pydantic.BeforeValidator(_resolve_secret)]
"""A secret setting: a literal, ``{env: NAME}`` or ``{file: PATH}``; never shown."""

TaskList = Annotated[list[str], pydantic.AfterValidator(lambda v: list(task_names.check(v)))]
"""Task names (:mod:`synapse_common.tasks`), de-duplicated; an unknown one is refused."""


def tasks_field(empty: str) -> Any:
    """The ``tasks`` setting of a backend (the agent's) or an upstream (the control
    plane's): a :data:`TaskList` whose description names every task of
    :mod:`synapse_common.tasks`, so it never lags behind them; ``empty`` says what no list
    means for that kind of backend."""
    return pydantic.Field(default_factory=list, description=(
        f"every API it serves ({', '.join(task_names.ALL)}; the paths of each are in "
        f"synapse_common.tasks); empty = {empty}"))


def resolve_config_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[str, bool]:
    """The config file to read and whether it was asked for explicitly."""
    if explicit:
        return explicit, True
    if environ.get("SYNAPSE_CONFIG_PATH"):
        return environ["SYNAPSE_CONFIG_PATH"], True
    return DEFAULT_CONFIG_PATH, False


def read_yaml(path: str, required: bool) -> dict[str, Any]:
    p = pathlib.Path(path)
    if not p.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def _field_names(model: type[pydantic.BaseModel]) -> dict[str, pydantic.fields.FieldInfo]:
    return dict(model.model_fields)


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def apply_env_overrides(model: type[pydantic.BaseModel], data: dict[str, Any],
                        environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every matching ``SYNAPSE_*`` variable applied."""
    out = dict(data)
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key in RESERVED_ENV:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        _apply_one(model, out, parts, environ[key], key)
    return out


def _apply_one(model: type[pydantic.BaseModel], data: dict[str, Any], parts: list[str],
               raw: str, env_name: str) -> None:
    fields = _field_names(model)
    head = parts[0]
    if head not in fields:
        return  # belongs to another process
    if len(parts) == 1:
        data[head] = _parse_scalar(raw)
        return
    cursor: dict[str, Any] = data
    current: type[pydantic.BaseModel] | None = model
    for i, part in enumerate(parts):
        known = _field_names(current) if current else {}
        if current is not None and part not in known:
            path = ".".join(parts[: i + 1])
            raise ConfigError(f"{env_name}: {path} is not a setting")
        last = i == len(parts) - 1
        if last:
            cursor[part] = _parse_scalar(raw)
            return
        nested = cursor.get(part)
        if not isinstance(nested, dict):
            nested = {}
        nested = dict(nested)
        cursor[part] = nested
        cursor = nested
        current = _submodel(known[part].annotation) if current else None


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


# A setting whose path names one of these holds a secret: its value is never quoted.
_SECRET_PATH = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)


def _format_error(err: Mapping[str, Any]) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p != "__root__"]
    loc = ".".join(parts) or "(top level)"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"{loc}: unknown setting"
    if ("input" in err and err.get("type") not in ("missing",)
            and not any(_SECRET_PATH.search(p) for p in parts)):
        value = err["input"]
        if isinstance(value, str | int | float | bool) and not isinstance(value, dict):
            return f"{loc}: {msg[:1].lower() + msg[1:]} (got {value!r})"
    return f"{loc}: {msg[:1].lower() + msg[1:]}"


def describe(exc: pydantic.ValidationError) -> str:
    """One line for a validation error: the first problem (no secret's value quoted) and
    how many more."""
    errors = exc.errors(include_url=False)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_format_error(errors[0])}{more}"


def validate(model: type[ModelT], data: Mapping[str, Any], source: str = "config") -> ModelT:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{source}: {describe(exc)}") from None


def load(model: type[ModelT], path: str | None = None,
         environ: Mapping[str, str] | None = None) -> ModelT:
    """Read, override and validate; raises :class:`ConfigError` with one line."""
    env = os.environ if environ is None else environ
    file_path, required = resolve_config_path(path, env)
    data = read_yaml(file_path, required)
    data = apply_env_overrides(model, data, env)
    return validate(model, data, source=file_path if required else "config")


def override(loaded: ModelT, overrides: Mapping[str, object],
             source: str = "command line") -> ModelT:
    """``loaded`` with single values replaced, each named by its dotted path (``None``
    leaves a value as it is): command-line flags, applied after the file and the
    environment."""
    data = loaded.model_dump(mode="python")
    for path, value in overrides.items():
        if value is None:
            continue
        cursor = data
        *parents, last = path.split(".")
        for p in parents:
            cursor = cursor[p]
        cursor[last] = value
    return validate(type(loaded), data, source=source)


def secret_values(settings: pydantic.BaseModel) -> list[str]:
    """Every non-empty secret in a settings tree, for log redaction."""
    return [s for s in _walk_secrets(settings) if s]


def _walk_secrets(value: Any) -> Iterator[str]:
    if isinstance(value, pydantic.SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, pydantic.BaseModel):
        for name in type(value).model_fields:
            yield from _walk_secrets(getattr(value, name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_secrets(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _walk_secrets(v)


class Section(pydantic.BaseModel):
    """Base of every settings model: unknown keys are errors, values are immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class LoggingSettings(Section):
    format: str = pydantic.Field("human", pattern="^(human|json)$",
                                 description="log line format: human or json")
    level: str = pydantic.Field("info", pattern="^(debug|info|warning|error)$",
                                description="minimum level logged")

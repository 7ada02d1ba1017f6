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
  is parsed as a YAML scalar, so ``true``, ``12`` and ``[a, b]`` work, except for a string
  or secret setting, which takes the value exactly as written: YAML would turn a key
  starting with ``#``, or ``null`` or ``~``, into no key at all, and cut ``abc #tail`` at
  the ``#``, silently. A mapping given for a section merges into the file's section, field
  by field and into its sections (:func:`_merged`); any other value replaces the file's.
  Variables that name no field of this process are ignored (the same environment may serve
  several processes), except under a known section, where an unknown field is an error.
* A key written twice in one YAML mapping is an error naming its line (:func:`parse_yaml`,
  the one loader of every config: files, ``auth.key_file``, simulator profiles, mappings
  from the environment). Numbers are finite (:class:`Section`).
* Secrets are fields typed :data:`Secret`. In YAML they may be a literal, ``{env: NAME}``
  or ``{file: /path}``; they are held as :class:`pydantic.SecretStr`, so ``repr`` and logs
  show ``**********``. :func:`secret_values` lists them for the log redaction filter.
  :func:`load` tells the caller (``secret_env``) which variables ``{env: NAME}`` read, so
  that a process can keep them from its children (the agent's engines).
* An error quotes the offending value only where that value is known to be no secret: a
  scalar field (string, number, flag, choice) of a section that holds no secret field,
  whose name does not sound like one, and whose value is no URL with credentials in it.
  Anywhere else (a whole section given as a string, an item of a list, a field beside a
  key) the line names the field, what it expected and the kind of value it got, never the
  value: a section written as a string is, more often than not, the secret that was meant
  for one of its fields. A YAML syntax error likewise gives the problem and its line and
  column, never the text around it (:func:`load_yaml`, shared with ``auth.key_file``).
* An error in a value a ``SYNAPSE_*`` variable set (or in a section it gave) names that
  variable, not the file, and shows nothing of the input: the environment is where secrets
  are passed, and a value set one variable off is shown nowhere else. Nothing of the input
  means no value, no message of a validator (ours quote values), and no key the input
  wrote in the location (``<key>``). A check over a section that holds such a value (or
  over everything, with no location) is reported the same way, naming the variables.
"""

from __future__ import annotations

import enum
import os
import pathlib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, TypeVar

import pydantic
import pydantic_core
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


def _resolve_secret(value: Any, info: pydantic.ValidationInfo) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"env"}:
            name = str(value["env"])
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            if isinstance(info.context, _SecretEnv):
                info.context.names.add(name)
            return os.environ[name]
        if set(value) == {"file"}:
            path = pathlib.Path(str(value["file"]))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        raise ValueError("expected a string, {env: NAME} or {file: PATH}")
    return value


class _SecretEnv:
    """The validation context that collects the variables secrets were read from."""

    def __init__(self, names: set[str]) -> None:
        self.names = names


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
    if not pathlib.Path(path).exists():
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    data = load_yaml(path, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def load_yaml(path: str | pathlib.Path, label: str) -> Any:
    """The YAML document in the file ``path``, or a :class:`ConfigError` starting with
    ``label`` that says what is wrong and at which line and column, never the text there:
    the file may hold keys (PyYAML's own message shows the lines around the problem).
    A key written twice in one mapping is refused (:class:`DuplicateKey`)."""
    try:
        return parse_yaml(pathlib.Path(path).read_text(encoding="utf-8"))
    except DuplicateKey as exc:
        raise ConfigError(f"{label}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read it ({exc})") from None


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML the way every config is read: safely, and refusing a key
    written twice in one mapping (:class:`DuplicateKey`)."""
    return yaml.load(text, Loader=_ConfigLoader)   # a SafeLoader: no object tags


class DuplicateKey(yaml.YAMLError):
    """A key written twice in one mapping. PyYAML keeps the last one, silently: a second
    ``auth:`` section (two config snippets pasted together, a Helm values mistake) used to
    replace the first whole, its tenants, limits and admin key dropped and the API opened
    without a word. ``str()`` names the line, the key and where it was first written."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, checking the document for repeated keys before building it.

    The check walks the composed nodes (each once: aliases share theirs, so a document of
    nested aliases costs no more than its text) rather than hooking ``construct_mapping``,
    where merge keys (``<<: *base``) have already been flattened into the mapping and a
    key that overrides a merged one would look repeated."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_repeated_keys(self, node)
        return super().construct_document(node)


def _refuse_repeated_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}.{i}" if where else str(i))
                         for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(_mapping_children(loader, node, where))


def _mapping_children(loader: yaml.SafeLoader, node: yaml.MappingNode,
                      where: str) -> list[tuple[yaml.Node, str]]:
    """The values of ``node`` to look into, each with its path; :class:`DuplicateKey` when
    a plain key (not a merge ``<<``) is written twice."""
    first: dict[Any, int] = {}
    children = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            children.append((value_node, where))
            continue
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first:
            inside = f" in {where}" if where else ""
            raise DuplicateKey(f"line {line}: duplicate key {_key_shown(key)}{inside} (first "
                               f"at line {first[key]}; the later one would replace it)")
        first[key] = line
        children.append((value_node, f"{where}.{key}" if where else str(key)))
    return children


def _key_shown(key: Any) -> str:
    """A repeated key as the line shows it: keys are setting and model names, but a long
    one is cut, as the line is no place for a pasted value."""
    text = repr(key)
    return text if len(text) <= 66 else f"{text[:62]}…{text[-1]}"


# A quoted piece of a YAML problem kept as it is: one character, an escape or a token name
# ('<stream end>'); anything longer may be an alias or tag copied from the file.
_YAML_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_YAML_KEPT = re.compile(r"(.|\\.*|<[a-z ]+>)?")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    problem = _YAML_QUOTED.sub(
        lambda m: m.group(0) if _YAML_KEPT.fullmatch(m.group(1) or m.group(2) or "")
        else "'…'", problem)
    return f"{problem}{where}"


def _field_names(model: type[pydantic.BaseModel]) -> dict[str, pydantic.fields.FieldInfo]:
    return dict(model.model_fields)


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def apply_env_overrides(model: type[pydantic.BaseModel], data: dict[str, Any],
                        environ: Mapping[str, str],
                        origins: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """Return ``data`` with every matching ``SYNAPSE_*`` variable applied; ``origins`` is
    given the path each one set and its name."""
    out = dict(data)
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or key in RESERVED_ENV:
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        applied = _apply_one(model, out, parts, environ[key], key)
        if origins is not None and applied is not None:
            section, value = applied
            for path in _paths_set(section, tuple(parts), value):
                origins[path] = key
    return out


def _paths_set(section: type[pydantic.BaseModel] | None, path: tuple[str, ...],
               value: Any) -> Iterator[tuple[str, ...]]:
    """The paths a variable's ``value`` for ``path`` (a setting of type ``section``) sets:
    a mapping over a section is merged with the file's, so each of its keys (into its
    sections too) is one, and the file's values beside them stay the file's; anything
    else sets ``path`` itself."""
    if section is None or not isinstance(value, dict):
        yield path
        return
    fields = section.model_fields
    for key, inner in value.items():
        name = str(key)
        yield from _paths_set(_section(fields[name].annotation) if name in fields else None,
                              (*path, name), inner)


def _origin(loc: tuple[Any, ...], origins: Mapping[tuple[str, ...], str]) -> str | None:
    """The variable that set the value at ``loc`` (or a section holding it), if any."""
    path = tuple(str(p) for p in loc)
    found = [(len(at), name) for at, name in origins.items() if path[:len(at)] == at]
    return max(found)[1] if found else None


def _covered(loc: tuple[Any, ...], origins: Mapping[tuple[str, ...], str]) -> list[str]:
    """The variables that set a value inside the section at ``loc`` (everything, for the
    top level): an error there may be about, and quote, any of them."""
    path = tuple(str(p) for p in loc if p != "__root__")
    return sorted(name for at, name in origins.items() if at[:len(path)] == path)


def _apply_one(model: type[pydantic.BaseModel], data: dict[str, Any], parts: list[str],
               raw: str, env_name: str) -> tuple[type[pydantic.BaseModel] | None, Any] | None:
    """Apply one variable to ``data``; the value it gave and the section that value is
    of (``None`` for a plain setting), or ``None`` when it is another process's."""
    fields = _field_names(model)
    head = parts[0]
    if head not in fields:
        return None  # belongs to another process
    if len(parts) == 1:
        section = _section(fields[head].annotation)
        value = _env_value(fields[head], raw, env_name)
        data[head] = _merged(section, data.get(head), value)
        return section, value
    cursor: dict[str, Any] = data
    current: type[pydantic.BaseModel] | None = model
    for i, part in enumerate(parts):
        known = _field_names(current) if current else {}
        if current is not None and part not in known:
            path = ".".join(parts[: i + 1])
            raise ConfigError(f"{env_name}: {path} is not a setting")
        last = i == len(parts) - 1
        if last:
            value = (_env_value(known[part], raw, env_name) if current
                     else _parse_scalar(raw, env_name))
            section = _section(known[part].annotation) if current else None
            cursor[part] = _merged(section, cursor.get(part), value)
            return section, value
        nested = cursor.get(part)
        if not isinstance(nested, dict):
            nested = {}
        nested = dict(nested)
        cursor[part] = nested
        cursor = nested
        current = _submodel(known[part].annotation) if current else None
    return None  # not reached: the last part returns above


def _merged(section: type[pydantic.BaseModel] | None, base: Any, override: Any) -> Any:
    """``override`` laid over ``base``, the file's value of a setting of type ``section``:
    a mapping over a section merges field by field, into its sections too
    (``SYNAPSE_HTTP='{port: 1}'`` used to replace the file's whole ``http``, its ``host``
    dropped and the default, every interface, bound); anything else replaces, a list, a
    free-form mapping and a secret's ``{env: …}`` / ``{file: …}`` form included."""
    if section is None or not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    out = dict(base)
    fields = section.model_fields
    for key, value in override.items():
        inner = _section(fields[key].annotation) if key in fields else None
        out[key] = _merged(inner, out.get(key), value)
    return out


def _section(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The section a setting of ``annotation`` holds (``None`` allowed beside it), if any."""
    kinds = _unwrap(annotation)
    return _submodel(kinds[0]) if len(kinds) == 1 else None


def _env_value(field: pydantic.fields.FieldInfo, raw: str, env_name: str) -> Any:
    """A variable's value for ``field``: as written for a string or a secret (YAML would
    read ``#k…`` or ``null`` as no key, and cut ``k… #tail``), else a YAML scalar."""
    return raw if _is_text(field.annotation) else _parse_scalar(raw, env_name)


def _parse_scalar(raw: str, env_name: str) -> Any:
    """``raw`` as YAML, or as written when it is no YAML; a mapping in it that repeats a
    key is an error naming the variable, as it would be in the file."""
    try:
        return parse_yaml(raw) if raw.strip() else raw
    except DuplicateKey as exc:
        raise ConfigError(f"{env_name}: {exc}") from None
    except yaml.YAMLError:
        return raw


def _unwrap(annotation: Any) -> list[Any]:
    """The types ``annotation`` admits, ``Annotated`` and ``None`` taken off."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) if a is not type(None)
                for t in _unwrap(a)]
    return [annotation]


def _is_secret(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(
        annotation, pydantic.SecretStr | pydantic.SecretBytes)


def _is_text(annotation: Any) -> bool:
    """A string or secret setting (a choice of strings included)."""
    kinds = _unwrap(annotation)
    return bool(kinds) and all(
        k is str or _is_secret(k) or (typing.get_origin(k) is typing.Literal
                                     and all(isinstance(v, str) for v in typing.get_args(k)))
        for k in kinds)


def _holds_secret(annotation: Any) -> bool:
    """Whether a value of ``annotation`` may be a secret, in a list or mapping included
    (not looking into sections, which are judged on their own)."""
    if _is_secret(annotation):
        return True
    return any(_holds_secret(a) for a in typing.get_args(annotation)
               if not isinstance(a, type) or not issubclass(a, pydantic.BaseModel))


def _is_plain_scalar(annotation: Any) -> bool:
    kinds = _unwrap(annotation)
    return bool(kinds) and all(
        k in (str, int, float, bool) or typing.get_origin(k) is typing.Literal
        or (isinstance(k, type) and issubclass(k, enum.Enum)) for k in kinds)


def _quotable_at(model: type[pydantic.BaseModel] | None, loc: tuple[Any, ...]) -> bool:
    """Whether the value at ``loc`` of ``model`` may be shown: a scalar field, not secret,
    of a section with no secret field (a key written one field off would be quoted)."""
    holder: type[pydantic.BaseModel] | None = None
    annotation: Any = model
    for part in loc:
        kinds = _unwrap(annotation)
        section = _submodel(kinds[0]) if len(kinds) == 1 else None
        if section is not None and part in section.model_fields:
            holder, annotation = section, section.model_fields[part].annotation
            continue
        holder = None  # inside a list or a mapping (free-form: args, env), or unknown
        origin = typing.get_origin(kinds[0]) if len(kinds) == 1 else None
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            annotation = typing.get_args(kinds[0])[0]
        elif origin is dict:
            annotation = typing.get_args(kinds[0])[-1]
        else:
            return False
    return (holder is not None and _is_plain_scalar(annotation)
            and not any(_holds_secret(f.annotation) for f in holder.model_fields.values()))


# A setting whose path names one of these holds a secret: its value is never quoted.
_SECRET_PATH = re.compile(r"key|token|secret|password|credential", re.IGNORECASE)
# A URL with a user or password in it (scheme://user:password@host).
_URL_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]*@", re.IGNORECASE)
_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false",
          list: "a list", dict: "a mapping", type(None): "nothing"}


def _shown(model: type[pydantic.BaseModel] | None, err: Mapping[str, Any],
           parts: list[str], quote: bool = True) -> str:
    """What the error says it got: the value where it is safe to show (and ``quote``),
    else its kind."""
    value = err["input"]
    if (quote and isinstance(value, str | int | float | bool)
            and _quotable_at(model, err["loc"])
            and not any(_SECRET_PATH.search(p) for p in parts)
            and not (isinstance(value, str) and _URL_USERINFO.search(value))):
        return f" (got {value!r})"
    kind = _KINDS.get(type(value))
    # Our own validators' messages say what is wrong with the value already.
    plain = kind and kind != "a mapping" and err.get("type") != "value_error"
    return f" (got {kind})" if plain else ""


def _format_error(err: Mapping[str, Any],
                  model: type[pydantic.BaseModel] | None = None, quote: bool = True) -> str:
    if not quote:
        return _format_withheld(err, model)
    parts = [str(p) for p in err.get("loc", ()) if p != "__root__"]
    loc = ".".join(parts) or "(top level)"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"{loc}: unknown setting"
    if not parts and err.get("type") == "value_error":
        return msg   # a check across sections, whose message names its fields
    if err.get("type") == "model_type":   # pydantic names the class, not the YAML shape
        msg = "expected a section (a mapping of its settings)"
    got = ""
    if "input" in err and err.get("type") != "missing":
        got = _shown(model, err, parts, quote)
    return f"{loc}: {msg[:1].lower() + msg[1:]}{got}"


# Pydantic's own error types; their messages are made from the schema (a bound, the
# choices), not from the input. Not among them: our validators' messages, which may quote
# the value, and the few of pydantic's that quote a piece of the input.
_SCHEMA_MESSAGES = frozenset(typing.get_args(pydantic_core.core_schema.ErrorType)) - {
    "value_error", "assertion_error", "union_tag_invalid", "get_attribute_error"}
# Where a key of the input stands in a location shown without the input.
KEY_PLACEHOLDER = "<key>"


def _format_withheld(err: Mapping[str, Any], model: type[pydantic.BaseModel] | None) -> str:
    """The line for an error that may be in a value from the environment: its location with
    every key that is no setting's name (a key the input wrote) replaced by
    :data:`KEY_PLACEHOLDER`, and what kind of error it is, never a message a validator
    wrote (it may quote the value: a URL with its password, a key written as a list item)."""
    loc = ".".join(_named_loc(model, tuple(err.get("loc", ())))) or "(top level)"
    kind = err.get("type")
    if kind == "extra_forbidden":
        return f"{loc}: unknown setting"
    if kind not in _SCHEMA_MESSAGES:
        what = ("a check across settings failed" if loc == "(top level)"
                else "refused by its check")
        return f"{loc}: {what} (its message is not shown: it may quote the value)"
    msg = str(err.get("msg", "invalid value"))
    if kind == "model_type":   # pydantic names the class, not the YAML shape
        msg = "expected a section (a mapping of its settings)"
    got = _shown(model, err, [], quote=False) if kind != "missing" and "input" in err else ""
    return f"{loc}: {msg[:1].lower() + msg[1:]}{got}"


def _named_loc(model: type[pydantic.BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """``loc`` as shown without the input: a setting's name and a list index as they are,
    any other part (a key of a free-form mapping, an unknown key) as the placeholder."""
    shown: list[str] = []
    annotation: Any = model
    for part in loc:
        if part == "__root__":
            continue
        kinds = _unwrap(annotation) if annotation is not None else []
        section = _submodel(kinds[0]) if len(kinds) == 1 else None
        origin = typing.get_origin(kinds[0]) if len(kinds) == 1 else None
        if section is not None and isinstance(part, str) and part in section.model_fields:
            annotation = section.model_fields[part].annotation
            shown.append(part)
        elif isinstance(part, int) and origin in (list, tuple, set, frozenset):
            annotation = typing.get_args(kinds[0])[0]
            shown.append(str(part))
        elif isinstance(part, int):
            annotation = None
            shown.append(str(part))
        else:
            annotation = typing.get_args(kinds[0])[-1] if origin is dict else None
            shown.append(KEY_PLACEHOLDER)
    return shown


def describe(exc: pydantic.ValidationError,
             model: type[pydantic.BaseModel] | None = None, quote: bool = True) -> str:
    """One line for a validation error of ``model``: the first problem and how many more.
    The value is quoted only where :func:`_quotable_at` finds it no secret (never without
    ``model``); without ``quote`` nothing of the input is shown (:func:`_format_withheld`)."""
    errors = exc.errors(include_url=False)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{_format_error(errors[0], model, quote)}{more}"


def validate(model: type[ModelT], data: Mapping[str, Any], source: str = "config",
             secret_env: set[str] | None = None,
             origins: Mapping[tuple[str, ...], str] | None = None) -> ModelT:
    """``data`` as ``model``; the variables its secrets were read from (``{env: NAME}``)
    are added to ``secret_env``. An error names ``source``, or the variable that set the
    value (``origins``: :func:`apply_env_overrides`), whose value it does not quote."""
    context = _SecretEnv(secret_env) if secret_env is not None else None
    try:
        return model.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        loc = tuple(exc.errors(include_url=False)[0].get("loc", ()))
        variable = _origin(loc, origins or {})
        if variable is not None:
            raise ConfigError(f"{variable}: {describe(exc, model, quote=False)}") from None
        covered = _covered(loc, origins or {})
        if covered:   # a check over a section (or all) that holds a value from a variable
            raise ConfigError(f"{source}: {describe(exc, model, quote=False)}; it covers "
                              f"values set by {', '.join(covered)}") from None
        raise ConfigError(f"{source}: {describe(exc, model)}") from None


def load(model: type[ModelT], path: str | None = None,
         environ: Mapping[str, str] | None = None,
         secret_env: set[str] | None = None) -> ModelT:
    """Read, override and validate; raises :class:`ConfigError` with one line. The names
    of the variables secrets were read from (``{env: NAME}``) are added to ``secret_env``."""
    env = os.environ if environ is None else environ
    file_path, required = resolve_config_path(path, env)
    data = read_yaml(file_path, required)
    origins: dict[tuple[str, ...], str] = {}
    data = apply_env_overrides(model, data, env, origins)
    return validate(model, data, source=file_path if required else "config",
                    secret_env=secret_env, origins=origins)


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
    """Base of every settings model: unknown keys are errors, values are immutable, and a
    number is finite (YAML's ``.inf`` passed every ``> 0`` check: a ``cache.ttl_s`` of
    infinity kept entries for ever; no setting means "no limit" by infinity)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def tls_both_or_neither(cert: str | None, key: str | None) -> None:
    """A ValueError unless a listener's ``tls_cert_file`` and ``tls_key_file`` are both set
    or both unset. TLS needs the certificate and its key: with one of them alone the
    listener used to serve plain text, saying nothing, so keys and prompts an operator
    meant to encrypt crossed the network in the clear. Shared by the control plane's and
    the agent's listeners."""
    if bool(cert) != bool(key):
        given, missing = (("tls_cert_file", "tls_key_file") if cert
                          else ("tls_key_file", "tls_cert_file"))
        raise ValueError(f"{missing}: required with {given} (TLS needs both; with one alone "
                         "the port would serve plain text)")


class LoggingSettings(Section):
    format: str = pydantic.Field("human", pattern="^(human|json)$",
                                 description="log line format: human or json")
    level: str = pydantic.Field("info", pattern="^(debug|info|warning|error)$",
                                description="minimum level logged")

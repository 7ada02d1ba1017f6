"""A served model's own tokenizer and chat template, rendered the way vLLM renders them.

Loaded from a model directory (``tokenizer.json`` beside ``tokenizer_config.json`` and
``chat_template.jinja``, as ``save_pretrained`` writes them) or from a ``tokenizer.json``
path whose directory holds the rest. The ``tokenizers`` library (Rust) encodes; jinja2
renders the template.

What vLLM does for a chat request, and what is reproduced here (vLLM 0.32,
``vllm/renderers/hf.py`` and ``chat_utils.py``; transformers' ``apply_chat_template``):

* message content: a string as is; a list of parts becomes its text parts joined with
  ``"\\n"`` for templates that render ``message['content']`` as a string, or stays a list
  of ``{"type": "text", "text": …}`` parts for templates that loop over the content
  ("openai" format, detected from the template's syntax tree); ``None`` is ``""``;
* the template is rendered in jinja2's ``ImmutableSandboxedEnvironment`` with
  ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
  filter that does not escape HTML, ``raise_exception`` and ``strftime_now``, with
  ``messages``, ``add_generation_prompt`` (vLLM's default: true) and the tokenizer's
  special tokens (``bos_token``, ``eos_token``…) as variables;
* the rendering is encoded without added special tokens (the template has placed them);
  a completion prompt is encoded with them (vLLM's ``add_special_tokens`` default).

Not reproduced: a request's ``tools``, ``chat_template_kwargs``, ``continue_final_message``
or its own ``chat_template`` (such a prompt's hashes miss where the rendering differs).

Cost: encoding is ~1-2 µs per token. Chat prompts repeat (a shared context, the earlier
turns), and the tokenizer cuts its input at added tokens (``<|im_start|>``…) before
anything else, so the rendering is cut there too and each piece's ids are memoised, per
prefix-cache partition (the tenant's: a hit on a piece another tenant sent would tell,
by its speed, that it had sent it; ``controlplane.core.tokenization``). The memo is
bounded per tenant too (each its :func:`tenant_lru.share` of ``MEMO_MAX_TOKENS`` ids, set
by :meth:`HFTokenizer.keep_memos`, its own least recently used pieces dropped past it):
in one order for all, one tenant's long prompts dropped every other tenant's pieces
(their next turns encoded anew), and its own oldest piece, timed after a pause, told it
whether anyone else had sent a prompt meanwhile. For the same
reason the tokenizer's own cache of words (a BPE's, a Unigram's: one for the process)
is turned off, a miss of the memo encoding every word anew. At
load, the pieces' ids are checked against one encoding of the whole rendering of a sample
conversation; a tokenizer for which they differ is used without the memo.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from controlplane.core import tenant_lru, tokenization

log = logging.getLogger("synapse.controlplane.tokenization")

MEMO_MAX_TOKENS = 400_000   # ids held by the memo at most, all tenants
SAMPLE = ({"role": "system", "content": "You are terse. Answer in one word."},
          {"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": " Paris.\n"},
          {"role": "user", "content": "And of  Italy?  "})


class TokenizerError(ValueError):
    """The tokenizer or its chat template cannot be loaded; the message names the path."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """The template in the environment transformers (and so vLLM) renders it in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _is_content(node: jinja2.nodes.Node) -> bool:
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return isinstance(node, jinja2.nodes.Name) and node.name == "content"


def content_format(source: str) -> str:
    """``"openai"`` when the template loops over a message's content parts, else
    ``"string"`` (vLLM's detection, simplified: a ``for`` over ``….content``)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    tree = env.parse(source)
    for loop in tree.find_all(jinja2.nodes.For):
        if _is_content(loop.iter):
            return "openai"
    return "string"


def _text_parts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    parts = []
    for part in content if isinstance(content, Sequence) else [content]:
        if isinstance(part, Mapping) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            parts.append(part)
    return parts


def _special_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _template_source(folder: pathlib.Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    chat_json = _read_json(folder / "chat_template.json").get("chat_template")
    source = chat_json if chat_json is not None else config.get("chat_template")
    if isinstance(source, list):  # named templates: vLLM uses "default" without tools
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    return source if isinstance(source, str) else None


def _memo(tenants: int) -> tenant_lru.TenantLRU[tuple[int, ...]]:
    """A memo of pieces' ids, ``"partition:piece"`` → ids, each of ``tenants`` tenants its
    share of ``MEMO_MAX_TOKENS`` ids (TenantLRU's bytes, measured here in ids) and as many
    pieces (a piece of no ids still takes room)."""
    return tenant_lru.TenantLRU(MEMO_MAX_TOKENS, tenants, MEMO_MAX_TOKENS, len)


class HFTokenizer:
    """One model's tokenizer and chat template (thread-safe for reading; the memo is a
    plain table used from the event loop)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, template_source: str | None,
                 special_tokens: Mapping[str, str], name: str) -> None:
        self.name = name
        self._tok = tokenizer
        _without_word_cache(tokenizer, name)
        self._template = compile_template(template_source) if template_source else None
        self._openai_content = (content_format(template_source) == "openai"
                                if template_source else False)
        self._special_tokens = dict(special_tokens)
        added = tokenizer.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        pattern = "|".join(re.escape(c) for c in sorted(self._added, key=len, reverse=True))
        self._splitter = re.compile(f"({pattern})") if pattern else None
        if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
            self._splitter = None  # such tokens take neighbouring text: no cut there
        # tenant -> "partition:piece" -> ids: a tenant's pieces never answer another's
        self._memo = _memo(1)
        self._prefix, self._suffix = self._added_specials()
        if self._splitter is not None and self._template is not None:
            sample = self.render(SAMPLE)
            if self._split_encode(sample) != self._encode(sample):
                self._splitter = None

    @property
    def has_template(self) -> bool:
        return self._template is not None

    def keep_memos(self, tenants: int) -> None:
        """Give each of the ``tenants`` configured tenants its share of the memo of pieces
        (the app factory calls it, through :meth:`tokenization.Tokenizers.keep_memos`;
        the memo starts empty)."""
        self._memo = _memo(tenants)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def _added_specials(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What the post-processor adds around a single sequence (BOS, EOS…)."""
        bare = self._tok.encode("x", add_special_tokens=False).ids
        full = self._tok.encode("x", add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return tuple(full[:i]), tuple(full[i + len(bare):])
        return (), ()

    def _piece(self, piece: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        # Every piece: a call into the tokenizer costs more than a lookup even for "\n".
        key = f"{partition}:{piece}"
        ids = self._memo.get(tenant, key)
        if ids is None:
            ids = self._encode(piece)
            self._memo.put(tenant, key, ids)    # drops only ``tenant``'s oldest
        return ids

    def _split_encode(self, text: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        assert self._splitter is not None
        out: list[int] = []
        for i, piece in enumerate(self._splitter.split(text)):
            if i % 2:
                out.append(self._added[piece])
            elif piece:
                out.extend(self._piece(piece, partition, tenant))
        return tuple(out)

    def encode_rendered(self, text: str, partition: int = 0,
                        tenant: str = "") -> tuple[int, ...]:
        """Ids of an already rendered chat prompt (no special tokens added); ``partition``
        (the prompt's hash seed) names the part of the memo used, in ``tenant``'s share."""
        if self._splitter is None:
            return self._piece(text, partition, tenant)
        return self._split_encode(text, partition, tenant)

    def encode_prompt(self, text: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        """Ids of a completion prompt (special tokens added, as vLLM does by default)."""
        return self._prefix + self.encode_rendered(text, partition, tenant) + self._suffix

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise TokenizerError(f"{self.name} has no chat template")
        chat = []
        for m in messages:
            parts = _text_parts(m.get("content"))
            content: Any = ([{"type": "text", "text": p} for p in parts]
                            if self._openai_content else "\n".join(parts))
            chat.append({**m, "content": content})
        return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self._special_tokens)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        return self.encode_rendered(self.render(messages), partition, tenant)


def _without_word_cache(tokenizer: Any, name: str) -> None:
    """Turn off the model's own cache of words (BPE's and Unigram's keep one): it serves
    the whole process, every partition, so below the memo of pieces a text with words
    another tenant had sent lately encoded faster than a wrong guess, and its speed told
    that they were sent. Repeats within a partition still come from the memo."""
    model = tokenizer.model
    resize = getattr(model, "_resize_cache", None)
    if resize is not None:
        resize(0)
    elif type(model).__name__ in ("BPE", "Unigram"):
        log.warning("%s: the tokenizer's cache of words cannot be turned off (this "
                    "tokenizers release has no _resize_cache): a word another tenant sent "
                    "lately encodes faster", name)


def _tokenizer_file(path: pathlib.Path) -> pathlib.Path:
    return path / "tokenizer.json" if path.is_dir() else path


@functools.lru_cache(maxsize=16)
def load(path: str) -> HFTokenizer:
    """The tokenizer at ``path`` (a model directory or its ``tokenizer.json``)."""
    file = _tokenizer_file(pathlib.Path(path).expanduser())
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json at {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception
        raise TokenizerError(f"cannot load {file}: {exc}") from None
    folder = file.parent
    config = _read_json(folder / "tokenizer_config.json")
    specials = {k: v for k, raw in config.items()
                if k.endswith("_token") and (v := _special_value(raw)) is not None}
    try:
        source = _template_source(folder, config)
        return HFTokenizer(tok, source, specials, str(folder))
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"the chat template in {folder} does not compile: {exc}") from None


# -- the router's tokenizers (controlplane.core.tokenization's PromptTokenizer) ---------


class ModelTokenizer:
    """A model's own tokenizer; chat prompts need its chat template (without one they are
    counted with the approximation, and say so)."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.name = f"model tokenizer {hf.name}"
        self._hf = hf

    @property
    def has_template(self) -> bool:
        return self._hf.has_template

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        return self._hf.chat_ids(messages, partition, tenant)

    def text_ids(self, text: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        return self._hf.encode_prompt(text, partition, tenant)

    def keep_memos(self, tenants: int) -> None:
        self._hf.keep_memos(tenants)


def model_tokenizers(paths: Mapping[str, str]) -> tokenization.Tokenizers:
    """Canonical model → the tokenizer at its path, loaded now (TokenizerError if not)."""
    by_model: dict[str, tokenization.PromptTokenizer] = {}
    for model, path in paths.items():
        by_model[model] = ModelTokenizer(load(path))
        log.info("model %s: prefix hashing with its own tokenizer (%s)", model, path)
    return tokenization.Tokenizers(by_model)


def from_settings(models: Sequence[Any],
                  canonical: Callable[[str], str]) -> tokenization.Tokenizers:
    """The configured ``models[].tokenizer`` paths, loaded now; a ValueError naming the
    field when one cannot be loaded."""
    paths = {}
    for i, m in enumerate(models):
        if m.tokenizer:
            try:
                load(m.tokenizer)
            except TokenizerError as exc:
                raise ValueError(f"models[{i}].tokenizer: {exc}") from None
            paths[canonical(m.name)] = m.tokenizer
    return model_tokenizers(paths)

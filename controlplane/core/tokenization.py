"""How the router turns a prompt into token ids: the served model's own tokenizer when the
control plane has it (``models[].tokenizer`` in its config), else the shared
approximation of ``synapse_common.tokens``.

The ids feed the prefix index (chained block hashes, in each engine's block size), so
they must be the ids the engine itself hashes: the model's tokenizer and chat template,
rendered as vLLM renders them. Those live in the adapter
:mod:`controlplane.adapters.hf_tokenizer` (the ``tokenizers`` library and jinja2), which
loads ``models[].tokenizer`` and hands :class:`Tokenizers` its :class:`PromptTokenizer`
per model: this module never imports it. The
approximation is right only for engines that use it too (the simulator); for a real
engine its block hashes line up only by accident, so the router then sees fewer cached
tokens than the engine holds. ``explain`` and the route-accuracy metrics say which one a
prediction used.

:class:`Prompt` is tokenized lazily, once per tokenizer, when a model is routed: a request
that falls back to another model with another tokenizer is tokenized again for it.

The approximation keeps the ids of recently rendered messages (a conversation's history
and a system prompt come back with every turn) **per partition**: the memo is keyed by the
prompt's prefix-cache partition (its hash seed, derived from the tenant's salt,
:meth:`Prompt.partition`) as well as by the message. Shared across tenants, a hit told one
tenant by its speed that another had just sent that very message (``count_tokens``
answers without an engine, so its timing was a clean oracle). A message sent by two
tenants is tokenized once for each. The ids of the pieces below (up to four characters,
``synapse_common.tokens``) come from a memo of the partition's own too, of
``PIECES_PER_PARTITION`` pieces: shared, a text tokenized faster when another tenant had
lately sent the same pieces. Both memos are bounded per tenant (each its
:func:`tenant_lru.share` of ``MESSAGES_KEPT`` messages and of ``PARTITIONS_KEPT``
partitions, its own least recently used dropped past it), not in one order for all: a
tenant makes a partition per ``cache_salt`` it sends and a message per message, so with
one order its requests dropped every other tenant's memos (their next turns tokenized
slower), and timing its own oldest entry after a pause told it whether anyone else had
sent a request meanwhile. Messages are memoised in two tables, each tenant its share of
each. Short ones (up to ``SHORT_MESSAGE`` characters rendered: most turns, each looked
up again at every request of its conversation) go to a ``functools.lru_cache`` of the
tenant's own, made at its first message, whose hits run no Python; their count bounds
their bytes. Longer ones go to a table bounded by the bytes its messages hold too
(``MESSAGE_BYTES_KEPT``): by their count alone, ``MESSAGES_KEPT`` messages of a megabyte
held gigabytes (a rendered message and its ids); a long message's tokenizing costs far
more than its lookup in Python.
Counts of a tenant's text outside a prompt (:meth:`Prompt.count_text`: the usage of an
agent embedder's answer) use the same memos. A
model's own tokenizer keeps the ids of the pieces of a rendering between its special
tokens (a message's text, mostly) the same way, per partition and bounded per tenant
(:mod:`controlplane.adapters.hf_tokenizer`); :meth:`Tokenizers.keep_memos` gives every
tokenizer's memos their shares.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from controlplane.core import tenant_lru
from synapse_common import tokens as tok

APPROXIMATE = "approximate"


class PromptTokenizer(Protocol):
    name: str

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 partition: int = 0, tenant: str = "") -> tuple[int, ...]: ...

    def text_ids(self, text: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]: ...

    def keep_memos(self, tenants: int) -> None: ...


MESSAGES_KEPT = 512     # short and long messages memoised (each), each tenant its share
SHORT_MESSAGE = 512     # characters of a rendered message memoised as short
MESSAGE_BYTES_KEPT = 32 * 1024 * 1024   # what the long ones hold (_Held), each its share
PARTITIONS_KEPT = 32    # partitions with a memo of pieces, each tenant its share of them
PIECES_PER_PARTITION = 4096
_INT_BYTES = sys.getsizeof(2**31 - 1)   # an id's int object (ids are below 2**31)


class _Held(NamedTuple):
    """A memoised message's ids, and the bytes it holds (:func:`_held`)."""
    ids: tuple[int, ...]
    size: int


def _held(key: str, ids: tuple[int, ...]) -> _Held:
    """``ids`` with what the memo holds for them under ``key`` at most: the key (the
    rendered message), the tuple, and an int object per id. Ids repeat, and a partition's
    memo of pieces shares them until it is cleared, so that is more than most messages
    hold; finding the distinct objects, though, cost a long message a good part of its
    tokenizing again, at each miss."""
    return _Held(ids, sys.getsizeof(key) + sys.getsizeof(ids) + _INT_BYTES * len(ids))


def _long_memo(tenants: int) -> tenant_lru.TenantLRU[_Held]:
    """tenant -> "partition:rendered message" -> its ids, latest used last, each of
    ``tenants`` tenants its share of ``MESSAGES_KEPT`` messages and ``MESSAGE_BYTES_KEPT``."""
    return tenant_lru.TenantLRU(MESSAGES_KEPT, tenants, MESSAGE_BYTES_KEPT, _size)


def _size(held: _Held) -> int:
    return held.size


_long_messages = _long_memo(1)
# tenant (a configured one) -> its memo of short messages, (partition, rendered) -> ids
_short_messages: dict[str, Callable[[int, str], tuple[int, ...]]] = {}
_short_each = MESSAGES_KEPT
# tenant -> its partitions' memos of pieces (str(partition) -> memo), latest used last
_pieces: tenant_lru.TenantLRU[tok.PieceIds] = tenant_lru.TenantLRU(PARTITIONS_KEPT)


_pieces_each = PIECES_PER_PARTITION


def keep_memos(tenants: int) -> None:
    """Give each of the ``tenants`` configured tenants its share of the memos (the app
    factory calls it; the memos start empty). Past ``PARTITIONS_KEPT`` tenants, each
    still has a partition's memo, smaller, so that all of them together hold no more
    pieces than ``PARTITIONS_KEPT`` full memos."""
    global _long_messages, _short_each, _pieces, _pieces_each
    _long_messages = _long_memo(tenants)
    _short_messages.clear()
    _short_each = tenant_lru.share(MESSAGES_KEPT, tenants)
    _pieces = tenant_lru.TenantLRU(PARTITIONS_KEPT, tenants)
    _pieces_each = tenant_lru.share(PARTITIONS_KEPT * PIECES_PER_PARTITION,
                                    max(tenants, PARTITIONS_KEPT))


def _pieces_of(partition: int, tenant: str = "") -> tok.PieceIds:
    """``partition``'s memo of pieces, made when it has none (dropping its tenant's least
    recently used one past the tenant's share: never another tenant's)."""
    key = str(partition)
    ids = _pieces.get(tenant, key)
    if ids is None:
        ids = tok.PieceIds(_pieces_each)
        _pieces.put(tenant, key, ids)
    return ids


def _short_memo(tenant: str) -> Callable[[int, str], tuple[int, ...]]:
    """``tenant``'s memo of short messages (made at its first): (partition, rendered
    message) -> its ids, its own least recently used dropped past its share; the pieces
    of a message it tokenizes come from the partition's own memo."""
    memo = _short_messages.get(tenant)
    if memo is None:
        def tokenized(partition: int, rendered: str) -> tuple[int, ...]:
            return tuple(tok.tokenize(rendered, _pieces_of(partition, tenant)))
        memo = _short_messages[tenant] = functools.lru_cache(maxsize=_short_each)(tokenized)
    return memo


def _long_message_tokens(partition: int, rendered: str, tenant: str) -> tuple[int, ...]:
    """The ids of one long rendered message, memoised per ``partition`` (a prompt's hash
    seed: its tenant's), in ``tenant``'s share of the memo of long messages; its pieces
    too come from the partition's own memo."""
    key = f"{partition}:{rendered}"
    held = _long_messages.get(tenant, key)
    if held is None:
        held = _held(key, tuple(tok.tokenize(rendered, _pieces_of(partition, tenant))))
        _long_messages.put(tenant, key, held)
    return held.ids


class Approximate:
    """``synapse_common.tokens``: the simulator's tokenizer and chat template."""

    name = APPROXIMATE

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        """Ids of the rendered chat; ``partition`` (the prompt's hash seed) names the part
        of the memos its messages are looked up in and kept in, ``tenant`` whose memos
        they are."""
        # Each rendered message starts with "<" after a "\n", so tokenizing message by
        # message gives exactly the tokens of the whole rendering; repeated system prompts
        # and conversation history then come from the memo instead of being re-hashed.
        short = _short_memo(tenant)
        ids: list[int] = []
        for m in messages:
            role, content = m.get("role", "user"), m.get("content")
            if type(role) is str and type(content) is str:     # the template, inlined
                rendered = f"<|{role}|>\n{content}<|end|>\n"
            else:
                rendered = tok.render_chat([m], add_generation_prompt=False)
            ids.extend(short(partition, rendered) if len(rendered) <= SHORT_MESSAGE
                       else _long_message_tokens(partition, rendered, tenant))
        ids.extend(short(partition, GENERATION_PROMPT))
        return tuple(ids)

    def text_ids(self, text: str, partition: int = 0, tenant: str = "") -> tuple[int, ...]:
        return tuple(tok.tokenize(text, _pieces_of(partition, tenant)))

    def keep_memos(self, tenants: int) -> None:
        keep_memos(tenants)


GENERATION_PROMPT = tok.render_chat([], add_generation_prompt=True)
APPROXIMATION = Approximate()


class Tokenizers:
    """Canonical model → its tokenizer; the approximation for every other model."""

    def __init__(self, by_model: Mapping[str, PromptTokenizer] | None = None) -> None:
        self._by_model: dict[str, PromptTokenizer] = dict(by_model or {})

    def for_model(self, model: str) -> PromptTokenizer:
        return self._by_model.get(model, APPROXIMATION)

    def keep_memos(self, tenants: int) -> None:
        """Give each of the ``tenants`` configured tenants its share of every tokenizer's
        memos, the approximation's and each model's own (the app factory calls it once
        the tenants are known; the memos start empty)."""
        for tokenizer in {*self._by_model.values(), APPROXIMATION}:
            tokenizer.keep_memos(tenants)


class Prompt:
    """A request's prompt, tokenized on demand once per tokenizer.

    ``token_ids`` / ``tokens`` / ``tokenizer`` describe the tokenization used last (the
    routed model's); before any routing they are the approximation's. A prompt that is
    not ``exact`` (policies that need only a size) is never tokenized: ``tokens`` is its
    length in characters / 4 and ``token_ids`` is empty.
    """

    __slots__ = (
        "_ids",
        "_last",
        "_last_name",
        "_least",
        "_least_of",
        "_size",
        "cache_salt",
        "exact",
        "hash_seed",
        "max_tokens",
        "messages",
        "sequences",
        "session",
        "streams",
        "tenant",
        "text",
    )

    def __init__(self, messages: Sequence[Mapping[str, Any]] | None, text: str | None,
                 max_tokens: int = 0, session: str = "", exact: bool = True) -> None:
        self.messages = messages
        self.text = text
        self.max_tokens = max_tokens
        self.session = session
        self.exact = exact
        # The engines' prefix-cache partition (``core.cache_salt``): "" = none (paths that
        # generate nothing, explain), and the seed of the router's block-hash chain under
        # it; set together by :meth:`partition`.
        self.cache_salt = ""
        self.hash_seed = 0
        self.tenant = ""    # whose share of the tokenizers' memos the partition is in
        # Whether the answer streams (the ledger sees its first token); a whole answer's
        # first byte is its last. Set by the serving path from the request's "stream".
        self.streams = True
        # The sequences the engine generates for it (n x a batch's prompts): the seats the
        # ledger counts it for. Set by the serving path from validation.Parsed.sequences.
        self.sequences = 1
        # The fewest tokens the prompt can be to any real tokenizer (core.context_length;
        # 0 = no floor): what a backend's reported context is held against. Set by the
        # serving paths that generate (:meth:`floor`); None = not counted yet.
        self._least: int | None = 0
        self._ids: dict[str, tuple[int, ...]] = {}
        self._last: tuple[int, ...] | None = None
        self._last_name = APPROXIMATE
        self._size = 0

    @property
    def least_tokens(self) -> int:
        """The fewest tokens the prompt can be to any real tokenizer (0 = no floor),
        counted at the first read by what :meth:`floor` named: only a backend that
        reports its context needs it, so a request routed to none that does never
        counts it."""
        least = self._least
        if least is None:
            count, args = self._least_of
            least = self._least = count(*args)
        return least

    @least_tokens.setter
    def least_tokens(self, value: int) -> None:
        self._least = value

    def floor(self, count: Callable[..., int], *args: Any) -> None:
        """Let :attr:`least_tokens` be ``count(*args)`` (a function of
        ``core.context_length`` and the request's body), counted when first read."""
        self._least = None
        self._least_of = (count, args)

    def partition(self, salt: str, tenant: str = "") -> None:
        """Put the prompt in the prefix-cache partition ``salt`` of ``tenant``, once."""
        self.cache_salt = salt
        self.hash_seed = tok.salt_seed(salt)
        self.tenant = tenant

    @classmethod
    def from_text(cls, text: str, max_tokens: int = 0, session: str = "",
                  exact: bool = True) -> Prompt:
        return cls(None, text, max_tokens, session, exact)

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]], max_tokens: int = 0,
                      session: str = "", exact: bool = True) -> Prompt:
        return cls(messages, None, max_tokens, session, exact)

    def ids(self, tokenizer: PromptTokenizer) -> tuple[int, ...]:
        """Token ids under ``tokenizer`` (memoised); ``()`` for a size-only prompt."""
        if not self.exact:
            return ()
        if self.messages is not None and not getattr(tokenizer, "has_template", True):
            tokenizer = APPROXIMATION
        name = tokenizer.name
        ids = self._ids.get(name)
        if ids is None:
            # every tokenizer's memo is per partition: a tenant's own
            if self.messages is None:
                ids = tokenizer.text_ids(self.text or "", self.hash_seed, self.tenant)
            else:
                ids = tokenizer.chat_ids(self.messages, self.hash_seed, self.tenant)
            self._ids[name] = ids
        self._last, self._last_name = ids, name
        return ids

    def count_text(self, text: str) -> int:
        """The approximation's count of ``text`` (a part of the prompt, say), its pieces
        from this prompt's partition's memo: a count of a tenant's text never uses the
        process's shared memo, whose hit told by its speed that another tenant had sent
        the same text."""
        return len(tok.tokenize(text, _pieces_of(self.hash_seed, self.tenant)))

    def tokenize(self) -> None:
        """Tokenize now (memoised), so the caller chooses where that work happens."""
        _ = self.tokens     # the property tokenizes (or counts) and memoises

    @property
    def token_ids(self) -> tuple[int, ...]:
        if self._last is None:
            return self.ids(APPROXIMATION)
        return self._last

    @property
    def tokenizer(self) -> str:
        return self._last_name

    @property
    def tokens(self) -> int:
        if self.exact:      # token_ids, inlined: asked a few times per request
            last = self._last
            return len(last if last is not None else self.ids(APPROXIMATION))
        if not self._size:
            text = (tok.render_chat(self.messages) if self.messages is not None
                    else self.text or "")
            self._size = max(1, len(text) // tok.CHARS_PER_TOKEN)
        return self._size

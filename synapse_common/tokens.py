"""The deterministic tokenizer, chat template and prefix-block hashing shared by the
engine simulator (its prefix cache) and the control plane (its prefix index and token
estimates), so both count and hash a prompt the same way.

Tokenizer: text is cut into runs of letters/digits and single other characters; a run
of N characters is ceil(N / 4) tokens (so roughly four characters per token, like BPE on
English prose). Each token id is a stable 31-bit hash of its characters, so equal text
gives equal ids across processes (Python's ``hash`` is salted; blake2b is not).

Chat template: a Llama-3-like rendering, ``<|role|>\ncontent<|end|>\n`` per message and
``<|assistant|>\n`` to prompt the reply. Any chat template works for routing so long as
every process renders the same prompt the same way.

Blocks: the token list is cut into ``block_size`` blocks; block i's hash chains over the
hash of block i-1, as vLLM's prefix cache does, so a block hash identifies the whole
prefix up to and including it. Only full blocks are hashed.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CHARS_PER_TOKEN = 4
# One match per token: up to four letters/digits of a run (runs are cut from their
# start), one other character, or eight whitespace characters. Whitespace joins the next
# token, as in BPE vocabularies; only long runs count (one token per eight; the rest of
# a run matches nothing and is skipped).
_TOKENS = re.compile(rf"[A-Za-z0-9]{{1,{CHARS_PER_TOKEN}}}|\s{{8}}|\S")


PIECES_KEPT = 1 << 16


def _hash_piece(piece: str) -> int:
    if piece.isspace():
        piece = " "
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class PieceIds(dict[str, int]):
    """Piece → id, memoised (text repeats: most pieces are common words), cleared when it
    holds ``kept``. A dict whose misses hash the piece: ``tokenize`` maps its
    ``__getitem__`` over the pieces, a lookup in C per token where an LRU kept its order
    up to date at every hit. One serves the process; a caller that must keep its users'
    pieces apart (the control plane's tenants: a hit's speed would tell one what another
    sent) gives :func:`tokenize` one of its own per user."""

    def __init__(self, kept: int = PIECES_KEPT) -> None:
        super().__init__()
        self.kept = kept

    def __missing__(self, piece: str) -> int:
        if len(self) >= self.kept:
            self.clear()
        found = self[piece] = _hash_piece(piece)
        return found


_IDS = PieceIds()
_token_id = _IDS.__getitem__


def pieces(text: str) -> list[str]:
    """The text of each token of ``text``, in order (``tokenize`` hashes these)."""
    found: list[str] = _TOKENS.findall(text)
    return found


def token_id(piece: str) -> int:
    """The id of one piece (as :func:`pieces` returns it)."""
    return _token_id(piece)


def tokenize(text: str, ids: PieceIds | None = None) -> list[int]:
    """Deterministic token ids for ``text`` (about one per four characters); ``ids``: the
    memo of pieces to use (the process's by default)."""
    return list(map(_token_id if ids is None else ids.__getitem__, _TOKENS.findall(text)))


def count_tokens(text: str) -> int:
    return len(tokenize(text))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render chat messages into one prompt string (the shared chat template)."""
    out = []
    for message in messages:
        role = str(message.get("role", "user"))
        out.append(f"<|{role}|>\n{_content_text(message.get('content'))}<|end|>\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def salt_seed(cache_salt: str | None) -> int:
    """The seed of a prompt's block-hash chain under a request's ``cache_salt`` (0: none),
    so that prompts with different salts share no block, as in vLLM's prefix cache
    (memoised: a tenant's requests all carry the same salt)."""
    if not cache_salt:
        return 0
    return int.from_bytes(hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int = 16, seed: int = 0) -> list[int]:
    """Chained 64-bit hashes of every full block of ``token_ids``."""
    hashes: list[int] = []
    parent = seed
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        block = token_ids[start:start + block_size]
        h = hashlib.blake2b(struct.pack(f"<Q{len(block)}I", parent, *block), digest_size=8)
        parent = int.from_bytes(h.digest(), "little")
        hashes.append(parent)
    return hashes

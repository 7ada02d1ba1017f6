"""Deterministic pseudo-text: the simulator's "model output".

The same prompt, seed and choice index always give the same text, in any process
(the PRNG is seeded from a blake2b digest, never from Python's salted ``hash``).

Each output token is one short English word (at most four letters, so the shared
tokenizer in ``synapse_common.tokens`` counts it as exactly one token) or a full stop;
sentences of 5 to 14 words start with a capital. ``tokens.count_tokens(text)`` therefore
equals the number of tokens reported in ``usage`` (unless a stop string cut a word).

Length: each (prompt, seed, index) has a natural length between ``MIN_NATURAL`` and
``MAX_NATURAL`` tokens, where the "model" emits end-of-sequence (``finish_reason`` stop);
``max_tokens`` cuts earlier (``length``); ``ignore_eos`` (a vLLM extension) always runs
to ``max_tokens``; a ``stop`` string ends the text before the string (``stop``, with the
string as vLLM's ``stop_reason``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

MIN_NATURAL = 12
MAX_NATURAL = 320

WORDS = (
    "the a an of to and in on at by for with from as is are was be can will may "
    "not all some each this that more most less new old good best fast slow big "
    "tiny long high low open real data node code rule test plan goal step path "
    "case fact idea view form list page note line word part team work time day "
    "year way city road tree sun moon star rain wind snow fire lake sea hill "
    "bird fish cat dog cow deer wolf bear lion frog ship boat car bus bike door "
    "room wall roof desk lamp book pen map key bell cup coin gold iron wood "
    "salt milk tea rice corn bean seed leaf root rose blue red jade gray pink "
    "warm cold dark soft hard calm wild kind wise bold keen neat pure safe just "
    "run walk read make take give find keep hold move turn grow show tell ask "
    "help call sing play rest stay wait look feel know"
).split()
# Pieces are shared string objects: a long output is a list of references, not copies.
_SPACED = tuple(" " + w for w in WORDS)
_CAPITALS = tuple(w.capitalize() for w in WORDS)
_SPACED_CAPITALS = tuple(" " + w for w in _CAPITALS)


@dataclasses.dataclass(frozen=True)
class Output:
    pieces: list[str]  # one string per generated token (the last may be cut by a stop)
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None  # the stop string that ended the text, if any

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def num_tokens(self) -> int:
        return len(self.pieces)


def _rng(prompt: str, seed: int, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\x00{index}\x00".encode() + prompt.encode(
        "utf-8", "surrogatepass"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _words(rng: random.Random, n: int) -> list[str]:
    picks = rng.choices(range(len(WORDS)), k=n)
    pieces: list[str] = []
    until_stop = rng.randint(5, 14)
    for i in picks:
        if not pieces:
            pieces.append(_CAPITALS[i])
        elif pieces[-1] == ".":
            pieces.append(_SPACED_CAPITALS[i])
        elif until_stop == 0:
            pieces.append(".")
            until_stop = rng.randint(5, 14)
        else:
            pieces.append(_SPACED[i])
            until_stop -= 1
    return pieces


def generate(prompt: str, seed: int, index: int, max_tokens: int, *,
             ignore_eos: bool = False, stop: Sequence[str] = ()) -> Output:
    """The output for one choice; ``max_tokens`` must be at least 1."""
    rng = _rng(prompt, seed, index)
    natural = rng.randint(MIN_NATURAL, MAX_NATURAL)
    n = max_tokens if ignore_eos else min(natural, max_tokens)
    pieces = _words(rng, n)
    reason = "stop" if n < max_tokens else "length"
    if stop:
        cut = _cut_at_stop(pieces, stop)
        if cut is not None:
            return cut
    return Output(pieces, reason, None)


def _cut_at_stop(pieces: list[str], stop: Sequence[str]) -> Output | None:
    text = "".join(pieces)
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        pos = text.find(s)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    if best is None:
        return None
    pos, s = best
    end = pos + len(s)  # the token completing the stop string is the last one generated
    kept: list[str] = []
    offset = 0
    for piece in pieces:
        start = offset
        offset += len(piece)
        kept.append(piece[:max(0, pos - start)] if offset > pos else piece)
        if offset >= end:
            break
    return Output(kept, "stop", s)

"""Pair features of the cache verifier: two embeddings plus lexical guards.

The verifier decides whether a cached answer to text B may answer text A. Cosine alone
cannot tell "How do I lose 5 kg?" from "How do I lose 15 kg?", or "Why is X good?"
from "Why is X not good?"; these guards hand the classifier exactly those differences.

Feature vector (order is part of the verifier file format, ``FEATURE_VERSION``; a file of
version 1 has the columns up to "normalised texts equal" only, ``lexical_names(1)``):

- ``|u - v|`` and ``u * v`` (one value per embedding dimension each) — the classic
  sentence-pair representation; with normalised vectors ``sum(u * v)`` is the cosine.
- cosine similarity;
- lexical guards (``LEXICAL_NAMES``): token / content-word / bigram / character-trigram
  Jaccard, length ratio and log-length gap, numbers differ, negation differs, question
  word differs, first word equal, share of content words of each side missing from the
  other, capitalised words (names) differ, normalised texts equal;
- the same overlap weighted by rarity (:class:`Idf`, fitted on the verifier's training
  texts and kept in its file): weighted Jaccard, weighted share missing from each side,
  and the rarest word each side lacks (the larger and the smaller of the two), plus last
  word equal and the token counts. "How do I learn Python?" and "How do I learn Java?"
  overlap on everything but one rare word; a paraphrase differs in common words.

Everything is deterministic pure Python/numpy, cheap enough for 5 candidates per lookup.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

FEATURE_VERSION = 2
VERSIONS = (1, 2)   # what a verifier file may have been fitted with
MIN_DF = 2      # rarer words weigh as much as a word seen once

FloatArray = npt.NDArray[np.float32]

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CAPITAL = re.compile(r"(?<![.?!]\s)(?<!^)\b[A-Z][A-Za-z0-9]+")

NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere",
    "without", "cannot", "can't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't",
    "weren't", "won't", "wouldn't", "shouldn't", "couldn't", "haven't", "hasn't", "hadn't",
    "mustn't", "n't"})
QUESTION_WORDS = ("what", "why", "how", "when", "where", "who", "whom", "whose", "which")
STOPWORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does",
    "did", "i", "you", "he", "she", "it", "we", "they", "me", "my", "your", "our", "their",
    "his", "her", "its", "of", "in", "on", "at", "to", "for", "with", "by", "from", "and",
    "or", "as", "that", "this", "these", "those", "there", "what", "why", "how", "when",
    "where", "who", "which", "can", "could", "should", "would", "will", "shall", "may",
    "might", "must", "some", "any", "if", "so", "about", "into", "than", "then", "have",
    "has", "had", "get", "one", "s"})

LEXICAL_NAMES = (
    "jaccard", "content_jaccard", "bigram_jaccard", "trigram_jaccard", "length_ratio",
    "log_length_gap", "numbers_differ", "negation_differs", "question_word_differs",
    "first_word_equal", "missing_a", "missing_b", "names_differ", "equal",
    "idf_jaccard", "idf_missing_a", "idf_missing_b", "rarest_missing_max",
    "rarest_missing_min", "last_word_equal", "tokens_a", "tokens_b", "shared_tokens")
_NAMES_PER_VERSION = {1: LEXICAL_NAMES[:LEXICAL_NAMES.index("equal") + 1], 2: LEXICAL_NAMES}


def lexical_names(version: int = FEATURE_VERSION) -> tuple[str, ...]:
    """The lexical columns of feature ``version`` (each version extends the one before)."""
    return _NAMES_PER_VERSION[version]


@dataclasses.dataclass(frozen=True)
class Idf:
    """Words' inverse document frequency over the texts a verifier was fitted on."""

    weights: Mapping[str, float]
    unseen: float           # any word seen fewer than MIN_DF times

    def of(self, word: str) -> float:
        return self.weights.get(word, self.unseen)

    @classmethod
    def fit(cls, texts: Iterable[str], min_df: int = MIN_DF) -> Idf:
        df: collections.Counter[str] = collections.Counter()
        n = 0
        for text in texts:
            df.update(set(tokens(text)))
            n += 1
        n = max(n, 1)
        return cls({w: round(math.log(n / c), 3) for w, c in sorted(df.items()) if c >= min_df},
                   round(math.log(n), 3))

    def to_json(self) -> dict[str, Any]:
        return {"unseen": self.unseen, "words": dict(self.weights)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Idf:
        return cls({str(w): float(v) for w, v in data["words"].items()}, float(data["unseen"]))


NO_IDF = Idf({}, 1.0)       # every word equally rare: the weighted overlaps are the plain ones


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _jaccard(a: set[str] | set[tuple[str, str]], b: set[str] | set[tuple[str, str]]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _question_word(toks: list[str]) -> str:
    for tok in toks:
        if tok in QUESTION_WORDS:
            return tok
    return ""


def _trigrams(text: str) -> set[str]:
    t = " ".join(tokens(text))
    return {t[i:i + 3] for i in range(max(0, len(t) - 2))}


def _missing(a: set[str], b: set[str]) -> float:
    return len(a - b) / len(a) if a else 0.0


def lexical(text_a: str, text_b: str, idf: Idf = NO_IDF) -> list[float]:
    """The lexical guards, in ``LEXICAL_NAMES`` order."""
    ta, tb = tokens(text_a), tokens(text_b)
    sa, sb = set(ta), set(tb)
    ca, cb = sa - STOPWORDS, sb - STOPWORDS
    la, lb = max(len(ta), 1), max(len(tb), 1)
    na, nb = set(_NUMBER.findall(text_a)), set(_NUMBER.findall(text_b))
    nega, negb = bool(sa & NEGATIONS), bool(sb & NEGATIONS)
    qa, qb = _question_word(ta), _question_word(tb)
    names_a, names_b = set(_CAPITAL.findall(text_a)), set(_CAPITAL.findall(text_b))
    return [
        _jaccard(sa, sb),
        _jaccard(ca, cb),
        _jaccard(set(itertools.pairwise(ta)), set(itertools.pairwise(tb))),
        _jaccard(_trigrams(text_a), _trigrams(text_b)),
        min(la, lb) / max(la, lb),
        abs(math.log(la) - math.log(lb)),
        float(na != nb),
        float(nega != negb),
        float(bool(qa) and bool(qb) and qa != qb),
        float(bool(ta) and bool(tb) and ta[0] == tb[0]),
        _missing(ca, cb),
        _missing(cb, ca),
        float({n.lower() for n in names_a} != {n.lower() for n in names_b}),
        float(ta == tb),
        *_weighted(sa, sb, idf),
        float(bool(ta) and bool(tb) and ta[-1] == tb[-1]),
        float(len(ta)),
        float(len(tb)),
        float(len(sa & sb)),
    ]


def _weighted(sa: set[str], sb: set[str], idf: Idf) -> list[float]:
    """IDF-weighted Jaccard, weighted share of each side missing from the other, and the
    rarest word missing on either side (larger, smaller)."""
    wa = {w: idf.of(w) for w in sa}
    wb = {w: idf.of(w) for w in sb}
    shared = sum(wa[w] for w in sa & sb)
    total_a, total_b = sum(wa.values()), sum(wb.values())
    union = total_a + total_b - shared
    rare_a = max((wa[w] for w in sa - sb), default=0.0)
    rare_b = max((wb[w] for w in sb - sa), default=0.0)
    return [shared / union if union else 1.0,
            1.0 - shared / total_a if total_a else 0.0,
            1.0 - shared / total_b if total_b else 0.0,
            max(rare_a, rare_b), min(rare_a, rare_b)]


def batch_features(texts_a: list[str], texts_b: list[str], us: FloatArray,
                   vs: FloatArray, idf: Idf = NO_IDF,
                   version: int = FEATURE_VERSION) -> FloatArray:
    """Feature rows of feature ``version`` for many pairs at once (vectorised embedding
    part); ``us`` and ``vs`` are normalised embeddings."""
    us32, vs32 = np.asarray(us, dtype=np.float32), np.asarray(vs, dtype=np.float32)
    cos = np.sum(us32 * vs32, axis=1, keepdims=True)
    width = len(lexical_names(version))
    lex = np.asarray([lexical(a, b, idf)[:width] for a, b in zip(texts_a, texts_b, strict=True)],
                     dtype=np.float32).reshape(len(texts_a), width)
    return np.concatenate([np.abs(us32 - vs32), us32 * vs32, cos, lex], axis=1)


def feature_count(dim: int, version: int = FEATURE_VERSION) -> int:
    return 2 * dim + 1 + len(lexical_names(version))

"""Pair features of the cache verifier: two embeddings plus lexical guards.

The verifier decides whether a cached answer to text B may answer text A. Cosine alone
cannot tell "How do I lose 5 kg?" from "How do I lose 15 kg?", or "Why is X good?"
from "Why is X not good?"; these guards hand the classifier exactly those differences.

Feature vector (order is part of the verifier file format, ``FEATURE_VERSION``):

- ``|u - v|`` and ``u * v`` (one value per embedding dimension each) — the classic
  sentence-pair representation; with normalised vectors ``sum(u * v)`` is the cosine.
- cosine similarity;
- lexical guards (``LEXICAL_NAMES``): token / content-word / bigram / character-trigram
  Jaccard, length ratio and log-length gap, numbers differ, negation differs, question
  word differs, first word equal, share of content words of each side missing from the
  other, capitalised words (names) differ, normalised texts equal.

Everything is deterministic pure Python/numpy, cheap enough for 5 candidates per lookup.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import numpy.typing as npt

FEATURE_VERSION = 1

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
    "first_word_equal", "missing_a", "missing_b", "names_differ", "equal")


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


def lexical(text_a: str, text_b: str) -> list[float]:
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
    ]


def pair_features(text_a: str, text_b: str, u: FloatArray, v: FloatArray) -> FloatArray:
    """One feature row for the pair (a, b); ``u`` and ``v`` are normalised embeddings."""
    u32, v32 = np.asarray(u, dtype=np.float32), np.asarray(v, dtype=np.float32)
    cos = float(np.dot(u32, v32))
    return np.concatenate([np.abs(u32 - v32), u32 * v32,
                           np.asarray([cos, *lexical(text_a, text_b)], dtype=np.float32)])


def batch_features(texts_a: list[str], texts_b: list[str], us: FloatArray,
                   vs: FloatArray) -> FloatArray:
    """Feature rows for many pairs at once (vectorised embedding part)."""
    us32, vs32 = np.asarray(us, dtype=np.float32), np.asarray(vs, dtype=np.float32)
    cos = np.sum(us32 * vs32, axis=1, keepdims=True)
    lex = np.asarray([lexical(a, b) for a, b in zip(texts_a, texts_b, strict=True)],
                     dtype=np.float32).reshape(len(texts_a), len(LEXICAL_NAMES))
    return np.concatenate([np.abs(us32 - vs32), us32 * vs32, cos, lex], axis=1)


def feature_count(dim: int) -> int:
    return 2 * dim + 1 + len(LEXICAL_NAMES)

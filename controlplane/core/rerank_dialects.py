"""``/v1/rerank`` (the Jina / Cohere shape vLLM serves) ⇄ TEI's ``/rerank`` (pure).

The control plane's ``/v1/rerank`` speaks the shape vLLM, Jina and Cohere share:
``{"model", "query", "documents": [str | {"text"}], "top_n"}`` →
``{"id", "model", "usage", "results": [{"index", "document": {"text"}, "relevance_score"}]}``,
most relevant first. A vLLM reranker gets it as it is. A TEI reranker speaks
``{"query", "texts", "raw_scores", "return_text"}`` → ``[{"index", "score"}]``
(most relevant first, scores already through the sigmoid); :func:`to_tei` and
:func:`from_tei` translate. TEI reports no token counts: the caller passes its own
estimate for ``usage`` (the token limits count it either way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane import errors


def documents(body: Mapping[str, Any]) -> list[str]:
    """The documents' texts (plain strings, or objects with a ``text``)."""
    docs = body.get("documents")
    if isinstance(docs, str):
        docs = [docs]
    if not isinstance(docs, list) or not docs:
        raise errors.BadRequest("documents: a non-empty list is required", param="documents")
    out = []
    for doc in docs:
        text = doc.get("text") if isinstance(doc, Mapping) else doc
        if not isinstance(text, str):
            raise errors.BadRequest("documents: each document must be a string or have a "
                                    "text", param="documents")
        out.append(text)
    return out


def top_n(body: Mapping[str, Any], count: int) -> int:
    value = body.get("top_n")
    if value is None or value == 0:
        return count
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.BadRequest("top_n: a non-negative integer is required", param="top_n")
    return min(value, count)


def to_tei(body: Mapping[str, Any]) -> dict[str, Any]:
    """TEI's ``/rerank`` request for a ``/v1/rerank`` body."""
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise errors.BadRequest("query: a non-empty string is required", param="query")
    return {"query": query, "texts": documents(body), "raw_scores": False,
            "return_text": False}


def from_tei(answer: Any, body: Mapping[str, Any], model: str, request_id: str,
             prompt_tokens: int) -> dict[str, Any]:
    """The ``/v1/rerank`` answer for TEI's ranking ``answer`` of ``body``'s documents."""
    docs = documents(body)
    if not isinstance(answer, list) or not all(
            isinstance(r, Mapping) and isinstance(r.get("index"), int)
            and 0 <= r["index"] < len(docs) and isinstance(r.get("score"), int | float)
            for r in answer):
        raise errors.UpstreamError("the reranker's answer is not a ranking of the documents",
                                   code="bad_answer")
    ranked = sorted(answer, key=lambda r: -float(r["score"]))[:top_n(body, len(docs))]
    return {"id": request_id, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "results": [{"index": r["index"], "document": {"text": docs[r["index"]]},
                         "relevance_score": float(r["score"])} for r in ranked]}

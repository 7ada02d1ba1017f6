"""The pair scorer's weights: a MiniLM cross-encoder kept as plain data (issue 22).

The cross-encoder reads one pair as ``[CLS] a [SEP] b [SEP]`` through all-MiniLM-L6-v2's
transformer, mean-pools the last hidden state over the attention mask, and maps the pooled
vector to one logit with a ``Linear(hidden, 1)`` head. A pair's score is the average of the
logits of ``(a, b)`` and ``(b, a)``. The agent runs it (``agent.embedding.pair_scorer``,
``Node.ScorePairs``); the control plane reads only its id; the training command writes the
file. One file, one format, read here only, in the manner of
:mod:`synapse_common.embedder_tuning`:

- an ``.npz`` (never pickle: read with ``allow_pickle=False``) holding ``format``,
  ``base`` (the embedder id of the MiniLM weights it was fitted on,
  ``embedder_tuning.base_id()``), ``meta`` (JSON: ``max_len``, ``pooling`` = ``"mean"``,
  how it was fitted, what it measured), ``layer:<name>`` arrays that replace parameters
  of the transformer by their name in ``AutoModel.from_pretrained(...).state_dict()`` (no
  ``bert.`` prefix; float16 on disk to keep the file small; a file may leave some out,
  e.g. the word embeddings, which then come from the installed base weights),
  ``head_weight`` (1 x hidden) and ``head_bias`` (1,), and ``digest``.
- The head stays float32 on disk: it is 385 numbers, and rounding it would move every
  logit for no saving.
- **The scorer id changes with the weights**: ``<base>+pair-<digest>``, the digest being
  of the base id and every array as stored (not of ``meta``, so a file can record the
  metrics measured for its own id). ``digest`` is also stored, so :func:`peek_id` reads
  three small entries instead of hashing the whole file; :func:`load` recomputes it and
  refuses a file whose arrays do not match it.
- The bytes are a function of the arrays alone: every zip entry carries a fixed date and
  the entries are written in a fixed order, so the same arrays give the same file.

Only numpy is imported here: the control plane imports this module to read an id and
never loads torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

FORMAT = "synapse-pair-scorer/1"
SHIPPED = pathlib.Path(__file__).with_name("pair_scorer.npz")
LAYER_PREFIX = "layer:"
POOLING = "mean"
# Candidates per Node.ScorePairs call: the agents refuse more, the control plane never
# sends more (one home for both sides of the wire).
MAX_PAIRS = 16
F32 = npt.NDArray[np.float32]
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry
_T = TypeVar("_T")


class PairScorerError(ValueError):
    """The pair-scorer file is missing, malformed, or for other base weights."""


@dataclasses.dataclass(frozen=True)
class PairScorerFile:
    base: str
    digest: str
    layers: Mapping[str, npt.NDArray[Any]]
    head_weight: F32  # (1, hidden)
    head_bias: F32    # (1,)
    meta: Mapping[str, Any]

    @property
    def scorer_id(self) -> str:
        return f"{self.base}+pair-{self.digest}"

    @property
    def max_len(self) -> int:
        """Tokens per pair (both texts, with the special tokens), as in training."""
        return int(self.meta["max_len"])


def check_base(scorer: PairScorerFile, base: str) -> None:
    """Refuse a file fitted on other weights than the ones loaded (``base``)."""
    if scorer.base != base:
        raise PairScorerError(f"it was fitted on {scorer.base}, but the weights loaded are "
                              f"{base}")


def resolve(setting: str) -> pathlib.Path | None:
    """``shipped`` → the file in this package, ``none`` → no scorer, else a path."""
    if setting == "none":
        return None
    return SHIPPED if setting == "shipped" else pathlib.Path(setting).expanduser()


def digest(base: str, layers: Mapping[str, npt.NDArray[Any]], head_weight: npt.NDArray[Any],
           head_bias: npt.NDArray[Any]) -> str:
    """What names a scorer: a hash of its base and of every array, as stored."""
    h = hashlib.sha256(base.encode())
    named: list[tuple[str, npt.NDArray[Any]]] = [
        *((LAYER_PREFIX + n, _layer(a)) for n, a in sorted(layers.items())),
        ("head_weight", _head(head_weight)), ("head_bias", _head(head_bias))]
    for name, array in named:
        h.update(f"\x00{name}\x00{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:12]


def save(path: str | pathlib.Path, base: str, layers: Mapping[str, npt.NDArray[Any]],
         head_weight: npt.NDArray[Any], head_bias: npt.NDArray[Any],
         meta: Mapping[str, Any]) -> str:
    """Write a pair-scorer file (layers as float16) and return its scorer id, as read back."""
    _check_meta(meta)
    arrays: dict[str, npt.NDArray[Any]] = {
        "format": np.asarray(FORMAT), "base": np.asarray(base),
        "digest": np.asarray(digest(base, layers, head_weight, head_bias)),
        "meta": np.asarray(json.dumps(meta, sort_keys=True)),
        "head_weight": _head(head_weight), "head_bias": _head(head_bias)}
    for name in sorted(layers):
        arrays[LAYER_PREFIX + name] = _layer(layers[name])
    file = pathlib.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(_npz_bytes(arrays))
    tmp.replace(file)
    return load(file).scorer_id


def load(path: str | pathlib.Path) -> PairScorerFile:
    """The whole file, checked: format, shapes, finite values, meta, and the digest."""
    return _read(path, _parse)


def peek_id(path: str | pathlib.Path) -> str:
    """The scorer id a file declares, from three small entries (no array is hashed; a file
    whose arrays do not match it fails :func:`load`)."""
    def declared(data: Any) -> str:
        _check_format(data)
        return f"{data['base']!s}+pair-{data['digest']!s}"

    return _read(path, declared)


def _read(path: str | pathlib.Path, parse: Callable[[Any], _T]) -> _T:
    file = pathlib.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PairScorerError(f"cannot read pair scorer {file}: "
                              f"{exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return parse(data)
    except PairScorerError as exc:
        raise PairScorerError(f"pair scorer {file}: {exc}") from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise PairScorerError(f"pair scorer {file} is not a {FORMAT} file: {exc}") from None


def _check_format(data: Any) -> None:
    if "format" not in data.files:
        raise PairScorerError(f"it has no 'format' entry (not a {FORMAT} file)")
    if str(data["format"]) != FORMAT:
        raise PairScorerError(f"format {str(data['format'])!r} is not {FORMAT}")
    missing = [n for n in ("base", "digest", "meta", "head_weight", "head_bias")
               if n not in data.files]
    if missing:
        raise PairScorerError(f"it lacks the entries {', '.join(missing)}")


def _parse(data: Any) -> PairScorerFile:
    _check_format(data)
    layers = {name[len(LAYER_PREFIX):]: np.asarray(data[name]) for name in data.files
              if name.startswith(LAYER_PREFIX)}
    weight = np.asarray(data["head_weight"])
    bias = np.asarray(data["head_bias"])
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise PairScorerError(f"the head must be head_weight (1, hidden) and head_bias (1,), "
                              f"not {weight.shape} and {bias.shape}")
    for name, array in [*layers.items(), ("head_weight", weight), ("head_bias", bias)]:
        if not np.issubdtype(array.dtype, np.floating):
            raise PairScorerError(f"{name} holds {array.dtype} values, not floats")
        if not np.all(np.isfinite(array)):
            raise PairScorerError(f"{name} holds values that are not finite")
    meta = json.loads(str(data["meta"]))
    _check_meta(meta)
    base = str(data["base"])
    computed = digest(base, layers, weight, bias)
    if computed != str(data["digest"]):
        raise PairScorerError(f"its arrays do not match its digest ({data['digest']!s}; "
                              f"they hash to {computed}): the file was altered or damaged")
    return PairScorerFile(base, computed, layers, _head(weight), _head(bias), meta)


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, Mapping):
        raise PairScorerError("meta must be a JSON object")
    max_len = meta.get("max_len")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 4 <= max_len <= 512:
        raise PairScorerError(f"meta.max_len must be an integer in [4, 512], not {max_len!r}")
    if meta.get("pooling") != POOLING:
        raise PairScorerError(f"meta.pooling must be {POOLING!r}, not {meta.get('pooling')!r}")


def _layer(array: npt.NDArray[Any]) -> npt.NDArray[np.float16]:
    return np.ascontiguousarray(array, dtype=np.float16)


def _head(array: npt.NDArray[Any]) -> F32:
    return np.ascontiguousarray(array, dtype=np.float32)


def _npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """An npz ``np.load`` reads, whose bytes depend on the arrays only (fixed entry dates;
    ``np.savez_compressed`` stamps the current time)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            zf.writestr(info, buf.getvalue(), compresslevel=6)
    return out.getvalue()

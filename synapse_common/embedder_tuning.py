"""A tuned embedder: all-MiniLM-L6-v2 plus what fine-tuning changed, kept as plain data.

``synapsectl cache tune-embedder`` (and ``make embedder``, into ``build/embedder/``) writes a
tuning file; the agent applies it to the model it loads (``embedder.tuning``), the
control plane reads only its id (``cache.embedder_id``), and the calibration embeds with
it. One file, one format, read here only:

- an ``.npz`` (never pickle: loaded with ``allow_pickle=False``) holding ``format``,
  ``base`` (the embedder id of the weights it was fitted on), ``meta`` (JSON: how it was
  fitted and what it measured), ``layer:<name>`` arrays that replace parameters of the
  transformer (by their name in its ``state_dict``; float16 on disk to keep the file
  small) and optionally ``adapter``, a matrix applied after pooling (then renormalised).
- **The embedder id changes with the weights**: ``<base>+tuned-<digest>``, the digest
  being of the base id and the arrays (not of ``meta``, so a file can record the metrics
  of the verifier fitted for its own id). The id is part of every L2 scope, so vectors of
  an old embedder are never compared with a new one's, and a verifier names the id it
  was fitted for.
- The npz bytes are a function of the arrays alone (zip entries carry a fixed date), so a
  rebuild from the same seed on the same software gives the same file and id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT = "synapse-embedder-tuning/1"
SHIPPED = pathlib.Path(__file__).with_name("embedder_tuned.npz")
LAYER_PREFIX = "layer:"
BASE_NAME = "minilm-l6-v2"
F32 = npt.NDArray[np.float32]


class TuningError(ValueError):
    """The tuning file is missing, malformed, or for other base weights."""


@dataclasses.dataclass(frozen=True)
class Tuning:
    base: str
    digest: str
    layers: Mapping[str, npt.NDArray[Any]]
    adapter: F32 | None
    meta: Mapping[str, Any]

    @property
    def embedder_id(self) -> str:
        return f"{self.base}+tuned-{self.digest}"

    def adapt(self, vectors: npt.NDArray[Any]) -> F32:
        """Pooled, normalised vectors → the tuned embedder's (identity without adapter)."""
        x = np.asarray(vectors, dtype=np.float32)
        if self.adapter is None:
            return x
        z = x @ self.adapter.T
        norms = np.linalg.norm(z, axis=-1, keepdims=True)
        out: F32 = (z / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
        return out


def apply_layers(model: Any, tuning: Tuning) -> None:
    """Put the tuning's transformer parameters into a loaded all-MiniLM-L6-v2 (a
    ``SentenceTransformer``), in place, before any runtime uses or exports it."""
    if not tuning.layers:
        return
    import torch

    bert = model[0].auto_model
    state = bert.state_dict()
    for name, array in tuning.layers.items():
        if name not in state:
            raise TuningError(f"the model has no parameter {name!r}")
        if tuple(state[name].shape) != array.shape:
            raise TuningError(f"{name} has shape {array.shape}, the model's is "
                              f"{tuple(state[name].shape)}")
    bert.load_state_dict({name: torch.from_numpy(np.asarray(array, dtype=np.float32))
                          for name, array in tuning.layers.items()}, strict=False)


def check_base(tuning: Tuning, base: str) -> None:
    """Refuse a tuning fitted on other weights than the ones loaded (``base``)."""
    if tuning.base != base:
        raise TuningError(f"it was fitted on {tuning.base}, but the weights loaded are {base}")


def base_id() -> str:
    """The embedder id of the bundled all-MiniLM-L6-v2 weights, untuned."""
    from synapse_common import minilm

    return f"{BASE_NAME}@{minilm.weights_version()}"


def resolve(setting: str) -> pathlib.Path | None:
    """``shipped`` → the file in this package, ``none`` → no tuning, else a path."""
    if setting == "none":
        return None
    return SHIPPED if setting == "shipped" else pathlib.Path(setting).expanduser()


def load(path: str | pathlib.Path) -> Tuning:
    file = pathlib.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise TuningError(f"cannot read embedder tuning {file}: {exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return _parse(data)
    except TuningError as exc:
        raise TuningError(f"embedder tuning {file}: {exc}") from None
    except (ValueError, KeyError, OSError) as exc:
        raise TuningError(f"embedder tuning {file} is not a {FORMAT} file: {exc}") from None


def _parse(data: Any) -> Tuning:
    if str(data["format"]) != FORMAT:
        raise TuningError(f"format {str(data['format'])!r} is not {FORMAT}")
    layers = {name[len(LAYER_PREFIX):]: np.asarray(data[name]) for name in data.files
              if name.startswith(LAYER_PREFIX)}
    adapter = np.asarray(data["adapter"], np.float32) if "adapter" in data.files else None
    if adapter is not None and (adapter.ndim != 2 or adapter.shape[0] != adapter.shape[1]):
        raise TuningError(f"the adapter must be a square matrix, not {adapter.shape}")
    for name, array in [*layers.items(), ("adapter", adapter)]:
        if array is not None and not np.all(np.isfinite(array)):
            raise TuningError(f"{name} holds values that are not finite")
    base = str(data["base"])
    return Tuning(base, digest(base, layers, adapter), layers, adapter,
                  json.loads(str(data["meta"])))


def digest(base: str, layers: Mapping[str, npt.NDArray[Any]],
           adapter: npt.NDArray[Any] | None) -> str:
    """What names a tuning: a hash of its base and of every array, as stored."""
    h = hashlib.sha256(base.encode())
    for name in sorted(layers):
        array = np.ascontiguousarray(layers[name], dtype=np.float16)
        h.update(f"\x00{name}\x00{array.shape}".encode())
        h.update(array.tobytes())
    if adapter is not None:
        h.update(b"\x00adapter\x00")
        h.update(np.ascontiguousarray(adapter, dtype=np.float32).tobytes())
    return h.hexdigest()[:12]


def save(path: str | pathlib.Path, base: str, layers: Mapping[str, npt.NDArray[Any]],
         adapter: npt.NDArray[Any] | None, meta: Mapping[str, Any]) -> Tuning:
    """Write a tuning file (layers as float16) and return it as read back."""
    arrays: dict[str, Any] = {"format": np.asarray(FORMAT), "base": np.asarray(base),
                              "meta": np.asarray(json.dumps(meta, sort_keys=True))}
    for name in sorted(layers):
        arrays[LAYER_PREFIX + name] = np.asarray(layers[name], dtype=np.float16)
    if adapter is not None:
        arrays["adapter"] = np.asarray(adapter, dtype=np.float32)
    file = pathlib.Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(file)
    return load(file)

"""all-MiniLM-L6-v2's transformer in onnxruntime: the in-process embedder's fast path.

:func:`load` (blocking, run off the event loop at start) exports the SentenceTransformer's
BertModel once to an ONNX file cached on disk, opens it in onnxruntime with the thread
count torch uses, and checks it against the torch path; any failure raises
:class:`OnnxUnavailable` with the reason and the caller keeps torch (see
:mod:`agent.embedding.minilm`).

* Only the transformer is exported (``input_ids``, ``attention_mask``,
  ``token_type_ids`` → ``last_hidden_state``, dynamic batch and sequence axes, opset 17,
  the TorchScript exporter). Tokenizing stays the model's own ``preprocess`` (same
  truncation at ``max_seq_length``, same padding); mean pooling over the attention mask and
  L2 normalisation run in numpy, as the model's Pooling and Normalize modules compute them.
  A model whose modules are anything but Transformer → Pooling(mean) → Normalize is
  refused rather than approximated.
* The file name carries the weights package version and the torch version, so a changed
  model or exporter never reuses a stale file; it is written to a temporary file and
  renamed. When the cache directory is not writable the export goes to a temporary
  directory for this run only.
* **The cache is trusted only as far as it is private** (:func:`open_cached`, shared with
  the pair scorer). onnxruntime runs whatever graph the file holds, and the start-up check
  against torch compares a few fixed inputs only, so a file that passes it is not
  necessarily the one exported here. Each export records its SHA-256 in a sidecar
  ``<name>.sha256`` (``sha256sum`` format), written atomically after the file; a file is
  reused only when it hashes to its sidecar's digest (once per start), and otherwise (no
  sidecar, another digest: truncated, damaged or written by someone else) exported again,
  with one warning. **The bytes hashed are the bytes loaded:** a file is read once, through
  one descriptor (no symlink followed; checked to be this user's regular file, writable by
  no one else), those bytes are hashed and onnxruntime builds its session from them, never
  from the file's name again, so a file swapped after the check is not the one that runs.
  The same goes for a fresh export (hashed for its sidecar and loaded from one read). The
  cost: the file (the whole export) is held in memory while the session is made. A cache
  directory other users can write (group- or other-writable without the sticky bit) or
  another user owns is not used at all: the export goes to a private temporary directory
  for this run only, with a warning naming
  ``embedder.onnx_cache_dir``; in a sticky directory the file and sidecar must be this
  user's and writable by no one else. Directories made here are 0700, files 0600. Only
  the directory itself is checked, not its parents.
* Same chunks as the torch path: longest texts first, ``batch_size`` at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import re
import stat
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from agent.embedding import model as model_mod
from synapse_common import minilm

log = logging.getLogger(__name__)
_R = TypeVar("_R")

OPSET = 17
DIGEST_SUFFIX = ".sha256"   # the sidecar holding an export's SHA-256, beside it
SETTING = "embedder.onnx_cache_dir"
TOLERANCE = 1e-5  # max abs difference from the torch path, per vector component
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Fixed texts of the start-up check: short, unicode, truncated at max_seq_length.
CHECK_TEXTS = ["hi", "How do I reset my password?", "été, naïve café — unicode text",
               " ".join(["kubernetes schedules pods onto nodes"] * 80),
               "The cat sat on the mat. " * 6]


class OnnxUnavailable(Exception):
    """The ONNX path cannot be used; ``str()`` says why."""


class NotInstalled(OnnxUnavailable):
    """onnxruntime or onnx is missing (the ``embed`` extra installs both)."""


def check_modules(model: Any) -> None:
    """Refuse any model but Transformer → Pooling(mean) → Normalize."""
    names = [type(m).__name__ for m in model]
    if names != ["Transformer", "Pooling", "Normalize"]:
        raise OnnxUnavailable(f"the model's modules are {names}, not Transformer → Pooling "
                              "→ Normalize")
    pooling = model[1].get_config_dict()
    if "pooling_mode" in pooling:  # sentence-transformers >= 6
        mean = pooling["pooling_mode"] in ("mean", ["mean"], ("mean",))
    else:  # older releases: one flag per mode
        flags = {k: v for k, v in pooling.items() if k.startswith("pooling_mode_")}
        mean = bool(flags) and all(v == (k == "pooling_mode_mean_tokens")
                                   for k, v in flags.items())
    if not mean:
        raise OnnxUnavailable(f"the model's pooling is {pooling}, not mean pooling")


def cache_file(cache_dir: str) -> pathlib.Path:
    import torch

    key = f"{minilm.weights_version()}-torch{torch.__version__}-opset{OPSET}"
    return (pathlib.Path(cache_dir).expanduser()
            / f"all-minilm-l6-v2-{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.onnx")


def export(model: Any, path: pathlib.Path) -> None:
    """Export the model's transformer to ``path`` (a temporary file, then renamed)."""
    import torch

    transformer = model[0]
    bert = getattr(transformer, "auto_model", None) or transformer.model
    model.eval()
    features = model_mod.tokenizer_of(model)(["a sample", "a longer sample text for the export"])
    args = tuple(features[name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_ByName(bert), args, tmp, input_names=list(INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        model.eval()  # whatever the exporter did, the torch path stays deterministic
        if os.path.exists(tmp):
            os.unlink(tmp)


class _ByName:
    """Calls the transformer with keyword inputs (its forward's positional order and its
    decorators vary between transformers releases) and returns ``last_hidden_state``."""

    def __new__(cls, bert: Any) -> Any:
        import torch

        class ByName(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids,
                                 return_dict=True).last_hidden_state

        # In eval mode: export restores the wrapper's mode afterwards, recursively, and a
        # wrapper left in training mode would leave dropout on in the torch model.
        return ByName().eval()


class OnnxMiniLm:
    """The model's tokenizer, its transformer in onnxruntime, mean pooling and L2 norm."""

    def __init__(self, model: Any, session: Any) -> None:
        self._tokenize = model_mod.tokenizer_of(model)
        self._session = session
        self._inputs = [i.name for i in session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """The model's vectors for ``texts`` (blocking; onnxruntime releases the GIL)."""
        return model_mod.in_length_order(texts, batch_size, self._embed_chunk)

    def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        features = self._tokenize(texts)
        mask = features["attention_mask"].numpy()
        feeds = {name: (features[name].numpy() if name in features
                        else np.zeros_like(mask)) for name in self._inputs}
        hidden = self._session.run(["last_hidden_state"], feeds)[0]
        return pool(hidden, mask)


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the attention mask, then L2 normalisation, as Pooling and Normalize do."""
    weights = mask[..., None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    mean = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    unit: np.ndarray = (mean / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return unit


def _session(model: str | bytes, threads: int) -> Any:
    """An onnxruntime session of ``model``: the bytes of an export (what
    :func:`open_cached` passes) or a file's path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # No busy-waiting between runs: the event loop and gRPC share these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load(model: Any, cache_dir: str,
         reference: Callable[[list[str], int], np.ndarray]) -> OnnxMiniLm:
    """Export (once per cache file), open and check the ONNX path (blocking).

    ``reference`` is the torch path; the ONNX vectors of :data:`CHECK_TEXTS`, one text at a
    time and as one mixed-length padded batch, must equal its vectors to ``TOLERANCE``.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise NotInstalled(f"onnxruntime and onnx are needed ({exc})") from None
    import torch

    check_modules(model)
    threads = torch.get_num_threads()
    try:
        runner = _open(model, cache_file(cache_dir), threads)
    except OnnxUnavailable:
        raise
    except Exception as exc:
        raise OnnxUnavailable(f"ONNX export/load failed: {type(exc).__name__}: {exc}") from None
    return _checked(runner, reference)


def _open(model: Any, path: pathlib.Path, threads: int) -> OnnxMiniLm:
    return open_cached(path, lambda to: export(model, to),
                       lambda onnx_bytes: OnnxMiniLm(model, _session(onnx_bytes, threads)),
                       log, "embedder", "the transformer")


def open_cached(path: pathlib.Path, write: Callable[[pathlib.Path], None],
                open_file: Callable[[bytes], _R], logger: logging.Logger, who: str,
                what: str) -> _R:
    """The runner ``open_file`` makes of the bytes of the export at ``path`` (the very
    bytes whose SHA-256 was checked): reused when its SHA-256 matches its sidecar and it
    opens, exported again (``write``) when it is missing, unverified or damaged, exported
    for this run only (a private temporary directory) when ``path``'s directory is not
    private or cannot be written. Logged on ``logger`` (the caller's), ``who`` and ``what``
    naming the model."""
    untrusted = _not_private(path.parent)
    if untrusted:
        logger.warning("%s: not using the ONNX cache %s: %s; exporting for this run only "
                       "(set %s to a directory only this user can write)", who, path.parent,
                       untrusted, SETTING)
        return _for_this_run(path, write, open_file)
    if path.exists() or _sidecar(path).exists():
        try:
            verified = _verified(path)
        except _Untrusted as why:
            logger.warning("%s: not reusing %s: %s; exporting again", who, path, why)
        else:
            try:
                runner = open_file(verified)
                logger.info("%s: reusing %s", who, path)
                return runner
            except Exception as exc:  # damaged: export it again
                logger.warning("%s: cannot load %s (%s); exporting again", who, path, exc)
    try:
        _sidecar(path).unlink(missing_ok=True)  # first: a file left alone is not trusted
        path.unlink(missing_ok=True)
        exported = _export_recorded(path, write)
    except OSError as exc:
        logger.warning("%s: cannot write %s (%s); exporting for this run only", who, path, exc)
        return _for_this_run(path, write, open_file)
    logger.info("%s: exported %s to %s", who, what, path)
    return open_file(exported)


def _for_this_run(path: pathlib.Path, write: Callable[[pathlib.Path], None],
                  open_file: Callable[[bytes], _R]) -> _R:
    """Export to a private temporary directory (0700, removed afterwards) and open it."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(tmp) / path.name
        write(scratch)
        return open_file(scratch.read_bytes())


def _export_recorded(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> bytes:
    """Export to ``path`` (0600), record its SHA-256 in the sidecar, atomically, and
    return the bytes that were hashed (the ones to load)."""
    write(path)
    os.chmod(path, 0o600)
    exported = path.read_bytes()
    line = f"{hashlib.sha256(exported).hexdigest()}  {path.name}\n"
    sidecar = _sidecar(path)
    fd, tmp = tempfile.mkstemp(prefix=sidecar.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(line)
        os.replace(tmp, sidecar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exported


def _not_private(folder: pathlib.Path) -> str | None:
    """Why ``folder`` cannot hold a trusted cache, or None; made (0700, as are the missing
    folders above it) when missing."""
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    try:
        for made in reversed(missing):
            with contextlib.suppress(FileExistsError):
                made.mkdir(mode=0o700)
    except OSError:
        return None     # cannot be made: the export then fails to write, and says so
    try:
        st = folder.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"other users can write it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


class _Untrusted(Exception):
    """Why a cached export is not reused (``str()``)."""


def _verified(path: pathlib.Path) -> bytes:
    """The bytes of the export at ``path``, read once, when they hash to the digest its
    sidecar records; :class:`_Untrusted` says why not."""
    sidecar = _sidecar(path)
    exported = _read_own(path)
    try:
        recorded = _read_own(sidecar).decode("ascii").split()[0]
    except (UnicodeDecodeError, IndexError):
        raise _Untrusted(f"{sidecar.name} cannot be read") from None
    if hashlib.sha256(exported).hexdigest() != recorded:
        raise _Untrusted(f"its SHA-256 does not match {sidecar.name}")
    return exported


def _read_own(file: pathlib.Path) -> bytes:
    """All of ``file``, read through one descriptor checked to be this user's regular file,
    writable by no one else: opened without following a symlink, and without blocking (a
    FIFO is refused by the check, not waited on)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags)
    except FileNotFoundError:
        raise _Untrusted(f"no {file.name}") from None
    except OSError as exc:     # ELOOP: a symlink
        raise _Untrusted(f"{file.name} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as opened:
        st = os.fstat(opened.fileno())
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            raise _Untrusted(f"{file.name} is not a regular file only this user can write")
        try:
            return opened.read()
        except OSError as exc:
            raise _Untrusted(f"{file.name} cannot be read ({exc.strerror})") from None


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _checked(runner: OnnxMiniLm, reference: Callable[[list[str], int], np.ndarray]
             ) -> OnnxMiniLm:
    try:
        diff = 0.0
        for text in CHECK_TEXTS:
            diff = max(diff, float(np.abs(runner.encode([text], 1) - reference([text], 1)).max()))
        batch = len(CHECK_TEXTS)
        diff = max(diff, float(np.abs(runner.encode(CHECK_TEXTS, batch)
                                      - reference(CHECK_TEXTS, batch)).max()))
    except Exception as exc:
        raise OnnxUnavailable(f"ONNX check failed: {type(exc).__name__}: {exc}") from None
    if not diff <= TOLERANCE:  # NaN fails too
        raise OnnxUnavailable(f"ONNX vectors differ from torch's by {diff:.3g} "
                              f"(> {TOLERANCE:g})")
    log.info("embedder: ONNX vectors match torch's (max abs difference %.2g)", diff)
    return runner

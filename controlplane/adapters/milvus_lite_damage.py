"""A damaged Milvus Lite store: what counts as damage, moving it aside, the copies kept.

:class:`controlplane.adapters.milvus.MilvusStore` calls :func:`move_if_damaged` when opening
a Lite store failed; it opens the store directly with milvus-lite's own ``MilvusLite``
(passed in, so that this module imports neither pymilvus nor milvus-lite).

- **Moved aside, not deleted.** It is a cache: if :func:`damaged` says the store's own
  files are unreadable, the store (a directory: Milvus Lite keeps everything inside it,
  nothing beside it) is renamed to ``<name>.corrupt-<UTC time>``, while the direct open
  still holds the store's lock, and a fresh store is started, with one ERROR line. A store
  another process holds (Milvus Lite allows one process per store) is never moved: its
  lock cannot be taken, which is not damage; nor is a store whose open timed out
  (:func:`timed_out`) checked at all.
- **Damage is what a damaged store was seen to raise, nothing broader.** The list in
  :func:`damaged` comes from real milvus-lite 3.2 stores truncated, zeroed, overwritten
  with random bytes and with bytes flipped at many offsets (each file kind in turn). A
  bare ``ValueError``/``TypeError``/``KeyError`` is not damage: a bug or a bad argument
  raises them too (a collection name that is not a string raises ``TypeError`` on a
  healthy store), and taking them for damage moved a healthy store aside and lost the
  cache. A ``ValueError`` counts only when numpy's ``.npy`` reader raised it, an Arrow
  error only when the Parquet reader did. Damage in the write-ahead log and in one of the
  two manifests raises nothing: milvus-lite recovers what it can by itself.
- **At most :data:`KEEP_MOVED` moved copies per store** (the newest, by the time in their
  names: enough to study a recurring fault, while a store that keeps breaking cannot fill
  the disk with whole copies of the cache). Older ones are
  deleted when a new one is moved aside, with one WARNING naming them.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
from typing import Any

# The L2 store's logger: its operators filter one name for everything about the store.
log = logging.getLogger("controlplane.adapters.milvus")

KEEP_MOVED = 3                  # moved-aside copies of a damaged Lite store kept (newest)


def damaged(exc: BaseException, path: str) -> bool:
    """Whether ``exc``, raised by milvus-lite while opening its store at ``path`` directly
    (the data directory, a collection and its load), means the store's own files are
    damaged, so that moving it aside and starting afresh is right.

    Damage (each seen on a real store damaged on purpose; see the module docstring):

    - milvus-lite's own verdicts: ``ManifestCorruptedError`` (both manifests unreadable),
      ``WALCorruptedError``, and ``SchemaValidationError`` about its ``schema file`` (not
      valid JSON, keys missing); the same class also refuses a bad schema or record.
    - ``UnicodeDecodeError``: a JSON file of the store that is not UTF-8 any more.
    - ``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError`` naming a path in
      the store: a file where a directory belongs or the reverse (a garbage or truncated
      store, a milvus-lite 2 file, ``LOCK`` or ``schema.json`` a directory).
    - ``ValueError`` or ``EOFError`` raised by numpy's ``.npy`` reader (an index file
      truncated or overwritten: "Cannot parse header", "Failed to read all data",
      "No data left in file", "contains pickled (object) data").
    - pyarrow's ``ArrowInvalid``, or a bare ``OSError`` without an errno (Arrow's own I/O
      status: "Couldn't deserialize thrift", "Corrupt snappy compressed data"), raised by
      the Parquet reader (a data file truncated or overwritten).

    Not damage: ``DataDirLockedError`` (another process holds the store), any ``OSError``
    with an errno (permissions, a full disk, too many open files, I/O errors: moving the
    store would not help, and the next start may succeed), and anything else, a
    ``ValueError``, ``TypeError`` or ``KeyError`` of a bug or a bad argument included.
    """
    kind = type(exc).__name__
    if kind in ("ManifestCorruptedError", "WALCorruptedError"):
        return True
    if kind == "SchemaValidationError":
        return str(exc).startswith("schema file ")
    if isinstance(exc, UnicodeDecodeError):
        return True
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return _in_store(exc.filename, path)
    if isinstance(exc, (ValueError, EOFError)) and _raised_in(exc, _NPY_READER):
        return True
    if kind == "ArrowInvalid" or (type(exc) is OSError and exc.errno is None):
        return _raised_in(exc, _PARQUET_READER)
    return False


# Where the readers of a store's files live (numpy 2 names, then numpy 1 names).
_NPY_READER = ("numpy/lib/_npyio_impl.py", "numpy/lib/_format_impl.py",
               "numpy/lib/npyio.py", "numpy/lib/format.py")
_PARQUET_READER = ("pyarrow/parquet/",)


def _raised_in(exc: BaseException, places: tuple[str, ...]) -> bool:
    """Whether ``exc`` was raised inside (or below) a source file under one of ``places``:
    its traceback runs from where it was caught to where it was raised."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if any(place in name for place in places):
            return True
        tb = tb.tb_next
    return False


def _in_store(filename: object, path: str) -> bool:
    """Whether ``filename`` (an ``OSError``'s) is the store at ``path`` or inside it."""
    if not isinstance(filename, str):
        return False
    name = os.path.abspath(filename)
    return name == path or name.startswith(path.rstrip(os.sep) + os.sep)


def timed_out(exc: BaseException) -> bool:
    """Whether opening failed by running out of time (a slow load on a busy machine, a
    lock another process is releasing): never damage, and the direct open that checks for
    damage would only hold the store longer."""
    return isinstance(exc, TimeoutError) or "timeout" in str(exc).lower()


def move_if_damaged(lite_db: Any, path: str, collection: str) -> str | None:
    """Open the Lite store at ``path`` directly; if that fails with damage, rename it to
    ``<path>.corrupt-<UTC time>`` (while still holding its lock, when it was taken, so that
    no other process has it open) and return the new name; else None."""
    held: Any = None
    try:
        held = lite_db.MilvusLite(path)
        if held.has_collection(collection):
            held.get_collection(collection).load()
        return None     # it opens: the failure was something else
    except Exception as exc:
        if not damaged(exc, path):
            return None
        moved = _aside_name(path)
        try:
            os.rename(path, moved)
        except OSError as err:
            log.error("Milvus Lite store %s is damaged (%s: %s) and cannot be moved aside: %s",
                      path, type(exc).__name__, exc, err)
            return None
        log.error("Milvus Lite store %s is damaged (%s: %s): moved it to %s and started a "
                  "fresh one", path, type(exc).__name__, exc, moved)
        _prune_moved(path)
        return moved
    finally:
        if held is not None:
            held.close()


def _aside_name(path: str) -> str:
    """``<path>.corrupt-<UTC time>``, with a counter when that name is taken (a rename
    onto an existing file would delete it)."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    name, n = f"{path}.corrupt-{stamp}", 1
    while os.path.lexists(name):
        name, n = f"{path}.corrupt-{stamp}-{n}", n + 1
    return name


def _moved_copies(path: str) -> list[str]:
    """The moved-aside copies of the store at ``path`` (names :func:`_aside_name` gives),
    oldest first: by the UTC time in the name, then by its counter."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.corrupt-(\d{8}T\d{6}Z)(?:-(\d+))?")
    found = []
    for name in os.listdir(folder or "."):
        if m := pattern.fullmatch(name):
            found.append((m[1], int(m[2] or 0), os.path.join(folder, name)))
    return [p for _, _, p in sorted(found)]


def _prune_moved(path: str) -> None:
    """Delete all but the newest :data:`KEEP_MOVED` moved-aside copies of the store at
    ``path``, with one WARNING naming what went (a failure to delete one is logged too)."""
    try:
        old = _moved_copies(path)[:-KEEP_MOVED]
    except OSError as err:
        log.warning("cannot list the moved-aside copies of Milvus Lite store %s: %s",
                    path, err)
        return
    removed = []
    for copy in old:
        try:
            if os.path.isdir(copy) and not os.path.islink(copy):
                shutil.rmtree(copy)
            else:
                os.remove(copy)
        except OSError as err:
            log.warning("cannot delete %s, an old copy of damaged Milvus Lite store %s: %s",
                        copy, path, err)
            continue
        removed.append(copy)
    if removed:
        log.warning("deleted %d old moved-aside copies of Milvus Lite store %s (keeping "
                    "the newest %d): %s", len(removed), path, KEEP_MOVED,
                    ", ".join(removed))

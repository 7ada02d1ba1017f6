"""Non-Python tools the manifest tests call, found or failed with how to get them."""

from __future__ import annotations

import shutil
import subprocess


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        raise AssertionError("promtool not found: run `make tools` (installs Debian's "
                             "`prometheus` package) or `apt-get install prometheus`")
    return path


def run_promtool(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=cwd)

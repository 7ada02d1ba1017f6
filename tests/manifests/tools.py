"""Non-Python tools the manifest tests call, found or failed with how to get them."""

from __future__ import annotations

import subprocess

from tests import harness


def promtool() -> str:
    return harness.tool("promtool", "run `make tools` (installs Debian's `prometheus` "
                        "package) or `apt-get install prometheus`")


def run_promtool(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=cwd)

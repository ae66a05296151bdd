# dist_ft developer targets. Every target creates .venv on first use, so `make demo` and
# `make test` each work alone on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-unit test-fast lint format bench clean

setup: $(STAMP)

# torch goes in first, pinned: pip then takes the CPU wheel where one is provided (no CUDA
# download on CPU machines) and the CUDA build on GPU machines. uv installs the rest against the
# lock in constraints.txt (about 10 s instead of a minute with pip).
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.9
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dist-ft demo

test: $(STAMP)
	$(PY) -m pytest -q -ra

# Pure tests only (no DeepSpeed, Ray or training runs): under 2 minutes on 2 cores.
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# Everything but tests/slow (Ray clusters, SLURM, resume, chaos, the demo).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/integration tests/test_*.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .ruff_cache

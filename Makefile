# w4a8conv: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch: on these machines pip takes it from the local wheel cache. Elsewhere, point
# TORCH_INDEX at https://download.pytorch.org/whl/cpu so pip never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BENCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst =,_,$(TORCH))
DEMO := demo

.PHONY: install demo test test-typer-oldest test-engine test-engine-release test-engine-src test-slurm lint bench bench-canary docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	rm -rf $(DEMO)
	@# vllm-ascend's current line (the default target) serves per-channel and compressed-tensors MoE; 0.23 every layout.
	@for layout in mindie v1.0.0-per-group v1.0.0-per-channel compressed-tensors; do \
		target=vllm-ascend-0.23; case $$layout in *per-channel|compressed-tensors) target=vllm-ascend-0.25;; esac; \
		echo "== $$layout: a tiny synthetic DeepSeek-like checkpoint, converted for $$target"; \
		$(BIN)/w4a8conv synthetic $(DEMO)/ds-tiny-$$layout --layout $$layout || exit 1; \
		$(BIN)/w4a8conv inspect $(DEMO)/ds-tiny-$$layout --target $$target || exit 1; \
		$(BIN)/w4a8conv convert --in $(DEMO)/ds-tiny-$$layout --out $(DEMO)/ds-tiny-$$layout-converted \
			--target $$target || exit 1; \
		$(BIN)/w4a8conv inspect $(DEMO)/ds-tiny-$$layout-converted || exit 1; \
		$(BIN)/w4a8conv verify $(DEMO)/ds-tiny-$$layout $(DEMO)/ds-tiny-$$layout-converted --numeric || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check w4a8conv tests scripts
	$(BIN)/ruff format --check w4a8conv tests scripts

test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-typer-oldest

# The venv holds the newest Typer pyproject.toml allows, which the whole suite ran on; the command-line
# tests run again on the oldest it allows (tests/test_cli.py checks the two bounds agree).
TYPER_OLDEST := typer==0.26.0
CLI_TESTS := tests/test_cli.py tests/test_exit_codes.py tests/test_inspect.py tests/test_registry.py \
	tests/test_cli_reference.py
test-typer-oldest: $(STAMP)
	rm -rf .typer-oldest
	$(BIN)/python -m pip install --quiet --no-deps --target .typer-oldest "$(TYPER_OLDEST)"
	PYTHONPATH=.typer-oldest $(BIN)/python -m pytest -q -p no:cacheprovider $(CLI_TESTS)

# The plugin through the real vLLM 0.23.0 and vllm-ascend 0.23.0 (tests/engine), in a venv of their own:
# both with --no-deps (their own lists pull CUDA and CANN), plus the pure-Python packages their imports
# need, pinned (tests/engine/requirements.txt); torch_npu is stood in (tests/engine/stubs).
ENGINE_VENV ?= .venv-engine
ENGINE_PACKAGES := vllm==0.23.0 vllm-ascend==0.23.0
ENGINE_STAMP := $(ENGINE_VENV)/.installed-engine-0.23
$(ENGINE_STAMP): pyproject.toml tests/engine/requirements.txt
	test -x $(ENGINE_VENV)/bin/python || $(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(ENGINE_VENV)/bin/python -m pip install --quiet --no-deps -r tests/engine/requirements.txt
	$(ENGINE_VENV)/bin/python -m pip install --quiet --no-deps $(ENGINE_PACKAGES)
	$(ENGINE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-engine: $(ENGINE_STAMP)
	PYTHONPATH=tests/engine/stubs VLLM_LOGGING_LEVEL=WARNING $(ENGINE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/engine

# The same tests against a later vllm-ascend in a venv of its own with the vLLM it was built for (ENGINE_VLLM):
# - test-engine-release: a release from its source distribution on PyPI (releases after 0.26.0rc1 are sdists only,
#   whose build needs CANN; scripts/vllm_ascend_release.py unpacks the Python package). CI runs 0.26.0rc1 with
#   vLLM 0.26.0 and 0.30.0rc2 with vLLM 0.30.0.
# - test-engine-src: a source tree, VLLM_ASCEND_SRC (main, with ENGINE_VLLM=0.27.1 as its Dockerfile says, or a
#   release branch), copied by the same script; its version is ENGINE_SRC_VERSION, with +g and the commit where
#   the tree is a git checkout.
ENGINE_RELEASE ?= 0.30.0rc2
ENGINE_VLLM ?= 0.30.0
VLLM_ASCEND_SRC ?=
ENGINE_SRC_VERSION ?= 0.27.0rc0
LATER_VENV := .venv-engine-vllm-$(ENGINE_VLLM)
LATER_STAMP := $(LATER_VENV)/.installed
LATER_TESTS := PYTHONPATH=tests/engine/stubs:$(LATER_VENV)/src VLLM_LOGGING_LEVEL=WARNING \
	$(LATER_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/engine
$(LATER_STAMP): pyproject.toml tests/engine/requirements.txt tests/engine/requirements-src.txt
	test -x $(LATER_VENV)/bin/python || $(PYTHON) -m venv $(LATER_VENV)
	$(LATER_VENV)/bin/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(LATER_VENV)/bin/python -m pip install --quiet --no-deps -r tests/engine/requirements.txt
	$(LATER_VENV)/bin/python -m pip install --quiet --no-deps -r tests/engine/requirements-src.txt
	$(LATER_VENV)/bin/python -m pip install --quiet --no-deps vllm==$(ENGINE_VLLM)
	$(LATER_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

test-engine-release: $(LATER_STAMP)
	rm -rf $(LATER_VENV)/src && mkdir -p $(LATER_VENV)/src
	$(LATER_VENV)/bin/python scripts/vllm_ascend_release.py $(ENGINE_RELEASE) $(LATER_VENV)/src
	$(LATER_TESTS)

test-engine-src: $(LATER_STAMP)
	@test -d "$(VLLM_ASCEND_SRC)/vllm_ascend" || { echo "make test-engine-src: set VLLM_ASCEND_SRC to a vllm-ascend checkout" >&2; exit 2; }
	rm -rf $(LATER_VENV)/src && mkdir -p $(LATER_VENV)/src
	$(LATER_VENV)/bin/python scripts/vllm_ascend_release.py $(ENGINE_SRC_VERSION) $(LATER_VENV)/src --tree "$(VLLM_ASCEND_SRC)"
	$(LATER_TESTS)

# Job arrays on a real single-node Slurm (tests/slurm): the README's commands on a private cluster (its own
# config, ports and munge socket under a temporary directory). Installs Slurm and munge from the
# distribution's packages when they are missing (scripts/slurm_packages.sh: root and apt-get).
test-slurm: $(STAMP)
	scripts/slurm_packages.sh
	W4A8CONV_TEST_SLURM=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/slurm

# What the canary check costs at DeepSeek-R1's expert shape on the real vllm-ascend 0.23 (CPU).
bench-canary: $(ENGINE_STAMP)
	PYTHONPATH=tests/engine/stubs VLLM_LOGGING_LEVEL=WARNING $(ENGINE_VENV)/bin/python scripts/bench_canary.py $(BENCH_ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

docs: $(STAMP)
	$(BIN)/python scripts/cli_reference.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) .venv-engine-vllm-* $(DEMO) bench-data .pytest_cache .ruff_cache .typer-oldest *.egg-info

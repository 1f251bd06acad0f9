# Two commands for a newcomer: `make demo` (quantize, evaluate, serve SmolLM2-135M) and `make test`.
# Both create .venv if it is missing and install what is needed (.ci/install); re-running reuses it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.daq-installed
TEST_COMMAND := $(shell awk '/<!-- test-command -->/ {getline; getline; print; exit}' README.md)

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/install
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "make: could not create $(VENV); install Python's venv module (e.g. apt-get install python3-venv)" >&2; exit 1; }
	@echo "== installing into $(VENV) (torch, vLLM, daq-vllm; a few minutes the first time)"
	@. $(VENV)/bin/activate && bash .ci/install || \
		{ echo "make: installing failed (pip's message is above); check the network to PyPI and rerun make" >&2; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@. $(VENV)/bin/activate && python -m daq_vllm.demo

test: $(STAMP)
	@. $(VENV)/bin/activate && export DAQ_REQUIRE_ALL=1 && $(TEST_COMMAND)

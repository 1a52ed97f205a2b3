# Two entry points: `make serve` and `make test`. Everything else is a helper of these.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHECKPOINT ?=
ADAPTERS_DIR ?=
PROFILE ?= cpu
PORT ?= 8000
TRITON_HTTP_PORT ?= 8010
TRITON_GRPC_PORT ?= 8011
TRITON_METRICS_PORT ?= 8012
OUTPUTS ?= outputs

.PHONY: install serve test

$(STAMP): requirements.txt scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(PY) -m acestep_triton.serve --profile $(PROFILE) --checkpoint "$(CHECKPOINT)" --adapters-dir "$(ADAPTERS_DIR)" \
		--port $(PORT) --outputs $(OUTPUTS) \
		--triton-http-port $(TRITON_HTTP_PORT) --triton-grpc-port $(TRITON_GRPC_PORT) \
		--triton-metrics-port $(TRITON_METRICS_PORT)

test: install
	$(PY) -m pytest -q --durations=40 tests

# sutra-embed: every entry point a user or CI needs.
#   make setup     venv + dependencies + generated gRPC code + buf (idempotent, quick when nothing changed)
#   make up        start the local stack and wait until it is healthy
#   make down      stop exactly what `make up` started
#   make status    health of each process and HAProxy's view of each replica
#   make test      lint protos, check generated code, run the whole suite
#   make bench     benchmarks (QUICK=1 for the short version)
#   make validate  the seed's phase 0/1/2 validation against a running stack

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

PROTOS := $(shell find protos -name '*.proto')
DEPS_STAMP := $(VENV)/.deps-installed
GEN_STAMP := sutra/.generated
BUF := node_modules/.bin/buf
SYSTEM_STAMP := $(VENV)/.system-installed

.PHONY: setup up down status test bench validate lint gen clean

setup: $(DEPS_STAMP) $(GEN_STAMP) $(BUF) $(SYSTEM_STAMP)

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $@

$(GEN_STAMP): $(PROTOS) $(DEPS_STAMP) tools/gen_protos.py
	$(PY) tools/gen_protos.py --out .
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

# Debian packages the stack and the benchmarks need (haproxy; redis-server for the shard benchmark).
$(SYSTEM_STAMP):
	@if ! command -v haproxy >/dev/null || ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy redis-server; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy redis-server; fi; \
	fi
	touch $@

gen: $(GEN_STAMP)

lint: setup
	$(BUF) lint

test: setup
	$(BUF) lint
	$(PY) -m pytest $(PYTEST_ARGS)

up: setup
	$(PY) -m deploy up $(UP_ARGS)

down:
	@if [ -x $(PY) ]; then $(PY) -m deploy down; else echo "nothing to stop (no .venv)"; fi

status: setup
	$(PY) -m deploy status

validate: setup
	$(PY) -m deploy validate $(VALIDATE_ARGS)

bench: setup
	$(PY) -m bench $(if $(QUICK),--quick,) $(BENCH_ARGS)

clean:
	rm -rf sutra .run build *.egg-info

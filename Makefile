# sutra-embed: every entry point a user or CI needs.
#   make setup     venv + dependencies + generated gRPC code + buf (idempotent, quick when nothing changed)
#   make up        start the local stack and wait until it is healthy
#   make down      stop exactly what `make up` started
#   make status    health of each process and HAProxy's view of each replica
#   make test      lint protos, check generated code, run the whole suite
#   make bench     benchmarks (QUICK=1 for the short version)
#   make bench-redis  the cache shard against Redis (installs Debian's redis-server, service left disabled)
#   make validate  the seed's phase 0/1/2 validation against a running stack
#   make image-base     a Debian bookworm base image from Debian's archive (debootstrap; no registry needed)
#   make image          sutra-embed:<version> and sutra-haproxy:2.6 through the offline path
#   make compose-check  the compose stack in real containers: built, validated, a replica and a shard killed, removed

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
REDIS_STAMP := $(VENV)/.redis-installed
APT_INSTALL := tools/install_debian_packages.sh

.PHONY: setup up down status test bench bench-redis validate lint gen clean image-base image compose-check

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

# Debian packages, each installed by the target that needs it and no other: haproxy for the stack
# (and the tests), redis-server for bench-redis only. Never a system service: the script keeps the
# packages' services stopped and disabled; our processes run these programs on ports of their own.
$(SYSTEM_STAMP): $(APT_INSTALL)
	$(APT_INSTALL) haproxy
	touch $@

$(REDIS_STAMP): $(APT_INSTALL)
	$(APT_INSTALL) redis-server
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

bench-redis: setup $(REDIS_STAMP)
	$(PY) -m bench.shard_vs_redis $(if $(QUICK),--quick,) $(BENCH_ARGS)

# Containers (tools/containers/, README "Containers and Kubernetes"). Each installs docker.io and
# docker-compose if missing and starts dockerd if none answers.
image-base:
	tools/containers/ensure_docker.sh
	tools/containers/image_base.sh

image: setup
	tools/containers/ensure_docker.sh
	tools/containers/build_images.sh

compose-check: setup
	tools/containers/compose_check.sh

clean:
	rm -rf sutra .run build *.egg-info

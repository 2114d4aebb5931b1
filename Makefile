# User-facing commands; each wraps a Python CLI (tools/, app/, localcluster/).
# `make test` does all of its own set-up on a fresh Debian/Ubuntu machine.

PYTHON ?= python3
VENV_PY := .venv/bin/python
STACK ?= dev

.PHONY: setup setup-cloud test lint typecheck unit preview up destroy

setup:
	$(PYTHON) tools/bootstrap.py

setup-cloud:
	$(PYTHON) tools/bootstrap.py --no-rabbitmq

lint: setup-cloud
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .
	.venv/bin/actionlint -no-color -shellcheck .venv/bin/shellcheck -pyflakes "" .github/workflows/*.yml

typecheck: setup-cloud
	$(VENV_PY) -m mypy .

# Everything CI runs: lint, type check, the policy pack's tests, unit/mocks/schema
# tests and the real-RabbitMQ integration tests.
test: setup lint typecheck policy-test scan
	$(VENV_PY) -m pytest

# The policy pack's rules, each on a passing and a violating resource, and on
# every resource the program registers (read from `make plans`). Its own venv.
.PHONY: policy-test
policy-test: setup-cloud plans
	.venv-policy/bin/python -m pytest policy/tests

# checkov over the rendered manifests of every stack (its own venv); every
# finding is fixed or explained in checkov-suppressions.yaml.
.PHONY: scan
scan: setup-cloud plans
	$(VENV_PY) -m tools.scan

preview up destroy: setup-cloud
	$(VENV_PY) -m tools.stack $@ --stack $(STACK) $(ARGS)

# What the program would register for a stack, as files, without credentials or
# the Pulumi CLI (the program under mocks, secrets redacted): out/plan/$(STACK)/.
.PHONY: plan plans
plan: setup-cloud
	$(VENV_PY) -m tools.plan --stack $(STACK)

# Every stack: what the policy tests and the security scan read.
plans: setup-cloud
	$(VENV_PY) -m tools.plan

# The whole system on this machine: the prod stack's rendered RabbitMQ StatefulSet
# (4.3 pods), worker Deployment and scheduler Job as pods (the pod twin, needs root),
# one fault midway, and the numbers: out/local/report.json and out/local/timeline.png.
#   make local ARGS="--fault broker-kill"      (see: .venv/bin/python -m localcluster --help)
.PHONY: local
local: setup
	$(VENV_PY) -m localcluster $(ARGS)

# The article's configuration (ha-all mirrored classic queue, Celery defaults) on
# RabbitMQ 3.10 pods against ours on 4.3 pods, as shipped (two pod twins, needs root),
# 3 runs each: out/bench/results.json, out/bench/bench.png and a table.  About 16
# minutes with the defaults.
#   make bench ARGS="--runs 5 --sleep-tasks 1000"   (see: .venv/bin/python -m bench --help)
.PHONY: bench
bench: setup
	$(VENV_PY) -m bench $(ARGS)

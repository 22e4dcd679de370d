# The two commands of the quickstart: `make demo` and `make test`. Both run `make setup` first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo cluster-demo dashboard-screenshot demo-engine test lint bench bench-engine bench-sandbox bench-techniques bench-remote bench-cluster soak doctor

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) bench/demo.py

test: setup
	@$(PY) -m ruff check warmboot tests bench examples
	@$(PY) -m pytest

lint: setup
	@$(PY) -m ruff check warmboot tests bench examples
	@$(PY) -m ruff format --check warmboot tests bench

dashboard-screenshot: setup
	@$(PY) bench/dashboard_screenshot.py

cluster-demo: setup
	@$(PY) bench/cluster_demo.py

demo-engine: setup
	@$(PY) bench/engine_demo.py

bench: setup
	@$(PY) bench/cold_starts.py
	@$(PY) bench/web_endpoints.py

bench-engine: setup
	@$(PY) bench/restore.py

bench-techniques: setup
	@$(PY) bench/restore_techniques.py

bench-remote: setup
	@$(PY) bench/remote_restore.py

bench-cluster: setup
	@$(PY) bench/cluster.py

bench-sandbox: setup
	@$(PY) bench/sandbox_choice.py

soak: setup
	@$(PY) bench/soak.py

doctor: setup
	@$(VENV)/bin/warmboot doctor

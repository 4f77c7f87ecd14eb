VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint serve

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Everything, the slow tests on the real packaged teacher and dataset included (what CI runs); the 20 slowest
# tests are listed at the end, so CI logs show where the time goes.
test: $(STAMP)
	$(PY) -m pytest -m 'slow or not slow' --durations=20

# The default pytest selection: tiny seeded models, no multi-process launches (97 s on 2 cores, 2026-12-01).
test-fast: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The API on 127.0.0.1:8000 with the embedded defaults: SQLite store and job artifacts under $DISTILL_HOME
# (~/.cache/distill), the packaged minilm-l6 teacher, the built-in reviews dataset (pulled once).
serve: $(STAMP)
	$(VENV)/bin/distill datasets pull reviews
	$(VENV)/bin/distill serve --host 127.0.0.1 --port 8000

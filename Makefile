# The two commands a newcomer needs: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
export TCP_NODELAY := 1

.PHONY: setup demo test lint clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/dicomnode demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf var demo-output .pytest_cache

# The two commands a newcomer needs: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
export TCP_NODELAY := 1

.PHONY: setup node demo test lint clean

setup:
	bash scripts/setup.sh

# A production host: the node alone (its virtual environment with OpenVINO; no Debian packages,
# viewer or test tools). `make demo` and `make test` need `make setup`.
node:
	bash scripts/setup.sh --node

demo: setup
	$(VENV)/bin/dicomnode demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=25

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf var demo-output .pytest_cache

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

# Two pytest workers (pytest-xdist), each module on one worker so its shared fixtures (an Orthanc, a
# segmented patient, a browser) are made once: 25 min in one process on the 2-core VM, 14 in two.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf var demo-output .pytest_cache

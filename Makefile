# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start the node on the embedded default (config/node.toml: SQLite index, ./data).
## The first run creates the project key (pseudonyms, re-identification map) in ./keys.
run: $(STAMP)
	test -f keys/project.key || $(BIN)/lamina keys init --out keys/project.key
	$(BIN)/lamina serve --config config/node.toml

## The whole test suite (DCMTK tests skip with a reason when it is not installed).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

## Throughput against DCMTK storescp (and Orthanc when installed).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

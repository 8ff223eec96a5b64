# Two commands on a fresh machine: `make run` and `make test`.
#
# The virtualenv is never meant to be activated: pynetdicom installs commands
# named storescu, findscu, getscu, movescu, storescp and echoscu into .venv/bin,
# which would hide DCMTK's tools of the same names. `make` links the one command
# people need, `lamina`, into .bin/; put that folder on PATH instead.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench fuzz clean

## Create .venv, install Lamina and its test tools, link .bin/lamina.
install: .bin/lamina

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

.bin/lamina: $(STAMP)
	mkdir -p .bin
	ln -sfn ../$(BIN)/lamina .bin/lamina

## Start the node on the embedded default (config/node.toml: SQLite index, ./data).
## The first run creates the project key (pseudonyms, re-identification map) in ./keys.
run: .bin/lamina
	test -f keys/project.key || $(BIN)/lamina keys init --out keys/project.key
	$(BIN)/lamina serve --config config/node.toml

## The whole test suite (DCMTK tests skip with a reason when it is not installed).
test: .bin/lamina
	$(BIN)/python -m pytest

## The fuzz properties of tests/test_fuzz.py, long (random seeds; FUZZ_EXAMPLES each).
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	LAMINA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -p no:cacheprovider tests/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .

## Throughput against DCMTK storescp (and Orthanc when installed).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) .bin .pytest_cache .ruff_cache *.egg-info

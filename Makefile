# Two entry points for a fresh machine: `make up` (platform + sample traffic) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := .cache/kafka/libs

.PHONY: up test lint unit install prereqs kafka-jars clean

up: install
	$(BIN)/ledgerflow up --demo 200 --poison

test: install lint
	$(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

unit: install
	$(BIN)/pytest -q -m "not kafka and not redis"

install: prereqs $(VENV)/.installed kafka-jars

prereqs:
	@PYTHON=$(PYTHON) scripts/prereqs.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

kafka-jars:
	@$(BIN)/python -m infra.kafka fetch --cache .cache/kafka

clean:
	rm -rf $(VENV) .cache .ledgerflow

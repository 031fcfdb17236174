# align-pro: `make demo` trains the demo on CPU, `make test` runs the test suite.
# Both create .venv and install everything on first use (torch==2.13.0 first, then the rest).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.align-pro-installed
DEMO_DIR ?= data/demo
RUN_DIR ?= runs/demo
NUM_RANKS ?= 2
FREE_PORT = $(shell $(PYTHON) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CPU_ENV := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

.PHONY: install demo data test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

data: $(DEMO_DIR)/train/manifest.json

$(DEMO_DIR)/train/manifest.json: | $(STAMP)
	$(PY) -m data_shards demo --out $(DEMO_DIR)

demo: install data
	$(CPU_ENV) $(VENV)/bin/deepspeed --num_gpus $(NUM_RANKS) --master_port $(FREE_PORT) \
		launch/pretrain.py --config zero3.json --run-dir $(RUN_DIR)
	$(PY) -m pretrain.summary --run-dir $(RUN_DIR)

test: install
	$(CPU_ENV) $(PY) -m pytest -q -n 2 --durations=25 tests

test-fast: install
	$(CPU_ENV) $(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(CPU_ENV) $(PY) benchmarks/infonce.py

clean:
	rm -rf runs $(DEMO_DIR) .pytest_cache

# Every target installs what it needs into .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch 2.13.0 CPU threads: keep the 2-core CI machine responsive
export OMP_NUM_THREADS ?= 2

.PHONY: install lint format test mutate demo bench readme-numbers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

# not in CI: plant one-line bugs in a scratch copy, one at a time; lists the survivors
# (make mutate ARGS="--only temperature accuracy_tie"; ARGS="--list")
mutate: install
	$(BIN)/python tests/mutation_smoke.py $(ARGS)

demo: install
	$(BIN)/python -m simpo.demo --out demo_out

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run_all.py

readme-numbers: install
	$(BIN)/python bench/readme_numbers.py

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

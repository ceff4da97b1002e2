# Two commands for a newcomer: `make demo` (install + run the default job) and `make test`.
# Both are idempotent: the virtualenv is reused when its stamp is newer than the project files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where `prepare` copies XQuAD-R from when it is not cached yet (else it downloads it).
RAYSYS_DATA_SOURCE ?= $(wildcard ../shared/data/xquad-r)
export RAYSYS_DATA_SOURCE

.PHONY: install demo quick test test-slow test-cluster bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

# The default job is the recipe (configs/recipe.yaml): it keeps monolingual retrieval while it removes
# language bias; `raysys demo` without --config runs the plain built-in defaults.
demo: $(STAMP)
	$(BIN)/raysys demo --config configs/recipe.yaml $(ARGS)

quick: $(STAMP)
	$(BIN)/raysys demo --quick $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

# A real multi-node Ray cluster (private node filesystems, needs root for unshare -m) + an S3 server.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster $(ARGS)

clean:
	rm -rf $(VENV) outputs runs

# The two commands a new user runs: `make demo` (the toy-world pipeline end to end) and `make test`.
# Each creates .venv and installs what it needs the first time (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on a CPU machine. Elsewhere: TORCH_SPEC=torch==2.13.0 TORCH_INDEX=<a wheel index>.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?= -m "not slow"
# Two test workers on the 2-core machine (pytest-xdist), a whole module per worker so module fixtures are built
# once: Ray start-ups and subprocess waits of one worker overlap the other's work (here: 1327 s in one process,
# 999-1061 s on two).
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-janusflow test test-all lint format clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo --config configs/demo.yaml $(ARGS)

demo-janusflow: $(STAMP)
	$(BIN)/python -m pipelines.demo --config configs/demo.yaml "families=[janusflow]" $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(XDIST)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf outputs .pytest_cache .ruff_cache

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz seed purity clean sweep

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned: 2.13.0 (CPU build) lies on disk; a loose range pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/aotgrad explain

test: $(STAMP)
	$(BIN)/python -m pytest -q -x tests

seed: $(STAMP)
	$(BIN)/python ../shared/seedtests/run_seed.py

purity:
	$(PY) ../shared/seedtests/check_purity.py

clean:
	rm -rf $(VENV) build *.egg-info

# A long fuzzing campaign: make fuzz N=10000 [SEED=2026] (no SEED: a random one),
# under aotgrad's config.debug_assert (its internal checks on)
N ?= 10000
SEED ?=
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_programs.py --count $(N) $(if $(SEED),--seed $(SEED)) --debug-assert

# Every OpInfo (op_db, hop_db) and ModuleInfo (module_db), static and dynamic=True,
# through aotgrad and PyTorch's own AOTAutograd side by side: a table of the
# differences (tests/sweep.py; tests/test_sweep.py runs a fixed slice)
SWEEP_JSON ?= sweep.json
sweep: $(STAMP)
	$(BIN)/python tests/sweep.py --ops --modules --impl both --dynamic --json $(SWEEP_JSON)

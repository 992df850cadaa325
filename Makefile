# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser fuzz seed purity clean sweep

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned: 2.13.0 (CPU build) lies on disk; a loose range pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/aotgrad explain

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -x tests

# chromium, for the browser check of tests/test_explain_html.py (skipped without it):
# best effort, as root with network; never fails the build
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "chromium not installed (needs root and network): the browser test will be skipped"

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

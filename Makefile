# One command per job; each creates .venv and installs the pinned requirements on first use.
PY      := .venv/bin/python
TORCHRUN:= .venv/bin/torchrun
STAMP   := .venv/.installed
NPROC   ?= 2
ALGO    ?= icrl
OUT     ?= runs/$(ALGO)
ARGS    ?=

.PHONY: test train eval bench clean

$(STAMP): requirements.txt requirements-test.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The embedded default: tiny Qwen3 on `arithmetic`, 2 CPU processes with gloo (README, "Training").
train: $(STAMP)
	OMP_NUM_THREADS=1 $(TORCHRUN) --standalone --nproc_per_node $(NPROC) icrl.py --algo $(ALGO) --out $(OUT) $(ARGS)

eval: $(STAMP)
	$(PY) eval.py --model $(OUT)/final --task arithmetic --out $(OUT)/eval

# Speed as ratios against a peer run in the same process on the same inputs (README, "Benchmarks").
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/bench_model.py
	OMP_NUM_THREADS=1 $(PY) tests/bench_icrl.py

clean:
	rm -rf .venv runs bench_results .pytest_cache

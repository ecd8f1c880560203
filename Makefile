# One command per job; each creates .venv and installs the pinned requirements on first use.
PY      := .venv/bin/python
TORCHRUN:= .venv/bin/torchrun
STAMP   := .venv/.installed
NPROC   ?= 2
ALGO    ?= icrl
TASK    ?= boxes
ifeq ($(TASK),boxes)
OUT     ?= runs/$(ALGO)
else
OUT     ?= runs/$(TASK)-$(ALGO)
endif
ARGS    ?=

# `make gpu-check` uses the machine's own Python packages (a GPU image's torch and transformers), not .venv.
GPU_PY  ?= python3

.PHONY: test train eval bench compare gpu-check gpu-memory clean

$(STAMP): requirements.txt requirements-test.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The embedded default: tiny Qwen3 on the multi-turn `boxes` (TASK=arithmetic: one turn; guess, gridworld), 2 CPU processes
# with gloo (README, "Training").
train: $(STAMP)
	OMP_NUM_THREADS=1 $(TORCHRUN) --standalone --nproc_per_node $(NPROC) icrl.py --task $(TASK) --algo $(ALGO) --out $(OUT) $(ARGS)

eval: $(STAMP)
	$(PY) eval.py --model $(OUT)/final --task $(TASK) --out $(OUT)/eval

# Speed as ratios against a peer run in the same process on the same inputs (README, "Tests and benchmarks").
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/bench_model.py
	OMP_NUM_THREADS=1 $(PY) tests/bench_icrl.py
	OMP_NUM_THREADS=1 $(PY) tests/bench_turns.py
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) tests/bench_gpu.py --configs 0.6B,4B; else echo "bench: no CUDA GPU, GPU sampler benchmark (tests/bench_gpu.py) skipped"; fi

# On one CUDA GPU, < 8 minutes: tests/test_cuda.py, then the GPU sampler benchmark (README, "Tests and benchmarks").
gpu-check:
	$(GPU_PY) tests/gpu_check.py

# On one CUDA GPU: README's worked memory table measured at Qwen3-4B/8B shapes (tests/memory_gpu.py).
# Apart from gpu-check: figures to quote, not a pass/fail check, and gpu-check's 8 minutes are nearly spent.
gpu-memory:
	$(GPU_PY) tests/memory_gpu.py

# ICRL against GRPO and the ablations over seeds, then a table and curves (README, "Does it work?").
# SEEDS=, VARIANTS= and TASK= narrow it (TASK= only when given: train's default does not apply here);
# STEPS= replaces every task's own RL steps; complete runs are skipped. ICRL_ARGS= / EVAL_ARGS= add
# icrl.py / eval.py flags to every run.
SEEDS   ?= 0 1 2
compare: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/compare.py --seeds $(SEEDS) $(if $(STEPS),--steps $(STEPS)) --nproc $(NPROC) \
		$(if $(VARIANTS),--variants $(VARIANTS)) $(if $(filter-out file undefined,$(origin TASK)),--tasks $(TASK)) \
		$(if $(ICRL_ARGS),--icrl_args='$(ICRL_ARGS)') $(if $(EVAL_ARGS),--eval_args='$(EVAL_ARGS)')

clean:
	rm -rf .venv runs bench_results .pytest_cache

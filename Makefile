# Quick start (fresh machine, no GPU, no network beyond the package registries):
#   make run    # sets up .venv, runs the main job on the embedded default (2 CPU ranks)
#   make test   # sets up .venv, runs the test suite
#   make experiment  # every ablation, baseline and ensemble of the paper on the embedded task
#   make real   # the real experiment: e5-small on MultiEmo, 3 seeds + baselines (docs/results.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
CONFIG ?= configs/default.yaml
ARGS ?=
# The CPU accelerator of DeepSpeed (gloo) unless the caller says otherwise; 1 thread per rank
# (2 ranks on 2 cores: more threads only contend).
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-unit real experiment bench gpu-check lint format clean-shm

$(VENV)/.ready: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing later can pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps -e .
	touch $@

setup: $(VENV)/.ready

run: setup
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) alsace_ds/train.py --config $(CONFIG) $(ARGS); \
	  rc=$$?; $(MAKE) -s clean-shm; exit $$rc

# Real weights and real text built from the package registries (no Hub); SEEDS / REAL_ARGS
# (key=value for every run) / REAL_OUT may be set on the command line.
SEEDS ?= 1 2 3
REAL_OUT ?= runs/real
REAL_ARGS ?=
real: setup
	$(PY) -m alsace_ds.tools.real --seeds $(SEEDS) --out $(REAL_OUT) $(REAL_ARGS); \
	  rc=$$?; $(MAKE) -s clean-shm; exit $$rc

# The paper's whole experiment (every ablation, baseline and ensemble; alsace_ds/experiment.py)
# on the embedded task: EXP_SEEDS x every variant (EXP_VARIANTS), one stage-0 model per seed;
# on 2 CPU cores two 1-rank runs at a time (on GPUs: EXP_JOBS=1 EXP_NPROC=<GPUs>).
EXP_SEEDS ?= 1 2
EXP_VARIANTS ?= all
EXP_OUT ?= runs/experiment
EXP_JOBS ?= 2
EXP_NPROC ?= 1
# The batch of `make run`'s 2 ranks (32 examples per optimizer step) on 1-rank runs too, so
# that the experiment's ALSACE row is the run `make run` makes.
EXP_BASE ?= stage0.global_batch=32 distill.global_batch=32
EXP_ARGS ?=
experiment: setup
	$(PY) -m alsace_ds.experiment --config $(CONFIG) --seeds $(EXP_SEEDS) --variants $(EXP_VARIANTS) \
	  --out $(EXP_OUT) --nproc $(EXP_NPROC) --jobs $(EXP_JOBS) $(EXP_BASE) $(EXP_ARGS); rc=$$?; $(MAKE) -s clean-shm; exit $$rc

# The benchmarks of docs/benchmarks.md (real e5-small; BENCH_ARGS e.g. --model tiny).
BENCH_ARGS ?=
bench: setup
	mkdir -p runs/bench
	for b in distill_throughput selection_bucketing zero_memory limits; do \
	  $(PY) bench/$$b.py --out runs/bench/$$b.json $(BENCH_ARGS) || exit $$?; done; \
	  rc=$$?; $(MAKE) -s clean-shm; exit $$rc

# On a GPU machine (no network, no venv needed): bench/gpu_check.sh; prepare its wheels here
# first with `bench/gpu_check.sh prepare` (bench/README.md, "gpu_check").
GPU_ARGS ?=
gpu-check:
	bench/gpu_check.sh $(GPU_ARGS)

# The whole suite on TEST_WORKERS pytest-xdist workers, a test module per worker at a time
# (its module fixtures run once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
TEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)
test: setup
	$(VENV)/bin/pytest -q $(TEST_XDIST) tests $(ARGS); rc=$$?; $(MAKE) -s clean-shm; exit $$rc

# The fast tier: in-process tests only (no launcher, no Slurm, no download); about a minute.
test-unit: setup
	$(VENV)/bin/pytest -q $(TEST_XDIST) -m unit tests $(ARGS); rc=$$?; $(MAKE) -s clean-shm; \
	  exit $$rc

lint: setup
	$(VENV)/bin/ruff check alsace_ds tests bench && $(VENV)/bin/ruff format --check alsace_ds tests bench

format: setup
	$(VENV)/bin/ruff format alsace_ds tests bench && $(VENV)/bin/ruff check --fix alsace_ds tests bench

# DeepSpeed's CPU shared-memory all-reduce leaves one ~69 MB buffer per rank in /dev/shm
# when started by its launcher; remove those that no live process holds open.
clean-shm:
	@$(PY) -m alsace_ds.tools.shm_cleanup

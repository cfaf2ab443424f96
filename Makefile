# fdsbench — the two commands of the README are `make bench` and `make test`; both set up .venv
# themselves (idempotent: a stamp file skips the install when requirements did not change).
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.fdsbench-installed

METHOD   ?= proto
DATASET  ?= synthetic
DATA_ROOT ?=
# adapter options, space-separated key=value (e.g. DATASET_OPTS=mask_threshold=0 for 0/1 folder masks)
DATASET_OPTS ?=
FOLD     ?= 0
SHOT     ?= 1
RUNS     ?= 1
SEED     ?= 0
DEVICE   ?= cpu
PRESET   ?=
PROTOCOL ?=
WORKDIR  ?= runs
LEADERBOARDS ?= leaderboards
REPORT   ?= $(LEADERBOARDS)/report.html
EPISODES ?= 20
PLUGIN   ?=
FORCE    ?=
TRAIN_DATASET ?=
TRAIN_DATA_ROOT ?=
SCORES   ?= exact
WORKERS  ?= 2
ARGS     ?=

# Nothing in our paths may reach the network (hub checks, font downloads, telemetry).
export FDSBENCH_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

DATASET_OPT_ARGS = $(foreach o,$(DATASET_OPTS),--dataset-opt $(o))
RUN_ARGS = --method $(METHOD) --dataset $(DATASET) --fold $(FOLD) --shot $(SHOT) --runs $(RUNS) --seed $(SEED) \
           --device $(DEVICE) --workdir $(WORKDIR) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(DATASET_OPT_ARGS) \
           $(if $(PRESET),--preset $(PRESET)) $(if $(PROTOCOL),--protocol $(PROTOCOL)) \
           $(if $(PLUGIN),--plugin $(PLUGIN)) $(if $(FORCE),--force) \
           $(if $(TRAIN_DATASET),--train-dataset $(TRAIN_DATASET)) $(if $(TRAIN_DATA_ROOT),--train-data-root $(TRAIN_DATA_ROOT)) \
           --scores $(SCORES) --workers $(WORKERS) $(ARGS)

.PHONY: setup bench fps fps-table test leaderboard report compare episodes bench-metrics clean-runs

setup: $(STAMP)

$(STAMP): requirements.txt requirements-sam2.txt requirements-ultralytics.txt requirements-hed.txt setup.cfg setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-ultralytics.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-hed.txt
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -r requirements-sam2.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

bench: setup
	$(VENV)/bin/fdsbench bench $(RUN_ARGS)

fps: setup
	$(VENV)/bin/fdsbench fps $(RUN_ARGS) --episodes $(EPISODES)

fps-table: setup
	$(VENV)/bin/fdsbench fps-table --device $(DEVICE) --dataset $(DATASET) --fold $(FOLD) --shot $(SHOT) \
	    --workdir $(WORKDIR) --out $(LEADERBOARDS) --presets $(or $(PRESETS),paper) --episodes $(EPISODES) \
	    $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(PLUGIN),--plugin $(PLUGIN)) $(ARGS)

leaderboard: setup
	$(VENV)/bin/fdsbench leaderboard --workdir $(WORKDIR) --out $(LEADERBOARDS)

# one self-contained HTML file (tables, embedded plots, provenance) of every run record in WORKDIR
report: setup
	$(VENV)/bin/fdsbench report --workdir $(WORKDIR) --out $(REPORT)

# paired per-class comparison on shared manifests: make compare A=sofs B=proto (run ids, prefixes or methods)
compare: setup
	$(VENV)/bin/fdsbench compare $(A) $(B) --workdir $(WORKDIR) --out $(LEADERBOARDS)

episodes: setup
	$(VENV)/bin/fdsbench episodes make --dataset $(DATASET) --fold $(FOLD) --shot $(SHOT) --runs $(RUNS) \
	    --seed $(SEED) --workdir $(WORKDIR) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(DATASET_OPT_ARGS) \
	    $(if $(PROTOCOL),--protocol $(PROTOCOL))

bench-metrics: setup
	$(PY) benchmarks/bench_metrics.py $(if $(PIXELS),--pixels $(PIXELS)) $(ARGS)

test: setup
	$(VENV)/bin/pytest -q $(ARGS)

clean-runs:
	rm -rf $(WORKDIR)

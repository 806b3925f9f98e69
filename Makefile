# The two commands a user needs: `make demo` (main job) and `make test` (whole suite). Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run training --config_file bundles/kvasir_seg/train.json

test: $(STAMP)
	$(PY) -m pytest -q

KVASIR_DEV := $(wildcard ../shared/data/kvasir_seg_dev)

# One thread, process CPU time, median and spread of repeats (honest on a shared machine); then the bundles' own
# training loader (kvasir_seg's train#dataloader at 224 px, batch 32; on the Kvasir dev set when it is present).
benchmark: $(STAMP)
	nice $(PY) benchmarks/bench_pmoe.py --device cpu --tiny --threads 1 --repeats 5 --loader none \
		--json benchmarks/results/cpu-tiny.json
	nice $(PY) benchmarks/bundle_loader.py --threads 1 --repeats 5 $(if $(KVASIR_DEV),--data $(KVASIR_DEV)) \
		--json benchmarks/results/loader-cpu.json

clean:
	rm -rf outputs .pytest_cache

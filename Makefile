# The two commands a user needs: `make demo` (main job) and `make test` (whole suite). Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv benchmark gpu-check gpu-check-prep clean

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

# GPU check. Here (network): wheels of MONAI and its pure-Python companions that a torch + timm GPU image lacks, and
# the dev images, into .gpu-check/ (git-ignored; carry it to the GPU machine). There: `make gpu-check` (< 8 min on an
# H200; GPU_CHECK_ARGS=--dry-run runs every step tiny on the CPU). Writes benchmarks/results/gpu-check-<device>.json.
GPU_CHECK_WHEELS := monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pydicom==3.0.2
GPU_CHECK_ARGS ?=
GPU_PY ?= python3

gpu-check-prep: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-check/wheels $(GPU_CHECK_WHEELS)
	mkdir -p .gpu-check/data
	for d in kvasir_seg_dev ham10000_dev pneumoniamnist_dev; do cp -r ../shared/data/$$d .gpu-check/data/; done
	du -sh .gpu-check

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf outputs .pytest_cache

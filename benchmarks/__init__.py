"""Benchmark scripts (run as files, e.g. ``.venv/bin/python benchmarks/int8_cifar.py``)."""

"""Reference model definitions and export helpers for the demo, tests and benchmarks."""

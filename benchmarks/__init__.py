"""Kernel microbenchmarks of flux (pytest-benchmark tests and ``python -m benchmarks.run``)."""

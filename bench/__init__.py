"""Benchmarks: ``python -m bench.<name> [--quick]``. They print tables; they are not tests."""

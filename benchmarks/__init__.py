"""Benchmarks (never part of the test suite); each writes docs/results/<name>.json."""

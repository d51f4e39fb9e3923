"""Benchmarks; each writes docs/results/<name>.json. None runs in the test suite, but two of them hold the fuzz
case generators that tests share (`benchmarks.fuzz`, `benchmarks.hostile`), so a CI-sized test and the full
benchmark send the same cases."""

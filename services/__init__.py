"""Shared runtime pieces of the service tiers: settings, dataset loading, the Redis store, results files, and
the harness (`services.harness`) that tests, benchmarks and the demo start redis-server and the API with.

Nothing here imports torch training code, `model`, or vLLM.
"""

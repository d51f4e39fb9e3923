"""Shared runtime pieces of the service tiers: settings, dataset loading, the Redis store.

Nothing here imports torch training code, `model`, or vLLM.
"""

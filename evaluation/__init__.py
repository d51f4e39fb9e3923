"""Evaluation commands above the models: every quality number's entry point.

`python -m evaluation mostpop|onerec|think|think-ahead` (one command for each mode of the protocol in
`model.metrics`), `evaluation.think_ahead` (the served think-ahead policy measured on stale entries)
and `evaluation.tune` (the policy's completion knobs chosen on validation). This package may read Redis
(through `services.store`); the model layer below it never does.
"""

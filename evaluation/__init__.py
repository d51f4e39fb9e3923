"""Evaluation commands above the models: every quality number's entry point, ``python -m evaluation COMMAND``.

One module per command (`__main__` lists them): `mostpop`, `onerec` (``onerec`` and ``onerec-variants``),
`think` (OneRec-Think ``run`` / ``ablation`` / ``recipe`` / ``vllm-check``), `think_ahead` (the served
think-ahead policy measured on stale entries), `prefix_recall`, `repeats` (the consumed-item rule) and
`tune` (the policy's completion knobs chosen on validation). The metrics and the recommenders they run
are in the model layer (`model.metrics`, `model.onerec`, `model.think.recommender`). This package may
read Redis (through `services.store`); the model layer below it never does.
"""

"""OneRec-Think: an LLM with itemic tokens in its vocabulary, trained in three stages (read it in this order).

- `tokens`: the itemic tokens (``<a_N>``.., item and think markers) added to a tokenizer, `TokenMap`;
- `checkpoint`: a OneRec-Think folder (HF folder + ``itemic.json``): `save_think`, `load_think`, `read_itemic`;
- `base_model`: the tiny Qwen3 built here (`build_tiny_base`) or any local HF LM (`extend_base_model`);
- `align_data`: prompt formats and the Itemic Alignment tasks (persona, sequence, caption, LM text);
- `activate_data`: Reasoning Activation data: pruned contexts, teachers, rationales, RL cases;
- `enhance`: Reasoning Enhancement: GRPO with the Rollout-Beam reward;
- `sft`: training rows and the resumable supervised step loop; `fit`: the epoch recipe of the align stage
  (item head, validation each epoch, selection / refit); `itemhead`: the whole-item head;
- `stages`: the four stage runners (base, align, activate, enhance); `__main__`: ``python -m model.think``;
- `decode`: batched prefill, reasoning and trie-constrained code beams with a KV cache;
- `recommender`: `ThinkRecommender`, the model as a recommender (beside `model.onerec.OneRecRecommender`).
The schedule, step log and seeding are shared with OneRec (`model.training`). Evaluation commands live in
`evaluation` (``python -m evaluation think``); nothing here reads Redis or HTTP.
"""

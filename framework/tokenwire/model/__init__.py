"""The model frontend: what every engine gets for free.

* :mod:`tokenwire.model.frontend` — chat template, tokens, bounds against the
  context, incremental detokenizing, stop strings (:class:`EngineFrontend`), and
  the pass-through for text backends (:class:`TextFrontend`);
* :mod:`tokenwire.model.tokenizers` — the model's own tokenizer (transformers,
  GGUF) and the byte tokenizer of tests and byte engines.
"""

"""Model: config, projectors, the composite VLM, processor, builders, trainable parts, model card.

Importing :mod:`medvlm.model.modeling` or :mod:`medvlm.model.build` registers ``model_type="medvlm"``
with transformers' Auto classes (locally; no remote code).
"""

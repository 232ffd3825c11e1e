"""Training: the LLaVA-Med curriculum (stage 1 ``align``, stage 2 ``sft``) on the HF Trainer + accelerate.

Entry points: :func:`medvlm.train.config.load_config` (YAML + ``--key value`` overrides ->
:class:`~medvlm.train.config.TrainConfig`) and :func:`medvlm.train.run.run_training`.
"""

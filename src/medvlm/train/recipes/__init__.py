"""One linear recipe per (stage, distributed) pair; :mod:`medvlm.train.run` picks one from its table.

Every recipe module has ``run(cfg, family, callbacks) -> TrainResult`` and is written top to bottom over the
shared setup / teardown of :mod:`medvlm.train.setup`. Recipes never import each other or :mod:`medvlm.train.run`
(a test enforces it): what two recipes share lives in a shared module (``setup``, ``self_training``,
``preference``, ``manual_loop``, ``family_stage``, ``stages``, ``trainer``).
"""

"""Recipe ``align`` / ``sft`` on the HF Trainer, for the native model and model families.

Order: setup (:func:`medvlm.train.setup.start_run`) -> stage check before any data is read -> data (indexed,
checked, mixed) -> stage (freezing / adapters) -> feature cache (native, frozen tower) -> ``MedVLMTrainer`` ->
teardown (:func:`medvlm.train.setup.finish_trainer`: final checkpoint in ``output_dir`` with the config, data
manifest, processor and model card; loss curve). Under ``torchrun`` / ``accelerate launch`` every rank runs it.
"""

from __future__ import annotations

from pathlib import Path

from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import DATA_MANIFEST_FILE, TRAIN_CONFIG_FILE


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train ``align`` / ``sft``; returns a :class:`~medvlm.train.setup.TrainResult`."""
    from medvlm.train.callbacks import RunArtifactsCallback
    from medvlm.train.setup import (
        build_training_args,
        finish_trainer,
        load_sft_data,
        start_run,
        train_resumable,
        use_feature_cache,
    )
    from medvlm.train.trainer import MedVLMTrainer, TrainCollator

    if family is not None:
        from medvlm.train.family_stage import family_plan

        family_plan(cfg)  # contradictions in the tune_* keys fail before loading
    start = start_run(cfg, family)
    if family is None:
        from medvlm.train.stages import apply_stage, plan_stage

        early = plan_stage(cfg, start.model.config)  # validate the stage before reading any data
        use_feature_cache(cfg, early.vision_tower or early.vit_lora)  # feature_cache: on with a training tower
    dataset, manifest = load_sft_data(cfg, start)
    cache, row_masked, loss_func = None, set(), None
    if family is None:
        model, plan, row_masked = apply_stage(start.model, cfg)
        if use_feature_cache(cfg, plan.vision_tower or plan.vit_lora) and manifest.image_samples:
            from medvlm.train.feature_cache import FeatureCache, cache_settings, default_cache_root

            vlm = model.get_base_model() if plan.lora or plan.vit_lora else model
            dtype = next(vlm.vision_tower.parameters()).dtype
            cache = FeatureCache(
                cfg.feature_cache_dir or default_cache_root(), cache_settings(vlm, start.train_proc, dtype)
            )
            dataset.feature_cache = cache
        collator = TrainCollator(start.train_proc.pad_token_id, cfg.max_length if cfg.packing else None)
        title = f"{cfg.stage}: {Path(cfg.output_dir).name}"
    else:
        from medvlm.train.family_stage import apply_family_stage, family_lm_loss

        model, _ = apply_family_stage(start.model, start.processor.spec, cfg)
        from medvlm.train.family_loss import family_collator

        loss_func = family_lm_loss
        # labelled-positions head: the batch carries logits_to_keep, family_lm_loss takes the flattened rows
        collator = family_collator(start.processor.collator("right"), cfg.labelled_logits_only)
        title = f"{cfg.stage} ({family}): {Path(cfg.output_dir).name}"
    # Text-only batches leave the projector without gradients on that rank: DDP must tolerate it.
    find_unused = start.world > 1 and manifest.text_samples > 0 and manifest.image_samples > 0
    args = build_training_args(cfg, start.accumulation, find_unused)
    config_yaml = cfg.to_yaml()
    manifest_dict = manifest.to_dict()
    trainer = MedVLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=start.processor if family is None else start.processor.processor,
        callbacks=[RunArtifactsCallback(config_yaml, manifest_dict, title), *(callbacks or [])],
        lengths=dataset.lengths,
        group_by_modality_length=cfg.group_by_modality_length,
        projector_lr=cfg.projector_lr,
        row_masked=row_masked,
        feature_cache=cache,
        # the native model's own labelled-only head; a family's goes through its collator (above)
        labelled_logits_only=cfg.labelled_logits_only and family is None,
        compute_loss_func=loss_func,  # a family's loss: normalised by the global batch's learned tokens
    )
    out = train_resumable(trainer, start)
    return finish_trainer(
        cfg,
        start,
        trainer,
        out,
        {TRAIN_CONFIG_FILE: config_yaml, DATA_MANIFEST_FILE: manifest_dict},
        title,
        manifest_dict,
        cache_stats=dict(trainer.cache_stats),
        cache_by_epoch=dict(trainer.cache_by_epoch),
    )

"""Recipe ``sq``: STLLaVA-Med's self-questioning instruction tuning, for the native model and model families.

Order: checks -> setup (:func:`medvlm.train.setup.start_run`) -> the template must learn VUSER turns -> data
(the ``sft`` index; each epoch's VUSER conversions drawn when a sample is loaded) -> LM-LoRA / ViT-LoRA /
connector (:mod:`medvlm.train.self_training`, :mod:`medvlm.train.family_stage`) -> ``SelfTrainingTrainer``
(three learning rates) -> teardown (adapters merged, kept in ``adapter/``).
"""

from __future__ import annotations

from pathlib import Path

from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import DATA_MANIFEST_FILE, TRAIN_CONFIG_FILE


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train stage ``sq``; returns a :class:`~medvlm.train.setup.TrainResult`."""
    from medvlm.train.callbacks import RunArtifactsCallback
    from medvlm.train.self_training import (
        EpochCallback,
        SelfQuestioningDataset,
        SelfTrainingTrainer,
        apply_self_training_stage,
        check_self_training,
        check_sq_template,
        part_of,
    )
    from medvlm.train.setup import build_training_args, finish_trainer, load_sft_data, start_run, train_resumable
    from medvlm.train.trainer import TrainCollator

    check_self_training(cfg)
    if family is not None:
        from medvlm.train.family_stage import family_plan

        family_plan(cfg)
    start = start_run(cfg, family)
    check_sq_template(start.model, start.processor, family)
    base, manifest = load_sft_data(cfg, start)
    dataset = SelfQuestioningDataset(base, cfg.sq_r, cfg.seed)
    if family is None:
        model = apply_self_training_stage(start.model, cfg)
        collator, part, loss_func = TrainCollator(start.train_proc.pad_token_id), part_of, None
        title = f"sq: {Path(cfg.output_dir).name}"
    else:
        from medvlm.train.family_stage import apply_family_stage, family_lm_loss, family_part_of

        model, _ = apply_family_stage(start.model, start.processor.spec, cfg)
        loss_func = family_lm_loss
        from medvlm.train.family_loss import family_collator

        collator = family_collator(start.processor.collator("right"), cfg.labelled_logits_only)
        part = family_part_of(start.processor.spec)
        title = f"sq ({family}): {Path(cfg.output_dir).name}"
    find_unused = start.world > 1 and manifest.text_samples > 0 and manifest.image_samples > 0
    args = build_training_args(cfg, start.accumulation, find_unused)
    config_yaml = cfg.to_yaml()
    manifest_dict = manifest.to_dict()
    trainer = SelfTrainingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=start.processor if family is None else start.processor.processor,
        callbacks=[RunArtifactsCallback(config_yaml, manifest_dict, title), EpochCallback(dataset), *(callbacks or [])],
        lengths=dataset.lengths,
        group_by_modality_length=cfg.group_by_modality_length,
        projector_lr=cfg.projector_lr,
        vision_lr=cfg.vision_lr,
        vit_lora_grad=cfg.vit_lora_grad,
        part=part,
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
    )

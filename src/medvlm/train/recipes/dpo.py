"""Recipe ``dpo``: STLLaVA-Med's DPO on preference pairs, for the native model and model families.

Order: checks -> setup (:func:`medvlm.train.setup.start_run`) -> preference pairs read, checked and encoded ->
the frozen reference: its log-probs stored once (``ref_logps``, :mod:`medvlm.train.dpo_ref`; the reference is
then never kept for training) or the reference model itself -> LM-LoRA / ViT-LoRA / connector as in ``sq`` ->
``DPOTrainer`` (:mod:`medvlm.train.preference`) -> teardown (adapters merged, kept in ``adapter/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import DATA_MANIFEST_FILE, TRAIN_CONFIG_FILE


def check_dpo(cfg: TrainConfig) -> None:
    """DPO-specific checks (a MedvlmError naming the key)."""
    from medvlm.train.preference import REF_VISUAL_PATHS

    if cfg.ref_visual_path not in REF_VISUAL_PATHS:
        raise MedvlmError(
            f"ref_visual_path: unknown value {cfg.ref_visual_path!r}; choose one of {', '.join(REF_VISUAL_PATHS)}"
        )
    if cfg.dpo_beta <= 0:
        raise MedvlmError(f"dpo_beta must be > 0, got {cfg.dpo_beta}")
    if cfg.dpo_rpo_alpha is not None and cfg.dpo_rpo_alpha < 0:
        raise MedvlmError(f"dpo_rpo_alpha must be >= 0 (or null for plain DPO), got {cfg.dpo_rpo_alpha}")
    if cfg.ref_logps and cfg.ref_visual_path == "policy":
        raise MedvlmError(
            "ref_logps cannot be precomputed with ref_visual_path: policy (the policy's visual path changes "
            "while training); use ref_visual_path: frozen or drop ref_logps"
        )
    if not cfg.model_name_or_path:
        raise MedvlmError("stage 'dpo' starts from a stage-1 checkpoint: set model_name_or_path")
    if any(s.weight != 1.0 for s in cfg.sources()):
        raise MedvlmError("stage 'dpo' uses every preference pair once per epoch; data_path weights are not supported")


@dataclass
class DPORun:
    """Everything a DPO run trains with (:func:`prepare_dpo`), before ``trainer.train()``."""

    trainer: Any
    """The :class:`medvlm.train.preference.DPOTrainer`."""
    start: Any
    """The run's :class:`medvlm.train.setup.RunStart`."""
    dataset: Any
    """The :class:`medvlm.train.preference.PreferenceDataset`."""
    report: Any
    """The :class:`medvlm.train.preference.PairReport`."""
    config_yaml: str
    manifest: dict
    title: str

    @property
    def processor(self) -> Any:
        """The processor saved with the final checkpoint."""
        return self.start.processor


def prepare_dpo(cfg: TrainConfig, callbacks: list | None = None, family: str | None = None) -> DPORun:
    """Load policy and reference, read and encode the pairs, reference log-probs, the trainer."""
    from medvlm.train.callbacks import RunArtifactsCallback
    from medvlm.train.dpo_ref import ensure_ref_logps
    from medvlm.train.preference import DPOTrainer, build_preference_dataset
    from medvlm.train.self_training import apply_self_training_stage, check_self_training, part_of
    from medvlm.train.setup import build_training_args, start_run

    check_self_training(cfg)
    check_dpo(cfg)
    if family is not None:
        from medvlm.model.families.io import load_family
        from medvlm.train.family_stage import family_plan

        family_plan(cfg)

        def load_reference():
            return load_family(cfg.model_name_or_path)[0]
    else:
        from medvlm.model.build import load_pretrained

        def load_reference():
            return load_pretrained(cfg.model_name_or_path)[0]

    start = start_run(cfg, family)
    dataset, report = build_preference_dataset(
        [s.path for s in cfg.sources()], start.train_proc, cfg.image_folder, cfg.max_length, cfg.data_format
    )
    ref_model = None
    if cfg.ref_logps:  # the stored values are the reference: the model is loaded only to compute them
        dataset.ref_logps = ensure_ref_logps(cfg, load_reference, dataset)
    else:
        ref_model = load_reference()
    if family is None:
        model = apply_self_training_stage(start.model, cfg)
        part, template = part_of, start.train_proc.template
        title = f"dpo: {Path(cfg.output_dir).name}"
    else:
        from medvlm.train.family_stage import apply_family_stage, family_part_of

        model, _ = apply_family_stage(start.model, start.processor.spec, cfg)
        part, template = family_part_of(start.processor.spec), start.processor.template
        title = f"dpo ({family}): {Path(cfg.output_dir).name}"
    args = build_training_args(
        cfg, start.accumulation, find_unused=start.world > 1 and 0 < report.image_pairs < report.pairs
    )
    manifest = {
        "preference_files": report.files,
        "pairs": report.pairs,
        "image_pairs": report.image_pairs,
        "dropped": report.dropped,
        "template": template,
        "max_length": cfg.max_length,
    }
    config_yaml = cfg.to_yaml()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=dataset.collator(),
        processing_class=start.processor if family is None else start.processor.processor,
        callbacks=[RunArtifactsCallback(config_yaml, manifest, title), *(callbacks or [])],
        lengths=dataset.lengths,
        group_by_modality_length=cfg.group_by_modality_length,
        projector_lr=cfg.projector_lr,
        vision_lr=cfg.vision_lr,
        vit_lora_grad=cfg.vit_lora_grad,
        part=part,
        ref_model=ref_model,
        beta=cfg.dpo_beta,
        ref_visual_path=cfg.ref_visual_path,
        rpo_alpha=cfg.dpo_rpo_alpha,
    )
    return DPORun(trainer, start, dataset, report, config_yaml, manifest, title)


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train stage ``dpo``; returns a :class:`~medvlm.train.setup.TrainResult` (its log history has the DPO metrics)."""
    from medvlm.train.setup import finish_trainer, train_resumable

    job = prepare_dpo(cfg, callbacks, family)
    out = train_resumable(job.trainer, job.start)
    return finish_trainer(
        cfg,
        job.start,
        job.trainer,
        out,
        {TRAIN_CONFIG_FILE: job.config_yaml, DATA_MANIFEST_FILE: job.manifest},
        job.title,
        job.manifest,
    )

"""``run_training(config) -> TrainResult``: pick the recipe of ``(stage, distributed)`` and run it.

The table :data:`RECIPES` is the whole dispatch: a pair that is not in it is refused with one clear error
before any work. Each recipe (:mod:`medvlm.train.recipes`) is one readable, linear run over the shared setup
and teardown (:mod:`medvlm.train.setup`), for the native model and model families (a family checkpoint's
options are checked by :func:`medvlm.train.family_stage.check_family_config` first). Under
``torchrun`` / ``accelerate launch`` the same code runs on every rank.
"""

from __future__ import annotations

import importlib

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig
from medvlm.train.setup import TrainResult, resolve_accumulation, world_size

__all__ = ["RECIPES", "TrainResult", "recipe_for", "resolve_accumulation", "run_training", "world_size"]

RECIPES: dict[tuple[str, str], str] = {
    ("align", "auto"): "sft",
    ("sft", "auto"): "sft",
    ("sq", "auto"): "sq",
    ("dpo", "auto"): "dpo",
    ("vision", "auto"): "vision",
    ("align", "fsdp2_cpu"): "fsdp2_cpu",
    ("sft", "fsdp2_cpu"): "fsdp2_cpu",
    ("align", "deepspeed_cpu"): "deepspeed_cpu",
    ("sft", "deepspeed_cpu"): "deepspeed_cpu",
}
"""``(stage, distributed) -> recipe module`` in :mod:`medvlm.train.recipes`. ``auto`` = the HF Trainer (one
process, or DDP / FSDP / DeepSpeed through ``accelerate launch`` on GPUs; stage ``vision`` runs its own one-process
loop)."""


def recipe_for(cfg: TrainConfig) -> str:
    """The recipe module name of the run's ``(stage, distributed)``; a MedvlmError listing the supported pairs."""
    key = (cfg.stage, cfg.distributed)
    if key not in RECIPES:
        supported = ", ".join(f"{s}/{d}" for s, d in RECIPES)
        others = [d for s, d in RECIPES if s == cfg.stage]
        hint = f" (stage {cfg.stage!r} runs with distributed: {' or '.join(others)})" if others else ""
        raise MedvlmError(
            f"stage {cfg.stage!r} with distributed: {cfg.distributed} is not supported{hint}; "
            f"supported stage/distributed pairs: {supported}"
        )
    return RECIPES[key]


def run_training(cfg: TrainConfig, callbacks: list | None = None, *, evaluated_by_caller: bool = False) -> TrainResult:
    """Train as configured; returns the output folder, final loss, log history, steps and seconds.

    ``callbacks`` are extra ``transformers.TrainerCallback`` s (progress hooks of a caller such as the demo).
    Defaults left None (tower / LM training, learning rate, grouping, augmentation) are resolved first
    (:func:`medvlm.train.stages.resolve_stage_defaults`) and written back to ``cfg``; epochs from the data size.
    ``eval_data_path`` is evaluated by the layer above (:func:`medvlm.eval.train_eval.train_and_evaluate`, which
    passes ``evaluated_by_caller``); called alone with it set, this refuses rather than ignore it.
    """
    from medvlm.train.family_stage import check_family_config, start_family
    from medvlm.train.stages import resolve_stage_defaults

    name = recipe_for(cfg)  # before the per-key checks: a pair not in the table gets this one error
    cfg.validate()
    if cfg.eval_data_path and not evaluated_by_caller:
        raise MedvlmError(
            "eval_data_path is evaluated after training by `medvlm train` or "
            "medvlm.eval.train_eval.train_and_evaluate(cfg); run_training alone does not evaluate"
        )
    resolve_stage_defaults(cfg)  # idempotent: load_config did it already for configs read from YAML / the CLI
    family = start_family(cfg)  # a transformers model family (medvlm.model.families), or None for the native model
    if family is not None:
        check_family_config(cfg, family)
    recipe = importlib.import_module(f"medvlm.train.recipes.{name}")
    return recipe.run(cfg, family, callbacks)

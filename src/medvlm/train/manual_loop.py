"""The Trainer-equivalent training loop of the CPU multi-process recipes (``fsdp2_cpu``, ``deepspeed_cpu``).

accelerate cannot run FSDP or DeepSpeed on CPU, so those two recipes (:mod:`medvlm.train.recipes.fsdp2_cpu`,
:mod:`medvlm.train.recipes.deepspeed_cpu`) drive this loop: the same model, data, sampler, parameter groups,
scheduler, clipping and token-level loss normalisation as the Trainer. The two recipes differ only in how a
micro-batch's loss is back-propagated and how the optimizer steps, which each supplies as a
:class:`StepStrategy` (``FSDPStep`` / ``DeepSpeedStep``). Setup and teardown are :mod:`medvlm.train.setup`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from medvlm.train.config import TrainConfig
from medvlm.train.shared_image import model_mask
from medvlm.utils.artifacts import DATA_MANIFEST_FILE, TRAIN_CONFIG_FILE, TRAIN_LOG_FILE


def local_batches(
    dataset, collate, chunk: list[int], micro: int, world: int, rank: int, accumulation: int
) -> list[dict]:
    """This rank's micro-batches of one optimizer step.

    Global micro-batch ``j`` of the step is ``chunk[j*micro*world:(j+1)*micro*world]`` and rank ``r`` takes its
    ``r``-th slice, as accelerate's batch sharding does for the Trainer (same samples per step at any world size).
    """
    return [
        collate([dataset[i] for i in chunk[(j * world + rank) * micro : (j * world + rank + 1) * micro]])
        for j in range(accumulation)
    ]


def learned_tokens(batches: list[dict]) -> int:
    """Learned (shifted) label positions of micro-batches: the Trainer's ``num_items_in_batch`` on this rank."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def forward_loss(
    model, batch: dict, n_items: torch.Tensor, labelled_logits_only: bool = False, family: bool = False
) -> torch.Tensor:
    """Micro-batch CE sum / ``n_items`` (padded or packed batch; no KV cache in training); with
    ``labelled_logits_only`` the LM head runs at labelled positions only (same loss). A ``family`` model gets every
    tensor of its batch (image grids, per-token types) and its loss is computed from the logits."""
    if family:
        from medvlm.train.family_stage import family_lm_loss

        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        return family_lm_loss(model(**inputs, use_cache=False), batch["labels"], n_items)
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")
    batch = {**batch, "attention_mask": model_mask(batch.get("attention_mask"), model)}
    out = model(
        **{k: batch[k] for k in keys if batch.get(k) is not None},
        use_cache=False,
        num_items_in_batch=n_items,
        labelled_logits_only=labelled_logits_only,
    )
    return out.loss


@dataclass
class ManualRun:
    """What the FSDP2 and DeepSpeed CPU loops build identically from the config (see :func:`prepare_manual_run`)."""

    start: Any
    """The run's :class:`medvlm.train.setup.RunStart` (start time, processor saved with the checkpoint, family)."""
    model_class: type
    """The model's class before sharding / wrapping (the gathered weights are loaded into a fresh one)."""
    model: nn.Module
    """The staged model in train mode, not yet sharded or wrapped."""
    processor: Any
    """The start processor (saved with the final checkpoint)."""
    dataset: Any
    """The tokenised training dataset (``.lengths`` feeds the sampler)."""
    manifest: Any
    """The data manifest (saved with the checkpoint, returned in the result)."""
    row_masked: Any
    """Embedding rows masked by the stage (input to :func:`medvlm.train.optim.param_groups`)."""
    collate: Any
    """The Trainer's collator (padding or packing)."""
    sampler: Any
    """The modality/length-grouped sampler over global micro-batches."""
    world: int
    """Number of ranks."""
    rank: int
    """This process's rank."""
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    micro: int
    """Per-rank micro-batch size."""
    steps_per_epoch: int
    """Optimizer steps per pass over the data."""
    total: int
    """Optimizer steps of the run (``max_steps`` or epochs x ``steps_per_epoch``)."""
    out_dir: Path
    """Output directory (created on rank 0)."""


def prepare_manual_run(cfg: TrainConfig, world: int, rank: int, family: str | None = None) -> ManualRun:
    """Seed, load the start model, build the data, apply the stage and size the schedule, as the Trainer path does.

    Call after the process group is up; every rank builds the same (unsharded) model.
    """
    from medvlm.train.sampler import ModalityLengthGroupedSampler
    from medvlm.train.setup import load_sft_data, start_run
    from medvlm.train.stages import apply_stage
    from medvlm.train.trainer import TrainCollator

    start = start_run(cfg, family, world=world, resume=False)
    dataset, manifest = load_sft_data(cfg, start)
    if family is None:
        model, _, row_masked = apply_stage(start.model, cfg)
        collate = TrainCollator(start.train_proc.pad_token_id, cfg.max_length if cfg.packing else None)
    else:
        from medvlm.train.family_stage import apply_family_stage

        model, _ = apply_family_stage(start.model, start.processor.spec, cfg)
        from medvlm.train.family_loss import family_collator

        row_masked, collate = set(), family_collator(start.processor.collator("right"), cfg.labelled_logits_only)
    model.train()
    micro, accumulation = cfg.per_device_train_batch_size, start.accumulation
    steps_per_epoch = max(1, len(dataset) // (micro * world) // accumulation)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    sampler = ModalityLengthGroupedSampler(
        dataset.lengths, micro * world, accumulation, cfg.seed, cfg.group_by_modality_length
    )
    out_dir = Path(cfg.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    return ManualRun(
        start,
        type(model),
        model,
        start.processor,
        dataset,
        manifest,
        row_masked,
        collate,
        sampler,
        world,
        rank,
        accumulation,
        micro,
        steps_per_epoch,
        total,
        out_dir,
    )


def build_adamw(cfg: TrainConfig, model: nn.Module, row_masked) -> torch.optim.AdamW:
    """The Trainer's AdamW over medvlm's parameter groups (decay / no-decay / projector lr)."""
    from medvlm.train.optim import param_groups, to_torch_groups

    return torch.optim.AdamW(
        to_torch_groups(param_groups(model, cfg.weight_decay, cfg.projector_lr, row_masked)),
        lr=cfg.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int):
    """The Trainer's learning-rate schedule (``lr_scheduler_type``, ``warmup_ratio``) over ``total`` steps."""
    from transformers import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler_type, opt, num_warmup_steps=math.ceil(total * cfg.warmup_ratio), num_training_steps=total
    )


class StepStrategy(Protocol):
    """What differs between the sharded CPU loops: back-propagation and the optimizer step."""

    model: nn.Module
    """The module called for the forward pass (FSDP-sharded model or DeepSpeed engine)."""

    def micro_step(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (CE sum / global learned tokens)."""

    def optimizer_step(self) -> None:
        """After all micro-batches of a step: clip, step optimizer and scheduler,
        zero gradients (if not done already)."""

    def grad_norm(self) -> float | None:
        """The pre-clipping global gradient norm of the last step (collective: every rank calls it)."""

    def last_lr(self) -> float:
        """The learning rate of the first parameter group after the last step."""


def manual_train_loop(cfg: TrainConfig, run: ManualRun, strategy: StepStrategy) -> tuple[list[dict[str, Any]], int]:
    """The Trainer-equivalent loop of the sharded CPU paths; returns (logged rows, steps done).

    Each optimizer step takes this rank's slice of the sampler's global batch, divides every micro-batch's CE
    sum by the learned tokens of the whole global batch (all-reduced), back-propagates it with ``strategy``
    and steps; the logged loss is the all-reduced global token-mean, averaged over ``logging_steps``.
    Rows go to ``TRAIN_LOG_FILE`` on rank 0.
    """
    import torch.distributed as dist

    from medvlm.utils.io import append_jsonl

    micro, world, rank, accumulation = run.micro, run.world, run.rank, run.accumulation
    per_step = micro * world * accumulation
    steps_per_epoch, total = run.steps_per_epoch, run.total
    history: list[dict[str, Any]] = []
    step, epoch, window = 0, 0, []
    while step < total:
        run.sampler.set_epoch(epoch)
        order = list(run.sampler)[: steps_per_epoch * per_step]
        for s in range(steps_per_epoch):
            if step >= total:
                break
            chunk = order[s * per_step : (s + 1) * per_step]
            batches = local_batches(run.dataset, run.collate, chunk, micro, world, rank, accumulation)
            n_items = torch.tensor(float(learned_tokens(batches)))
            dist.all_reduce(n_items)  # learned tokens of the whole global batch (Trainer: num_items_in_batch)
            loss_sum = torch.zeros(())
            for b in batches:
                # this micro-batch's CE sum / global tokens
                loss = forward_loss(strategy.model, b, n_items, cfg.labelled_logits_only, run.start.family is not None)
                strategy.micro_step(loss)
                loss_sum += loss.detach()
            strategy.optimizer_step()
            dist.all_reduce(loss_sum)  # the global token-mean loss of the step
            step += 1
            window.append(float(loss_sum))
            if step % cfg.logging_steps == 0 or step == total:
                row = {
                    "loss": sum(window) / len(window),
                    "grad_norm": strategy.grad_norm(),
                    "learning_rate": strategy.last_lr(),
                    "epoch": epoch + (s + 1) / steps_per_epoch,
                    "step": step,
                }
                history.append(row)
                window = []
                if rank == 0:
                    print(f"step {step}/{total} loss {row['loss']:.4f} lr {row['learning_rate']:.3g}", flush=True)
                    append_jsonl(run.out_dir / TRAIN_LOG_FILE, row)
        epoch += 1
    return history, step


def finish_manual_run(
    cfg: TrainConfig,
    run: ManualRun,
    config,
    full: dict[str, torch.Tensor] | None,
    history: list[dict[str, Any]],
    steps: int,
    shards: dict[str, Any],
    label: str,
):
    """Rank 0 loads the gathered ``full`` state dict into a plain model; :func:`medvlm.train.setup.finish_run` saves it.

    ``config`` is the model config; ``label`` names the path in the plot title. Returns a ``TrainResult``.
    """
    from medvlm.train.setup import finish_run

    plain = None
    if run.rank == 0:
        plain = run.model_class(config)
        plain.load_state_dict(full)
    manifest = run.manifest.to_dict()
    return finish_run(
        cfg,
        run.start,
        main=run.rank == 0,
        model=plain,
        extra_files={TRAIN_CONFIG_FILE: cfg.to_yaml(), DATA_MANIFEST_FILE: manifest},
        title=f"{cfg.stage} ({label}): {run.out_dir.name}",
        history=history,
        steps=steps,
        manifest=manifest,
        shards=shards,
    )

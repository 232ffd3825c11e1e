"""Sharded training on CPU clusters with PyTorch FSDP2 (``fully_shard``), launched by ``torchrun``.

On GPUs the standard path is the HF Trainer under ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` (FSDP2, auto-wrapping the layer classes named by the model's
``_no_split_modules``). accelerate refuses FSDP on CPU (it silently falls back to DDP), so
``distributed: fsdp2_cpu`` runs this loop instead: the same model, data, sampler, parameter groups,
scheduler, clipping and token-level loss normalisation as the Trainer, with every decoder and
vision-encoder layer and then the whole model sharded over a gloo process group. Parameters are
``DTensor`` shards (each rank holds 1/world of every sharded tensor); the final checkpoint is
gathered as a full state dict on rank 0. Scope: ``tune: full``, no feature cache, no mid-run resume
(use the Trainer path for those).

The loop itself (:func:`manual_train_loop`) is shared with ``distributed: deepspeed_cpu``; the two
paths differ only in how a micro-batch's loss is back-propagated and how the optimizer steps, which
each supplies as a :class:`StepStrategy` (:class:`FSDPStep` here, ``DeepSpeedStep`` in
``medvlm.train.deepspeed_cpu``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig


def shard_model(model: nn.Module, mesh) -> list[str]:
    """``fully_shard`` every layer whose class is in ``model._no_split_modules``, then the root; returns the classes."""
    from torch.distributed.fsdp import fully_shard

    classes = set(model._no_split_modules or [])
    wrapped = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in classes})
    for m in list(model.modules()):
        if type(m).__name__ in classes:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return wrapped


def shard_report(model: nn.Module) -> dict[str, Any]:
    """Per parameter: local shard shape vs global shape, and a checksum of the local shard."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            out[name] = {"local": list(local.shape), "global": list(p.shape), "sum": float(local.double().sum())}
    return out


def local_batches(dataset, collate, chunk: list[int], micro: int, world: int, rank: int, accumulation: int) -> list[dict]:
    """This rank's micro-batches of one optimizer step.

    Global micro-batch ``j`` of the step is ``chunk[j*micro*world:(j+1)*micro*world]`` and rank ``r`` takes its
    ``r``-th slice, as accelerate's batch sharding does for the Trainer (same samples per step at any world size).
    """
    return [collate([dataset[i] for i in chunk[(j * world + rank) * micro:(j * world + rank + 1) * micro]])
            for j in range(accumulation)]


def learned_tokens(batches: list[dict]) -> int:
    """Learned (shifted) label positions of micro-batches: the Trainer's ``num_items_in_batch`` on this rank."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def forward_loss(model, batch: dict, n_items: torch.Tensor, labelled_logits_only: bool = False) -> torch.Tensor:
    """Micro-batch CE sum / ``n_items`` (padded or packed batch; no KV cache in training); with
    ``labelled_logits_only`` the LM head runs at labelled positions only (same loss)."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")
    out = model(**{k: batch[k] for k in keys if batch.get(k) is not None}, use_cache=False, num_items_in_batch=n_items,
                labelled_logits_only=labelled_logits_only)
    return out.loss


@dataclass
class ManualRun:
    """What the FSDP2 and DeepSpeed CPU loops build identically from the config (see :func:`prepare_manual_run`)."""

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


def prepare_manual_run(cfg: TrainConfig, world: int, rank: int) -> ManualRun:
    """Seed, load the start model, build the data, apply the stage and size the schedule, as the Trainer path does.

    Call after the process group is up; every rank builds the same (unsharded) model.
    """
    from transformers import set_seed

    from medvlm.train.checkpoint import load_start
    from medvlm.train.data import build_dataset, grouped_sources
    from medvlm.train.run import resolve_accumulation, training_processor
    from medvlm.train.sampler import ModalityLengthGroupedSampler
    from medvlm.train.stages import apply_stage, resolve_epochs
    from medvlm.train.trainer import TrainCollator

    accumulation = resolve_accumulation(cfg, world)
    set_seed(cfg.seed)
    model, processor = load_start(cfg)
    train_proc = training_processor(cfg, model, processor)
    dataset, manifest = build_dataset(
        grouped_sources(cfg), train_proc, image_folder=cfg.image_folder, max_length=cfg.max_length,
        data_format=cfg.data_format, skip_missing_images=cfg.skip_missing_images, seed=cfg.seed,
    )
    resolve_epochs(cfg, len(dataset))
    model, _, row_masked = apply_stage(model, cfg)
    model.train()
    micro = cfg.per_device_train_batch_size
    steps_per_epoch = max(1, len(dataset) // (micro * world) // accumulation)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    sampler = ModalityLengthGroupedSampler(dataset.lengths, micro * world, accumulation, cfg.seed,
                                           cfg.group_by_modality_length)
    collate = TrainCollator(train_proc.pad_token_id, cfg.max_length if cfg.packing else None)
    out_dir = Path(cfg.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    return ManualRun(model, processor, dataset, manifest, row_masked, collate, sampler, world, rank, accumulation,
                     micro, steps_per_epoch, total, out_dir)


def build_adamw(cfg: TrainConfig, model: nn.Module, row_masked) -> torch.optim.AdamW:
    """The Trainer's AdamW over medvlm's parameter groups (decay / no-decay / projector lr)."""
    from medvlm.train.optim import param_groups, to_torch_groups

    return torch.optim.AdamW(to_torch_groups(param_groups(model, cfg.weight_decay, cfg.projector_lr, row_masked)),
                             lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int):
    """The Trainer's learning-rate schedule (``lr_scheduler_type``, ``warmup_ratio``) over ``total`` steps."""
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=math.ceil(total * cfg.warmup_ratio),
                         num_training_steps=total)


class StepStrategy(Protocol):
    """What differs between the sharded CPU loops: back-propagation and the optimizer step."""

    model: nn.Module
    """The module called for the forward pass (FSDP-sharded model or DeepSpeed engine)."""

    def micro_step(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (CE sum / global learned tokens)."""

    def optimizer_step(self) -> None:
        """After all micro-batches of a step: clip, step optimizer and scheduler, zero gradients (if not done already)."""

    def grad_norm(self) -> float | None:
        """The pre-clipping global gradient norm of the last step (collective: every rank calls it)."""

    def last_lr(self) -> float:
        """The learning rate of the first parameter group after the last step."""


@dataclass
class FSDPStep:
    """FSDP2: plain autograd backward, then ``clip_grad_norm_`` + ``opt.step()`` + ``sched.step()`` + ``zero_grad``."""

    model: nn.Module
    """The ``fully_shard``-ed model."""
    opt: torch.optim.Optimizer
    """AdamW over the sharded (DTensor) parameters."""
    sched: Any
    """The learning-rate scheduler of ``opt``."""
    world: int
    """Number of ranks."""
    max_grad_norm: float
    """Clipping threshold (``cfg.max_grad_norm``)."""
    _norm: Any = field(default=None, repr=False)

    def micro_step(self, loss: torch.Tensor) -> None:
        """``(loss * world).backward()``: x world because FSDP averages gradients over ranks."""
        (loss * self.world).backward()

    def optimizer_step(self) -> None:
        """Clip the accumulated gradients, step optimizer and scheduler, drop the gradients."""
        self._norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                    self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        """The clipped-over norm; a ``DTensor`` norm is materialised with ``full_tensor()`` (a collective)."""
        n = self._norm
        return float(n.full_tensor() if hasattr(n, "full_tensor") else n)

    def last_lr(self) -> float:
        """The scheduler's current learning rate (first group)."""
        return self.sched.get_last_lr()[0]


def manual_train_loop(cfg: TrainConfig, run: ManualRun, strategy: StepStrategy) -> tuple[list[dict[str, Any]], int]:
    """The Trainer-equivalent loop of the sharded CPU paths; returns (logged rows, steps done).

    Each optimizer step takes this rank's slice of the sampler's global batch, divides every micro-batch's CE
    sum by the learned tokens of the whole global batch (all-reduced), back-propagates it with ``strategy``
    and steps; the logged loss is the all-reduced global token-mean, averaged over ``logging_steps``.
    Rows go to ``LOG_FILE`` on rank 0.
    """
    import torch.distributed as dist

    from medvlm.train.callbacks import LOG_FILE
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
            chunk = order[s * per_step:(s + 1) * per_step]
            batches = local_batches(run.dataset, run.collate, chunk, micro, world, rank, accumulation)
            n_items = torch.tensor(float(learned_tokens(batches)))
            dist.all_reduce(n_items)  # learned tokens of the whole global batch (Trainer: num_items_in_batch)
            loss_sum = torch.zeros(())
            for b in batches:
                loss = forward_loss(strategy.model, b, n_items, cfg.labelled_logits_only)  # this micro-batch's CE sum / global tokens
                strategy.micro_step(loss)
                loss_sum += loss.detach()
            strategy.optimizer_step()
            dist.all_reduce(loss_sum)  # the global token-mean loss of the step
            step += 1
            window.append(float(loss_sum))
            if step % cfg.logging_steps == 0 or step == total:
                row = {"loss": sum(window) / len(window), "grad_norm": strategy.grad_norm(),
                       "learning_rate": strategy.last_lr(), "epoch": epoch + (s + 1) / steps_per_epoch,
                       "step": step}
                history.append(row)
                window = []
                if rank == 0:
                    print(f"step {step}/{total} loss {row['loss']:.4f} lr {row['learning_rate']:.3g}", flush=True)
                    append_jsonl(run.out_dir / LOG_FILE, row)
        epoch += 1
    return history, step


def finish_manual_run(cfg: TrainConfig, run: ManualRun, config, full: dict[str, torch.Tensor] | None,
                      history: list[dict[str, Any]], steps: int, started: float, shards: dict[str, Any], label: str):
    """Rank 0 saves the gathered ``full`` state dict as a plain checkpoint and the loss plot; all ranks sync.

    ``config`` is the model config; ``label`` names the path in the plot title. Returns a ``TrainResult``.
    """
    import torch.distributed as dist

    from medvlm.model.modeling import MedVLMForConditionalGeneration
    from medvlm.train.callbacks import CONFIG_FILE, LOSS_PNG, MANIFEST_FILE, plot_loss_curve
    from medvlm.train.checkpoint import save_final
    from medvlm.train.run import TrainResult

    out_dir = run.out_dir
    if run.rank == 0:
        plain = MedVLMForConditionalGeneration(config)
        plain.load_state_dict(full)
        save_final(plain, run.processor, out_dir, {CONFIG_FILE: cfg.to_yaml(), MANIFEST_FILE: run.manifest.to_dict()},
                   lora=False)
        plot_loss_curve(history, out_dir / LOSS_PNG, f"{cfg.stage} ({label}): {out_dir.name}")
    dist.barrier()
    return TrainResult(str(out_dir), history[-1]["loss"] if history else None, history, steps,
                       time.time() - started, run.manifest.to_dict(), shards=shards)


def run_fsdp2_cpu(cfg: TrainConfig):
    """Train with FSDP2 over the ``torchrun`` process group (gloo); returns a :class:`TrainResult`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from medvlm.train.run import world_size

    if cfg.tune != "full":
        raise MedvlmError(f"distributed: fsdp2_cpu supports tune: full (got {cfg.tune}); use DDP for LoRA")
    if cfg.feature_cache == "on":
        raise MedvlmError("distributed: fsdp2_cpu does not use the feature cache; set feature_cache: off")
    if world_size() < 2:
        raise MedvlmError("distributed: fsdp2_cpu needs a multi-process launch: torchrun --nproc_per_node N -m medvlm train ...")
    started = time.time()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    run = prepare_manual_run(cfg, dist.get_world_size(), dist.get_rank())
    model = run.model
    shard_model(model, init_device_mesh("cpu", (run.world,)))
    shards = shard_report(model)
    opt = build_adamw(cfg, model, run.row_masked)  # over the DTensor shards, so after shard_model
    sched = build_scheduler(cfg, opt, run.total)
    history, steps = manual_train_loop(cfg, run, FSDPStep(model, opt, sched, run.world, cfg.max_grad_norm))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return finish_manual_run(cfg, run, model.config, full, history, steps, started, shards, "fsdp2_cpu")

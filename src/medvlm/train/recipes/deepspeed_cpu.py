"""Recipe ``align`` / ``sft`` with ``distributed: deepspeed_cpu``: DeepSpeed ZeRO-2 / ZeRO-3 training on CPU
clusters, launched by ``torchrun``.

On GPUs the standard path is the HF Trainer under ``accelerate launch --config_file
configs/accelerate/deepspeed_zero{2,3}.yaml``. On CPU that integration stops at start-up
(accelerate sees a world size of 1 and DeepSpeed's batch-size check fails), while the DeepSpeed
engine itself runs on CPU over gloo. So this loop drives ``deepspeed.initialize`` directly with the
same model, data, sampler, parameter groups (our ``torch.optim.AdamW``), scheduler, clipping and
token-level loss normalisation as the Trainer: every micro-batch's loss is its CE sum divided by the
learned tokens of the whole global batch, so the curve equals a 1-process run at the same global
batch. ZeRO-2 partitions optimizer state and gradients; ZeRO-3 also partitions the parameters
(each rank's ``param.ds_tensor`` holds ~1/world of every tensor, gathered layer by layer in forward
and backward). The final checkpoint is gathered on rank 0. Scope: native and family models, ``tune: full``
(no adapters, so no ``vit_lora``), no feature cache, no mid-run resume (use the Trainer path for those).
Needs ``pip install 'medvlm[deepspeed]'``.

The loop is :func:`medvlm.train.manual_loop.manual_train_loop` (shared with ``fsdp2_cpu``); this module
supplies :class:`DeepSpeedStep`, the engine's backward / step / clipping / scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig


def ds_config(cfg: TrainConfig, micro: int, accumulation: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a CPU run (fp32; clipping from ``max_grad_norm``)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed_zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW with medvlm's parameter groups
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def partition_report(model: torch.nn.Module) -> dict[str, Any]:
    """Per ZeRO-3 parameter: this rank's partition size, the full size and a checksum of the partition."""
    out = {}
    for name, p in model.named_parameters():
        part = getattr(p, "ds_tensor", None)
        if part is not None:
            out[name] = {"local": int(part.numel()), "global": int(p.ds_numel), "sum": float(part.double().sum())}
    return out


def gathered_state_dict(engine, stage: int) -> dict[str, torch.Tensor]:
    """The full model state dict (collective under ZeRO-3: every rank must call it)."""
    import deepspeed

    module = engine.module
    if stage < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class DeepSpeedStep:
    """DeepSpeed: ``engine.backward`` + ``engine.step()`` per micro-batch;
    the engine clips and steps at the boundary."""

    engine: Any
    """The ``deepspeed.initialize`` engine (clipping from ``gradient_clipping`` in :func:`ds_config`)."""
    sched: Any
    """The engine's learning-rate scheduler (stepped by ``engine.step()``)."""
    world: int
    """Number of ranks."""

    @property
    def model(self) -> Any:
        """The engine is called for the forward pass."""
        return self.engine

    def micro_step(self, loss: torch.Tensor) -> None:
        """Back-propagate and let the engine step (it only updates at the accumulation boundary).

        DeepSpeed averages gradients over ranks (x world undoes it); the global-token division already accounts
        for accumulation, so no further 1/accumulation scaling (``scale_wrt_gas=False``).
        """
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # optimizer + scheduler step only at the accumulation boundary

    def optimizer_step(self) -> None:
        """Nothing: the engine already clipped, stepped and zeroed in the step's last :meth:`micro_step`."""

    def grad_norm(self) -> float | None:
        """The engine's global gradient norm of the last step (None before the first)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def last_lr(self) -> float:
        """The scheduler's current learning rate (first group)."""
        return self.sched.get_last_lr()[0]


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train with the DeepSpeed engine over the ``torchrun`` process group (gloo); returns a ``TrainResult``."""
    if callbacks:
        raise MedvlmError("distributed: deepspeed_cpu runs its own loop: Trainer callbacks are not supported")
    try:
        import deepspeed
    except ImportError as e:
        raise MedvlmError("distributed: deepspeed_cpu needs DeepSpeed: pip install 'medvlm[deepspeed]'") from e
    import torch.distributed as dist

    from medvlm.train.checkpoint import refuse_resume
    from medvlm.train.manual_loop import (
        build_adamw,
        build_scheduler,
        finish_manual_run,
        manual_train_loop,
        prepare_manual_run,
    )
    from medvlm.train.setup import world_size

    if cfg.tune != "full":
        raise MedvlmError(f"distributed: deepspeed_cpu supports tune: full (got {cfg.tune}); use DDP for LoRA")
    if cfg.vit_lora_on():
        raise MedvlmError(
            "distributed: deepspeed_cpu trains without adapters (tune: full); vit_lora: true needs DDP "
            "(distributed: auto under accelerate launch / torchrun)"
        )
    if cfg.feature_cache == "on":
        raise MedvlmError("distributed: deepspeed_cpu does not use the feature cache; set feature_cache: off")
    refuse_resume(cfg)  # this loop writes no checkpoint-N: a resume request would be ignored silently
    if cfg.deepspeed_zero_stage not in (2, 3):
        raise MedvlmError(f"deepspeed_zero_stage must be 2 or 3, got {cfg.deepspeed_zero_stage}")
    if world_size() < 2:
        raise MedvlmError(
            "distributed: deepspeed_cpu needs a multi-process launch: torchrun --nproc_per_node N -m medvlm train ..."
        )
    deepspeed.init_distributed(dist_backend="gloo")
    job = prepare_manual_run(cfg, dist.get_world_size(), dist.get_rank(), family)
    opt = build_adamw(cfg, job.model, job.row_masked)
    engine, _, _, sched = deepspeed.initialize(
        model=job.model,
        optimizer=opt,
        config=ds_config(cfg, job.micro, job.accumulation, job.world),
        lr_scheduler=lambda o: build_scheduler(cfg, o, job.total),
    )
    shards = partition_report(engine.module)
    history, steps = manual_train_loop(cfg, job, DeepSpeedStep(engine, sched, job.world))
    full = gathered_state_dict(engine, cfg.deepspeed_zero_stage)
    return finish_manual_run(
        cfg, job, engine.module.config, full, history, steps, shards, f"deepspeed_cpu ZeRO-{cfg.deepspeed_zero_stage}"
    )

"""Recipe ``align`` / ``sft`` with ``distributed: fsdp2_cpu``: sharded training on CPU clusters with PyTorch FSDP2
(``fully_shard``), launched by ``torchrun``.

On GPUs the standard path is the HF Trainer under ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` (FSDP2, auto-wrapping the layer classes named by the model's
``_no_split_modules``). accelerate refuses FSDP on CPU (it silently falls back to DDP), so
``distributed: fsdp2_cpu`` runs :func:`medvlm.train.manual_loop.manual_train_loop` instead, with every decoder and
vision-encoder layer and then the whole model sharded over a gloo process group. Parameters are
``DTensor`` shards (each rank holds 1/world of every sharded tensor); the final checkpoint is
gathered as a full state dict on rank 0. Scope: native and family models, ``tune: full`` (no adapters, so no
``vit_lora``), no feature cache, no mid-run resume (use the Trainer path for those).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        self._norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.max_grad_norm
        )
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


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train with FSDP2 over the ``torchrun`` process group (gloo);
    returns a :class:`~medvlm.train.setup.TrainResult`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from medvlm.train.checkpoint import refuse_resume
    from medvlm.train.manual_loop import (
        build_adamw,
        build_scheduler,
        finish_manual_run,
        manual_train_loop,
        prepare_manual_run,
    )
    from medvlm.train.setup import world_size

    if callbacks:
        raise MedvlmError("distributed: fsdp2_cpu runs its own loop: Trainer callbacks are not supported")
    if cfg.tune != "full":
        raise MedvlmError(f"distributed: fsdp2_cpu supports tune: full (got {cfg.tune}); use DDP for LoRA")
    if cfg.vit_lora_on():
        raise MedvlmError(
            "distributed: fsdp2_cpu trains without adapters (tune: full); vit_lora: true needs DDP "
            "(distributed: auto under accelerate launch / torchrun)"
        )
    if cfg.feature_cache == "on":
        raise MedvlmError("distributed: fsdp2_cpu does not use the feature cache; set feature_cache: off")
    refuse_resume(cfg)  # this loop writes no checkpoint-N: a resume request would be ignored silently
    if world_size() < 2:
        raise MedvlmError(
            "distributed: fsdp2_cpu needs a multi-process launch: torchrun --nproc_per_node N -m medvlm train ..."
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    job = prepare_manual_run(cfg, dist.get_world_size(), dist.get_rank(), family)
    model = job.model
    shard_model(model, init_device_mesh("cpu", (job.world,)))
    shards = shard_report(model)
    opt = build_adamw(cfg, model, job.row_masked)  # over the DTensor shards, so after shard_model
    sched = build_scheduler(cfg, opt, job.total)
    history, steps = manual_train_loop(cfg, job, FSDPStep(model, opt, sched, job.world, cfg.max_grad_norm))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return finish_manual_run(cfg, job, model.config, full, history, steps, shards, "fsdp2_cpu")

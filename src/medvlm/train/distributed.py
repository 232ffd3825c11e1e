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
"""

from __future__ import annotations

import math
import time
from pathlib import Path
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


def forward_loss(model, batch: dict, n_items: torch.Tensor) -> torch.Tensor:
    """Micro-batch CE sum / ``n_items`` (padded or packed batch; no KV cache in training)."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "labels")
    out = model(**{k: batch[k] for k in keys if batch.get(k) is not None}, use_cache=False, num_items_in_batch=n_items)
    return out.loss


def run_fsdp2_cpu(cfg: TrainConfig):
    """Train with FSDP2 over the ``torchrun`` process group (gloo); returns a :class:`TrainResult`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import get_scheduler, set_seed

    from medvlm.model.modeling import MedVLMForConditionalGeneration
    from medvlm.train.callbacks import CONFIG_FILE, LOG_FILE, LOSS_PNG, MANIFEST_FILE, plot_loss_curve
    from medvlm.train.checkpoint import load_start, save_final
    from medvlm.train.data import build_dataset
    from medvlm.train.optim import param_groups, to_torch_groups
    from medvlm.train.run import TrainResult, resolve_accumulation, training_processor, world_size
    from medvlm.train.sampler import ModalityLengthGroupedSampler
    from medvlm.train.stages import apply_stage
    from medvlm.train.trainer import TrainCollator
    from medvlm.utils.io import append_jsonl

    if cfg.tune != "full":
        raise MedvlmError(f"distributed: fsdp2_cpu supports tune: full (got {cfg.tune}); use DDP for LoRA")
    if cfg.feature_cache == "on":
        raise MedvlmError("distributed: fsdp2_cpu does not use the feature cache; set feature_cache: off")
    if world_size() < 2:
        raise MedvlmError("distributed: fsdp2_cpu needs a multi-process launch: torchrun --nproc_per_node N -m medvlm train ...")
    started = time.time()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    accumulation = resolve_accumulation(cfg, world)
    set_seed(cfg.seed)
    model, processor = load_start(cfg)
    train_proc = training_processor(cfg, model, processor)
    dataset, manifest = build_dataset(
        cfg.sources(), train_proc, image_folder=cfg.image_folder, max_length=cfg.max_length,
        data_format=cfg.data_format, skip_missing_images=cfg.skip_missing_images, seed=cfg.seed,
    )
    model, plan, row_masked = apply_stage(model, cfg)
    model.train()
    mesh = init_device_mesh("cpu", (world,))
    shard_model(model, mesh)
    shards = shard_report(model)
    opt = torch.optim.AdamW(to_torch_groups(param_groups(model, cfg.weight_decay, cfg.projector_lr, row_masked)),
                            lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    micro = cfg.per_device_train_batch_size
    per_step = micro * world * accumulation
    steps_per_epoch = max(1, len(dataset) // (micro * world) // accumulation)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=math.ceil(total * cfg.warmup_ratio),
                          num_training_steps=total)
    sampler = ModalityLengthGroupedSampler(dataset.lengths, micro * world, accumulation, cfg.seed,
                                           cfg.group_by_modality_length)
    collate = TrainCollator(train_proc.pad_token_id, cfg.max_length if cfg.packing else None)
    history: list[dict[str, Any]] = []
    out_dir = Path(cfg.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    step, epoch, window = 0, 0, []
    while step < total:
        sampler.set_epoch(epoch)
        order = list(sampler)[: steps_per_epoch * per_step]
        for s in range(steps_per_epoch):
            if step >= total:
                break
            chunk = order[s * per_step:(s + 1) * per_step]
            batches = local_batches(dataset, collate, chunk, micro, world, rank, accumulation)
            n_items = torch.tensor(float(learned_tokens(batches)))
            dist.all_reduce(n_items)  # learned tokens of the whole global batch (Trainer: num_items_in_batch)
            loss_sum = torch.zeros(())
            for b in batches:
                loss = forward_loss(model, b, n_items)  # this micro-batch's CE sum / global tokens
                (loss * world).backward()  # x world because FSDP averages gradients over ranks
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dist.all_reduce(loss_sum)  # the global token-mean loss of the step
            step += 1
            window.append(float(loss_sum))
            if step % cfg.logging_steps == 0 or step == total:
                row = {"loss": sum(window) / len(window), "grad_norm": float(grad_norm.full_tensor()
                       if hasattr(grad_norm, "full_tensor") else grad_norm),
                       "learning_rate": sched.get_last_lr()[0], "epoch": epoch + (s + 1) / steps_per_epoch,
                       "step": step}
                history.append(row)
                window = []
                if rank == 0:
                    print(f"step {step}/{total} loss {row['loss']:.4f} lr {row['learning_rate']:.3g}", flush=True)
                    append_jsonl(out_dir / LOG_FILE, row)
        epoch += 1
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = MedVLMForConditionalGeneration(model.config)
        plain.load_state_dict(full)
        save_final(plain, processor, out_dir, {CONFIG_FILE: cfg.to_yaml(), MANIFEST_FILE: manifest.to_dict()}, lora=False)
        plot_loss_curve(history, out_dir / LOSS_PNG, f"{cfg.stage} (fsdp2_cpu): {out_dir.name}")
    dist.barrier()
    return TrainResult(str(out_dir), history[-1]["loss"] if history else None, history, step,
                       time.time() - started, manifest.to_dict(), shards=shards)

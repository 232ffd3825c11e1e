"""DeepSpeed ZeRO-2 / ZeRO-3 training on CPU clusters, launched by ``torchrun`` (``distributed: deepspeed_cpu``).

On GPUs the standard path is the HF Trainer under ``accelerate launch --config_file
configs/accelerate/deepspeed_zero{2,3}.yaml``. On CPU that integration stops at start-up
(accelerate sees a world size of 1 and DeepSpeed's batch-size check fails), while the DeepSpeed
engine itself runs on CPU over gloo. So this loop drives ``deepspeed.initialize`` directly with the
same model, data, sampler, parameter groups (our ``torch.optim.AdamW``), scheduler, clipping and
token-level loss normalisation as the Trainer: every micro-batch's loss is its CE sum divided by the
learned tokens of the whole global batch, so the curve equals a 1-process run at the same global
batch. ZeRO-2 partitions optimizer state and gradients; ZeRO-3 also partitions the parameters
(each rank's ``param.ds_tensor`` holds ~1/world of every tensor, gathered layer by layer in forward
and backward). The final checkpoint is gathered on rank 0. Scope: ``tune: full``, no feature cache,
no mid-run resume (use the Trainer path for those). Needs ``pip install 'medvlm[deepspeed]'``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
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


def run_deepspeed_cpu(cfg: TrainConfig):
    """Train with the DeepSpeed engine over the ``torchrun`` process group (gloo); returns a ``TrainResult``."""
    try:
        import deepspeed
    except ImportError as e:
        raise MedvlmError("distributed: deepspeed_cpu needs DeepSpeed: pip install 'medvlm[deepspeed]'") from e
    import torch.distributed as dist
    from transformers import get_scheduler, set_seed

    from medvlm.model.modeling import MedVLMForConditionalGeneration
    from medvlm.train.callbacks import CONFIG_FILE, LOG_FILE, LOSS_PNG, MANIFEST_FILE, plot_loss_curve
    from medvlm.train.checkpoint import load_start, save_final
    from medvlm.train.data import build_dataset
    from medvlm.train.distributed import forward_loss, learned_tokens, local_batches
    from medvlm.train.optim import param_groups, to_torch_groups
    from medvlm.train.run import TrainResult, resolve_accumulation, training_processor, world_size
    from medvlm.train.sampler import ModalityLengthGroupedSampler
    from medvlm.train.stages import apply_stage
    from medvlm.train.trainer import TrainCollator
    from medvlm.utils.io import append_jsonl

    if cfg.tune != "full":
        raise MedvlmError(f"distributed: deepspeed_cpu supports tune: full (got {cfg.tune}); use DDP for LoRA")
    if cfg.feature_cache == "on":
        raise MedvlmError("distributed: deepspeed_cpu does not use the feature cache; set feature_cache: off")
    if cfg.deepspeed_zero_stage not in (2, 3):
        raise MedvlmError(f"deepspeed_zero_stage must be 2 or 3, got {cfg.deepspeed_zero_stage}")
    if world_size() < 2:
        raise MedvlmError("distributed: deepspeed_cpu needs a multi-process launch: "
                          "torchrun --nproc_per_node N -m medvlm train ...")
    started = time.time()
    deepspeed.init_distributed(dist_backend="gloo")
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
    micro = cfg.per_device_train_batch_size
    per_step = micro * world * accumulation
    steps_per_epoch = max(1, len(dataset) // (micro * world) // accumulation)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(to_torch_groups(param_groups(model, cfg.weight_decay, cfg.projector_lr, row_masked)),
                            lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config(cfg, micro, accumulation, world),
        lr_scheduler=lambda o: get_scheduler(cfg.lr_scheduler_type, o, num_warmup_steps=math.ceil(total * cfg.warmup_ratio),
                                             num_training_steps=total),
    )
    shards = partition_report(engine.module)
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
            batches = local_batches(dataset, collate, order[s * per_step:(s + 1) * per_step], micro, world, rank,
                                    accumulation)
            n_items = torch.tensor(float(learned_tokens(batches)))
            dist.all_reduce(n_items)  # learned tokens of the whole global batch (Trainer: num_items_in_batch)
            loss_sum = torch.zeros(())
            for b in batches:
                loss = forward_loss(engine, b, n_items)  # this micro-batch's CE sum / global tokens
                # DeepSpeed averages gradients over ranks (x world undoes it); the global-token division already
                # accounts for accumulation, so no further 1/accumulation scaling.
                engine.backward(loss * world, scale_wrt_gas=False)
                engine.step()  # optimizer + scheduler step only at the accumulation boundary
                loss_sum += loss.detach()
            dist.all_reduce(loss_sum)  # the global token-mean loss of the step
            step += 1
            window.append(float(loss_sum))
            if step % cfg.logging_steps == 0 or step == total:
                norm = engine.get_global_grad_norm()
                row = {"loss": sum(window) / len(window), "grad_norm": float(norm) if norm is not None else None,
                       "learning_rate": sched.get_last_lr()[0], "epoch": epoch + (s + 1) / steps_per_epoch,
                       "step": step}
                history.append(row)
                window = []
                if rank == 0:
                    print(f"step {step}/{total} loss {row['loss']:.4f} lr {row['learning_rate']:.3g}", flush=True)
                    append_jsonl(out_dir / LOG_FILE, row)
        epoch += 1
    full = gathered_state_dict(engine, cfg.deepspeed_zero_stage)
    if rank == 0:
        plain = MedVLMForConditionalGeneration(engine.module.config)
        plain.load_state_dict(full)
        save_final(plain, processor, out_dir, {CONFIG_FILE: cfg.to_yaml(), MANIFEST_FILE: manifest.to_dict()}, lora=False)
        plot_loss_curve(history, out_dir / LOSS_PNG, f"{cfg.stage} (deepspeed_cpu ZeRO-{cfg.deepspeed_zero_stage}): "
                                                     f"{out_dir.name}")
    dist.barrier()
    return TrainResult(str(out_dir), history[-1]["loss"] if history else None, history, step,
                       time.time() - started, manifest.to_dict(), shards=shards)

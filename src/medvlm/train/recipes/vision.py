"""Recipe ``vision``: a random vision tower learns to see from the training answers, before ``align``.

Order: setup (:func:`medvlm.train.setup.start_run`: seed, starting model) -> the questions of the training files
with their answers as classes (:func:`medvlm.train.answer_head.read_question_set`, refused when answers do not
repeat) -> each step encodes a batch of images once and scores all their questions through
:class:`~medvlm.train.answer_head.AnswerHead` (AdamW, the run's schedule, clipping) -> teardown
(:func:`medvlm.train.setup.finish_run`: the checkpoint with the trained tower; projector, LM and processor as they
came). Only the tower layers up to the projector's feature layer learn; the classifier is not saved.

Not part of LLaVA-Med (its CLIP tower comes pretrained): this is the from-scratch presets' step 2 (README, "Your
own small dataset"). One process; ``distributed`` and the Trainer's keys are refused by the stage table.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import DATA_MANIFEST_FILE, TRAIN_CONFIG_FILE, TRAIN_LOG_FILE

PIXEL_CACHE_BYTES = 2 << 30
"""Decoded images are kept in memory up to this many bytes (each image is read once per epoch otherwise)."""
VISION_LOG_FILE = "vision_stage.json"
"""The classes, their counts and the per-epoch loss / accuracy of the run, saved beside the checkpoint."""


def run(cfg: TrainConfig, family: str | None = None, callbacks: list | None = None):
    """Train the tower of a native checkpoint on the answers of ``cfg.data_path``; a TrainResult."""
    from transformers import get_scheduler

    from medvlm.data.images import load_image
    from medvlm.model.parts import set_trainable
    from medvlm.train.answer_head import AnswerHead, read_question_set
    from medvlm.train.data import file_sha256, resolve_image
    from medvlm.train.optim import param_groups, to_torch_groups
    from medvlm.train.setup import finish_run, start_run
    from medvlm.train.stages import freeze_unused_tower_parts

    if family is not None:
        raise MedvlmError(f"stage vision trains medvlm's native tower; {family} checkpoints keep their own towers")
    if callbacks:
        raise MedvlmError("stage vision runs its own loop: TrainerCallbacks do not apply")
    paths = [s.path for s in cfg.sources()]  # validate() has refused a config without data_path
    start = start_run(cfg, None, world=1, resume=False)
    qs = read_question_set(paths, cfg.data_format)
    missing = [p for p in qs.images if not resolve_image(p, cfg.image_folder).is_file()]
    if missing:  # before any training, not an epoch in
        raise MedvlmError(
            f"stage vision: {len(missing)} of {len(qs.images)} images of {', '.join(paths)} are not in image_folder "
            f"{cfg.image_folder} (first: {resolve_image(missing[0], cfg.image_folder)})"
        )
    model, proc = start.model, start.processor
    tower = model.vision_tower
    set_trainable(model, vision_tower=True, projector=False, language_model=False)
    freeze_unused_tower_parts(model)  # layers after the feature layer never get a gradient
    tokenizer = proc.tokenizer
    head = AnswerHead(len(tokenizer), tower.config.hidden_size, len(qs.classes))
    token_ids = [
        [tokenizer(q, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id] for q in qs_]
        for qs_ in qs.questions
    ]
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    groups = param_groups(tower, cfg.weight_decay) + param_groups(head, cfg.weight_decay)  # never on biases / norms
    optimizer = torch.optim.AdamW(to_torch_groups(groups), lr=cfg.learning_rate)
    batch = int(cfg.per_device_train_batch_size)
    per_epoch = math.ceil(len(qs.images) / batch)
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * float(cfg.num_train_epochs))
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    cache: dict[int, torch.Tensor] = {}
    cached_bytes = 0

    def pixels(i: int) -> torch.Tensor:
        nonlocal cached_bytes
        if i in cache:
            return cache[i]
        px = proc.preprocess_images([load_image(resolve_image(qs.images[i], cfg.image_folder))])[0]  # [3, H, W]
        if cached_bytes + px.numel() * px.element_size() <= PIXEL_CACHE_BYTES:
            cache[i] = px
            cached_bytes += px.numel() * px.element_size()
        return px

    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    epochs: list[dict] = []
    tower.train()
    head.train()
    step, t0 = 0, time.time()
    log_path = Path(cfg.output_dir) / TRAIN_LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        while step < steps:
            order = torch.randperm(len(qs.images), generator=generator).tolist()
            right = seen = 0
            loss_sum = 0.0
            for b in range(0, len(order), batch):
                if step >= steps:
                    break
                idx = order[b : b + batch]
                px = torch.stack([pixels(i) for i in idx])  # [B, 3, H, W]
                tokens = model.get_vision_features(px)  # [B, T, D]: the tokens the projector reads
                flat, offsets, image_of, labels = [], [], [], []
                for j, i in enumerate(idx):
                    for ids, y in zip(token_ids[i], qs.answers[i]):
                        offsets.append(len(flat))
                        flat.extend(ids)
                        image_of.append(j)
                        labels.append(y)
                target = torch.tensor(labels)
                logits = head(tokens.float(), torch.tensor(flat), torch.tensor(offsets), torch.tensor(image_of))
                loss = torch.nn.functional.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                right += int((logits.argmax(-1) == target).sum())
                seen += len(labels)
                loss_sum += loss.item() * len(labels)
                if step % cfg.logging_steps == 0 or step == steps:
                    entry = {"step": step, "loss": round(loss.item(), 4), "learning_rate": scheduler.get_last_lr()[0]}
                    history.append(entry)
                    log.write(json.dumps(entry) + "\n")
            epochs.append({"epoch": len(epochs) + 1, "loss": loss_sum / max(1, seen), "accuracy": right / max(1, seen)})
            every = max(1, round(float(cfg.num_train_epochs) / 10))  # ~10 progress lines per run
            if not cfg.disable_tqdm and (len(epochs) % every == 0 or step >= steps):
                e = epochs[-1]
                print(
                    f"vision epoch {e['epoch']}: loss {e['loss']:.3f}, train accuracy {e['accuracy']:.3f} "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    tower.eval()
    model.eval()
    manifest = {
        "files": [{"path": p, "sha256": file_sha256(p)} for p in paths],
        "images": len(qs.images),
        "questions": qs.n_questions,
        "skipped": qs.skipped,
        "image_folder": cfg.image_folder,
    }
    report = {
        "classes": dict(zip(qs.classes, qs.class_counts)),
        "epochs": epochs,
        "steps": step,
        "images_per_step": batch,
    }
    return finish_run(
        cfg,
        start,
        main=True,
        model=model,
        extra_files={TRAIN_CONFIG_FILE: cfg.to_yaml(), DATA_MANIFEST_FILE: manifest, VISION_LOG_FILE: report},
        title=f"vision: {Path(cfg.output_dir).name}",
        history=history,
        steps=step,
        manifest=manifest,
    )

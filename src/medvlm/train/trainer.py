"""The HF ``Trainer`` specialised for medvlm through its documented hooks.

- sampler: modality-aware length grouping, seeded per epoch (:mod:`medvlm.train.sampler`);
- optimizer: medvlm's parameter groups (:mod:`medvlm.train.optim`);
- loss: with ``labelled_logits_only`` the training forward applies the LM head at labelled positions only
  (:meth:`MedVLMForConditionalGeneration.forward`); evaluation (``return_outputs``) keeps full logits;
- feature cache: when the frozen-tower feature cache is on, images of a batch whose features are cached
  arrive as ``cached_features``; the others as ``pixel_values``, whose tower features are computed
  here (no grad), stored in the cache and merged in sample order before the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from medvlm.data.collate import VLMCollator
from medvlm.errors import MedvlmError
from medvlm.train.feature_cache import FeatureCache
from medvlm.train.optim import param_groups, to_torch_groups
from medvlm.train.packing import pack_features
from medvlm.train.sampler import ModalityLengthGroupedSampler
from medvlm.train.shared_image import collate_segments, model_mask


class TrainCollator:
    """:class:`VLMCollator` plus the feature-cache fields (``cached_features``, ``image_is_cached``, ``image_keys``).

    With ``pack_length`` set, the micro-batch is packed instead of padded (:mod:`medvlm.train.packing`). Shared-image
    rows (``segment_ids``, ``position_ids``: :mod:`medvlm.train.shared_image`) get their positions and 4-D mask.
    """

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.base = VLMCollator(pad_token_id=pad_token_id, padding_side="right")
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        cached: list[torch.Tensor] = []
        flags: list[bool] = []
        keys: list[str] = []
        plain = []
        segments = []
        for f in features:
            f = dict(f)
            if "segment_ids" in f:
                segments.append({"segment_ids": f.pop("segment_ids"), "position_ids": f.pop("position_ids")})
            vf = f.pop("vision_features", None)
            ks = f.pop("image_keys", None)
            if vf is not None:
                cached.append(vf)  # [n_i, L, D]
                flags.extend([True] * vf.shape[0])
            elif f.get("pixel_values") is not None:
                flags.extend([False] * f["pixel_values"].shape[0])
                keys.extend(ks or [])
            plain.append(f)
        batch = pack_features(plain, self.pad_token_id, self.pack_length) if self.pack_length else self.base(plain)
        if segments:
            if len(segments) != len(plain) or self.pack_length:
                raise MedvlmError("shared-image rows cannot be packed or mixed with plain samples in one batch")
            batch = collate_segments(segments, batch)
        if cached:
            batch["cached_features"] = torch.cat(cached)  # [n_cached, L, D]
        if cached or keys:
            batch["image_is_cached"] = torch.tensor(flags, dtype=torch.bool)  # [n_img]
            batch["image_keys"] = keys
        return batch


class MedVLMTrainer(Trainer):
    """``Trainer`` with medvlm's sampler, parameter groups and feature cache."""

    def __init__(
        self,
        *args: Any,
        lengths: list[int],
        group_by_modality_length: bool = True,
        projector_lr: float | None = None,
        row_masked: set[int] | None = None,
        feature_cache: FeatureCache | None = None,
        labelled_logits_only: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.lengths = lengths
        self.group_by_modality_length = group_by_modality_length
        self.projector_lr = projector_lr
        self.row_masked = row_masked or set()
        self.feature_cache = feature_cache
        self.labelled_logits_only = labelled_logits_only
        """Training forwards compute logits only where a label is learned (the config's ``labelled_logits_only``)."""
        self.cache_stats = {"hits": 0, "misses": 0}
        self.cache_by_epoch: dict[int, dict[str, int]] = {}
        """Feature-cache hits/misses (images) per epoch (0-based) on this process."""

    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        # Group by the *global* micro-batch (per-device x processes): accelerate hands consecutive
        # per-device chunks of it to consecutive ranks, so a step sees the same samples at any world size.
        return ModalityLengthGroupedSampler(
            self.lengths,
            micro_batch=args.per_device_train_batch_size * args.world_size,
            mega_batches=args.gradient_accumulation_steps,
            seed=args.seed,
            group=self.group_by_modality_length,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            target = model if model is not None else self.model
            groups = to_torch_groups(param_groups(target, self.args.weight_decay, self.projector_lr, self.row_masked))
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _vlm(self, model):
        """The MedVLM model under any DDP / PEFT wrappers."""
        m = self.accelerator.unwrap_model(model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # No KV cache in training: the LM would fill one for nothing (the Trainer's `use_cache=False` reaches
        # only the top-level config, not the LM's), and packed rows are only recognised without one.
        inputs = {**inputs, "use_cache": False}
        if self.labelled_logits_only and not return_outputs and "labels" in inputs:
            # Only the loss is used here (evaluation asks for outputs, and gets full logits).
            inputs["labelled_logits_only"] = True
        if self.compute_loss_func is not None:
            # a family's loss function derives the shifted targets from the labels itself (train.family_loss)
            inputs.pop("shift_labels", None)
        if "attention_mask" in inputs:  # shared-image rows carry a boolean 4-D mask (TrainCollator)
            inputs["attention_mask"] = model_mask(inputs["attention_mask"], model)
        flags = inputs.pop("image_is_cached", None)
        keys = inputs.pop("image_keys", None)
        cached = inputs.pop("cached_features", None)
        if flags is not None:
            inputs = dict(inputs)
            pixels = inputs.pop("pixel_values", None)
            vlm = self._vlm(model)
            n_img = flags.shape[0]
            feats = None
            if pixels is not None:
                with torch.no_grad():
                    fresh = vlm.get_vision_features(pixels)  # [n_miss, L, D]
                if self.feature_cache is not None and keys:
                    self.feature_cache.put_many(keys, fresh)
                feats = fresh.new_empty((n_img, *fresh.shape[1:]))  # [n_img, L, D]
                feats[~flags] = fresh
            if cached is not None:
                if feats is None:
                    feats = cached.new_empty((n_img, *cached.shape[1:]))
                feats[flags] = cached.to(feats.dtype)
            hits, misses = int(flags.sum()), int((~flags).sum())
            self.cache_stats["hits"] += hits
            self.cache_stats["misses"] += misses
            per_epoch = self.cache_by_epoch.setdefault(int(self.state.epoch or 0), {"hits": 0, "misses": 0})
            per_epoch["hits"] += hits
            per_epoch["misses"] += misses
            inputs["vision_features"] = feats
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

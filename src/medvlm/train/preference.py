"""DPO's data, loss and trainer (the recipe is :mod:`medvlm.train.recipes.dpo`), for native and family models.

Sigmoid DPO (Rafailov et al.): ``loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))`` where
each log-probability is the fp32 sum over the compared answer's tokens (its text and end token; the
shared prompt, including earlier answers in it, is never counted). ``dpo_rpo_alpha`` (RPO, a named deviation
from the paper) adds ``alpha x`` the chosen answers' token-mean NLL. The policy is the stage-1
checkpoint with fresh LM-LoRA + ViT-LoRA and a trained projector (as in ``sq``); the reference is the
same checkpoint, frozen, in eval mode, **with its own frozen tower and projector**. The published
trainer fed the reference the policy's trainable projector output; ``ref_visual_path: policy``
reproduces that. Reference log-probabilities can be computed once before training and stored
(``ref_logps``, :mod:`medvlm.train.dpo_ref`): the reference model is then never loaded for training.

TRL's ``DPOTrainer`` is not used: it cannot precompute reference log-probs for image data nor give
the reference a different visual path. The preference files are TRL-compatible
(``prompt``/``chosen``/``rejected`` + ``images``) or STLLaVA-Med's format; both are read here.

A model family (:class:`~medvlm.model.families.processing.FamilyProcessor`) encodes each side with its own
processor (its image tokens, ``image_grid_thw``, ``mm_token_type_ids``, ... travel with the batch and reach the
policy and the reference unchanged); its reference always uses its own frozen visual path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medvlm.data.readers import read_preferences
from medvlm.data.schema import PreferenceSample, Sample
from medvlm.data.templates import IGNORE_INDEX, ImageTruncationError, encode_conversation
from medvlm.errors import MedvlmError
from medvlm.model.families.processing import FamilyProcessor
from medvlm.model.processing import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN
from medvlm.train.data import resolve_image, text_encode
from medvlm.train.self_training import SelfTrainingTrainer

REF_VISUAL_PATHS: tuple[str, ...] = ("frozen", "policy")
NOT_MODEL_INPUTS = ("pair_labels", "pair_ids", "ref_logps")
METRIC_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
)
RPO_METRIC_KEYS = ("nll/chosen",)  # logged as well when dpo_rpo_alpha is set


# ---- data ----------------------------------------------------------------------------------------
def prompt_ids(pair: PreferenceSample, processor, image_folder: str | None = None) -> list[int]:
    """Token ids of the pair's prompt up to the answer (the generation prompt)."""
    prompt = Sample(pair.id, list(pair.prompt), list(pair.images))
    if isinstance(processor, FamilyProcessor):
        return processor.encode_text(prompt, add_generation_prompt=True, image_folder=image_folder).input_ids
    return encode_conversation(
        prompt.messages,
        processor.tokenizer,
        processor.chat_template,
        image_seq_length=processor.image_seq_length,
        image_token=IMAGE_TOKEN,
        im_start_token=IM_START_TOKEN if processor.mm_use_im_start_end else None,
        im_end_token=IM_END_TOKEN if processor.mm_use_im_start_end else None,
        add_generation_prompt=True,
    ).input_ids


def side_sample(pair: PreferenceSample, side: str) -> Sample:
    """The full conversation of one side: prompt + the chosen or rejected continuation."""
    return Sample(pair.id, list(pair.prompt) + list(getattr(pair, side)), list(pair.images))


def encode_pair(
    pair: PreferenceSample, processor, max_length: int, image_folder: str | None = None
) -> dict[str, list[int]] | None:
    """Token ids and labels of prompt+chosen and prompt+rejected; labels only on the continuation.

    Returns None when truncation leaves either side without a learned token. Raises a MedvlmError when
    the tokenised prompt is not a prefix of a full conversation (a template/tokenizer mismatch).
    ``image_folder`` resolves a model family's images (their sizes decide its image token counts).
    """
    p_ids = prompt_ids(pair, processor, image_folder)
    out: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        enc = text_encode(side_sample(pair, side), processor, max_length, image_folder)
        n = min(len(p_ids), len(enc.input_ids))
        if enc.input_ids[:n] != p_ids[:n]:
            raise MedvlmError(
                f"pair {pair.id!r}: the tokenised prompt is not a prefix of the {side} conversation "
                f"(template {processor.template or processor.spec.name}); cannot tell answer tokens apart"
            )
        labels = [IGNORE_INDEX] * n + enc.labels[n:]
        if all(x == IGNORE_INDEX for x in labels):
            return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = enc.input_ids, labels
    return out


@dataclass
class PairReport:
    """What the preference files contributed."""

    files: list[str]
    pairs: int
    image_pairs: int
    dropped: dict[str, int]


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded preference pairs (text encoded at build time, images loaded lazily per item)."""

    def __init__(
        self,
        pairs: list[PreferenceSample],
        encoded: list[dict[str, list[int]]],
        processor,
        image_folder: str | None,
        max_length: int | None = None,
    ):
        self.pairs = pairs
        self.encoded = encoded
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length
        """A model family's truncation length (its items are re-encoded with the images)."""
        self.ref_logps: dict[str, tuple[float, float]] | None = None
        """Precomputed reference log-probs by pair id (set by the run when ``ref_logps`` is used)."""
        self.lengths = [
            max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) * (1 if p.images else -1)
            for p, e in zip(pairs, encoded)
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def collator(self):
        """The collator of this dataset's items (native :class:`DPOCollator` or :class:`FamilyDPOCollator`)."""
        if isinstance(self.processor, FamilyProcessor):
            return FamilyDPOCollator(self.processor)
        return DPOCollator(self.processor.pad_token_id)

    def family_item(self, i: int) -> dict[str, Any]:
        """A model family's pair: each side's full feature dict (image tensors included), answer-only labels."""
        pair, enc = self.pairs[i], self.encoded[i]
        images = self.processor.load_images(Sample(pair.id, list(pair.prompt), list(pair.images)), self.image_folder)
        item: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            feat = self.processor.encode(side_sample(pair, side), max_length=self.max_length, images=images)
            if feat["input_ids"].tolist() != enc[f"{side}_input_ids"]:
                raise MedvlmError(
                    f"pair {pair.id!r}: the {side} tokens differ from those indexed from the image headers "
                    "(an image file changed while training?)"
                )
            feat["labels"] = torch.tensor(enc[f"{side}_labels"], dtype=torch.long)  # [L] the answer only
            item[side] = feat
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair, enc = self.pairs[i], self.encoded[i]
        if isinstance(self.processor, FamilyProcessor):
            item = self.family_item(i)
        else:
            item = {k: torch.tensor(v, dtype=torch.long) for k, v in enc.items()}
            item["pixel_values"] = None
            if pair.images:
                sample = Sample(pair.id, list(pair.prompt), list(pair.images))
                item["pixel_values"] = self.processor.preprocess_images(
                    self.processor.load_images(sample, self.image_folder)
                )
        item["pair_id"] = pair.id
        if self.ref_logps is not None:
            if pair.id not in self.ref_logps:
                raise MedvlmError(f"precomputed reference log-probs have no entry for pair {pair.id!r}")
            item["ref_chosen_logps"], item["ref_rejected_logps"] = self.ref_logps[pair.id]
        return item


def build_preference_dataset(
    paths: list[str], processor, image_folder: str | None, max_length: int, data_format: str = "auto"
) -> tuple[PreferenceDataset, PairReport]:
    """Read, check and encode every pair of the preference files.

    A pair's key (for stored reference log-probs) is its ``id``, prefixed with the file's position
    (``"1:id"``) when several files are mixed; ids must be unique within a file.
    """
    pairs, encoded = [], []
    dropped = {"image_truncated": 0, "no_target": 0}
    seen: set[str] = set()
    for fi, path in enumerate(paths):
        if not Path(path).is_file():
            raise MedvlmError(f"data_path {path}: file not found")
        for pair in read_preferences(path, data_format):
            if len(paths) > 1:
                pair.id = f"{fi}:{pair.id}"
            if pair.id in seen:
                raise MedvlmError(f"{path}: duplicate pair id {pair.id!r}")
            seen.add(pair.id)
            for rel in pair.images:
                if image_folder is None and not Path(rel).is_absolute():
                    raise MedvlmError(
                        f"{path} pair {pair.id!r}: the pair has images ({rel}) but no image_folder is set"
                    )
                if not resolve_image(rel, image_folder).is_file():
                    raise MedvlmError(
                        f"{path} pair {pair.id!r}: image file {resolve_image(rel, image_folder)} not found"
                    )
            try:
                enc = encode_pair(pair, processor, max_length, image_folder)
            except ImageTruncationError:
                dropped["image_truncated"] += 1
                continue
            if enc is None:
                dropped["no_target"] += 1
                continue
            pairs.append(pair)
            encoded.append(enc)
    if not pairs:
        raise MedvlmError(f"data_path {paths}: no usable preference pair (dropped: {dropped})")
    report = PairReport(
        list(paths), len(pairs), sum(1 for p in pairs if p.images), {k: v for k, v in dropped.items() if v}
    )
    return PreferenceDataset(pairs, encoded, processor, image_folder, max_length), report


class DPOCollator:
    """Pads a batch of pairs into one ``[2B, T]`` batch: rows ``0..B-1`` chosen, ``B..2B-1`` rejected."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labs = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)  # [2B, T]
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # [2B, T]
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # [2B, T]
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, lab, 1
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "pair_labels": labels,
            "pair_ids": [f["pair_id"] for f in features],
        }
        pix = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pix:
            one = torch.cat(pix)  # [n_img, 3, H, W] in pair order
            batch["pixel_values"] = torch.cat([one, one])  # [2 n_img, 3, H, W]: chosen rows' images, then rejected
        if "ref_chosen_logps" in features[0]:
            batch["ref_logps"] = torch.tensor(
                [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features],
                dtype=torch.float32,
            )  # [2B]
        return batch


class FamilyDPOCollator:
    """A model family's pairs as one ``[2B, T]`` batch (chosen rows first) through the family's own collator:
    every per-token tensor is padded with the text, the image tensors are concatenated chosen-then-rejected."""

    def __init__(self, processor: FamilyProcessor):
        self.base = processor.collator("right")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([f["chosen"] for f in features] + [f["rejected"] for f in features])
        batch["pair_labels"] = batch.pop("labels")  # [2B, T]
        batch["pair_ids"] = [f["pair_id"] for f in features]
        if "ref_chosen_logps" in features[0]:
            batch["ref_logps"] = torch.tensor(
                [f["ref_chosen_logps"] for f in features] + [f["ref_rejected_logps"] for f in features],
                dtype=torch.float32,
            )  # [2B]
        return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs of a DPO batch: ids, mask, pixels and a family's image / token tensors (not the labels)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and v is not None}


# ---- loss ----------------------------------------------------------------------------------------
def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token targets are learned: ``[N, T] -> [N, T-1]`` (position t predicts token t+1)."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens per row, in fp32: ``[N, T, V], [N, T] -> [N]``."""
    logits = logits[:, :-1].float()  # [N, T-1, V]: position t predicts token t+1
    targets = labels[:, 1:]  # [N, T-1]
    mask = target_mask(labels)  # [N, T-1]
    logp = torch.log_softmax(logits, dim=-1)  # [N, T-1, V]
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    return (picked * mask).sum(-1)  # [N]


def dpo_loss(
    pi: torch.Tensor,
    ref: torch.Tensor,
    beta: float,
    rpo_alpha: float | None = None,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO from ``[2B]`` policy and reference log-probs (chosen first); returns loss and per-pair stats.

    With ``rpo_alpha`` (RPO), ``alpha x`` the chosen answers' NLL per token (``-sum pi_c / sum n_tokens_c``, the
    token mean over the batch as TRL computes it) is added; ``n_tokens`` ``[2B]`` are the labelled tokens per row.
    """
    b = pi.shape[0] // 2
    pi_c, pi_r, ref_c, ref_r = pi[:b], pi[b:], ref[:b], ref[b:]  # [B] each
    logits = (pi_c - pi_r) - (ref_c - ref_r)  # [B]
    loss = -F.logsigmoid(beta * logits).mean()
    rc, rr = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()  # [B]
    stats = {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).float(),
        "rewards/margins": rc - rr,
        "logps/chosen": pi_c.detach(),
        "logps/rejected": pi_r.detach(),
        "logps/ref_chosen": ref_c.detach(),
        "logps/ref_rejected": ref_r.detach(),
    }
    if rpo_alpha:
        if n_tokens is None:
            raise ValueError("rpo_alpha needs the labelled token counts (n_tokens)")
        nll = -pi_c.sum() / n_tokens[:b].sum().clamp(min=1)  # token-mean NLL of the chosen answers
        loss = loss + rpo_alpha * nll
        stats["nll/chosen"] = nll.detach().expand(b)
    return loss, stats


def reference_logps(ref_model, batch: dict[str, Any], visual_features: torch.Tensor | None = None) -> torch.Tensor:
    """Reference log-probs ``[2B]`` of a DPO batch, no grad.

    ``visual_features`` (projected, ``[n_img, S, H]``) replace the reference's own tower + projector
    (``ref_visual_path: policy``); otherwise the reference encodes ``pixel_values`` itself.
    """
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if visual_features is None:
            out = ref_model(**model_inputs(batch))
        else:
            embeds = ref_model.get_input_embeddings()(ids)  # [2B, T, H]
            image_mask = (ids == ref_model.config.image_token_id).unsqueeze(-1).expand_as(embeds)  # [2B, T, H]
            embeds = embeds.masked_scatter(image_mask, visual_features.to(embeds.dtype))
            out = ref_model.language_model(inputs_embeds=embeds, attention_mask=mask)
        return sequence_logps(out.logits, batch["pair_labels"])  # [2B]


class DPOTrainer(SelfTrainingTrainer):
    """The HF Trainer with sigmoid DPO as ``compute_loss`` and DPO metrics in every log line."""

    def __init__(
        self,
        *args: Any,
        ref_model=None,
        beta: float = 0.1,
        ref_visual_path: str = "frozen",
        rpo_alpha: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model
        self.beta = beta
        self.ref_visual_path = ref_visual_path
        self.rpo_alpha = rpo_alpha
        keys = METRIC_KEYS + (RPO_METRIC_KEYS if rpo_alpha else ())
        self._metrics: dict[str, list[float]] = {k: [] for k in keys}
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
            ref_model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["pair_labels"]
        ref_pre = inputs.get("ref_logps")
        fwd = model_inputs(inputs)  # ids, mask, pixels (and a family's image / token tensors)
        pixels = fwd.get("pixel_values")
        if pixels is not None and self.vit_lora_grad == "published":
            fwd["vision_features"] = self.published_features(model, fwd.pop("pixel_values"))
        out = model(**fwd)
        pi = sequence_logps(out.logits, labels)  # [2B]
        if ref_pre is not None:
            ref = ref_pre.to(pi.device)
        else:
            if self.ref_model is None:
                raise MedvlmError("DPO needs a reference model or precomputed reference log-probs (ref_logps)")
            feats = None
            if self.ref_visual_path == "policy" and pixels is not None:
                with torch.no_grad():
                    feats = self._vlm(model).get_image_features(pixels)  # [2 n_img, S, H], the policy's visual path
            ref = reference_logps(self.ref_model, inputs, feats)
        n_tokens = target_mask(labels).sum(-1)  # [2B] the tokens sequence_logps summed, per row
        loss, stats = dpo_loss(pi, ref, self.beta, self.rpo_alpha, n_tokens)
        if model.training:
            for k, v in stats.items():
                self._metrics[k].extend(v.float().cpu().tolist())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics["rewards/chosen"]:
            for k, vals in self._metrics.items():
                logs[k] = sum(vals) / len(vals)
                vals.clear()
        super().log(logs, start_time)

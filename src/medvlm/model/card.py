"""The model card (README.md) written with every checkpoint: research-only notice + architecture."""

from __future__ import annotations

from torch import nn

from medvlm.model.parts import PARTS, trainable_summary
from medvlm.notice import NOTICE


def architecture_summary(model: nn.Module) -> dict[str, str]:
    """Human-readable architecture facts of a medvlm model, in display order."""
    cfg = model.config
    vc, tc = cfg.vision_config, cfg.text_config
    lm = model.language_model
    return {
        "vision tower": (
            f"{type(model.vision_tower).__name__} ({vc.model_type}, {vc.image_size}px, patch {vc.patch_size}, "
            f"hidden {vc.hidden_size}, {vc.num_hidden_layers} layers)"
        ),
        "vision features": (
            f"hidden-state layer {cfg.vision_feature_layer}, strategy {cfg.vision_feature_select_strategy}"
        ),
        "projector": cfg.projector_type
        + (
            f" ({cfg.cluster_num_centers} centres, {cfg.cluster_iters} iterations)"
            if cfg.projector_type == "cluster"
            else ""
        ),
        "language model": (
            f"{type(lm).__name__} ({tc.model_type}, hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, "
            f"vocab {tc.vocab_size}{', tied embeddings' if getattr(tc, 'tie_word_embeddings', False) else ''})"
        ),
        "chat template": cfg.template,
        "image aspect": cfg.image_aspect,
        "image tokens": f"{cfg.image_seq_length} per image (id {cfg.image_token_id})"
        + (", wrapped in <im_start>/<im_end>" if cfg.mm_use_im_start_end else ""),
    }


def render_model_card(model: nn.Module, title: str | None = None, notes: str | None = None) -> str:
    """Markdown model card: notice first, then architecture, parameter counts and how to load it."""
    summary = architecture_summary(model)
    counts = trainable_summary(model)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [medvlm, vision-language, biomedical, research-only]",
        "---",
        "",
        f"# {title or 'medvlm model'}",
        "",
        f"> **Research use only.** {NOTICE}",
        "",
        "## Architecture",
        "",
        "| part | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "",
        "## Parameters",
        "",
        "| part | parameters | trainable when saved |",
        "|---|---:|---:|",
        *[f"| {name} | {counts[name][1]:,} | {counts[name][0]:,} |" for name in PARTS],
        f"| total | {sum(p.numel() for p in model.parameters()):,} | |",
        "",
        "## Loading",
        "",
        "```python",
        "from medvlm.model.build import load_pretrained",
        "model, processor = load_pretrained(\"path/to/this/folder\")",
        "```",
        "",
        "Weights are stored as safetensors; no remote code is needed (`model_type: medvlm` is registered",
        "by medvlm itself).",
        "",
        "## Limitations",
        "",
        NOTICE,
        "Outputs can be wrong, incomplete or invented (hallucinated) and must be checked by a qualified",
        "person before any use.",
    ]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"

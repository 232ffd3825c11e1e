"""Loading and saving family checkpoints (hub layout + medvlm's ``medvlm_family.json``).

The family is an explicit field: ``medvlm_family.json`` ``family`` when medvlm wrote the folder, else
the ``config.json`` ``model_type`` (a declared field of every transformers checkpoint; never the folder
name). Loading goes through the registry's classes, never ``AutoProcessor`` (which silently returns only
the tokenizer for a folder saved by an image-only processor subclass). Remote code is never run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medvlm.data.schema import Message
from medvlm.errors import MedvlmError
from medvlm.model.families import processors as image_only
from medvlm.model.families.processing import FamilyProcessor
from medvlm.model.families.spec import FAMILIES, FamilySpec, get_family
from medvlm.notice import NOTICE
from medvlm.utils.artifacts import CONFIG_FILE, FAMILY_FILE, HF_PROCESSOR_FILE, IMAGE_PROCESSOR_FILE, MODEL_CARD_FILE
from medvlm.utils.io import atomic_dir, read_json, write_json_atomic, write_named_files, write_text_atomic

_PROCESSOR_FILES = (HF_PROCESSOR_FILE, IMAGE_PROCESSOR_FILE)


def family_of(path: str | os.PathLike) -> str:
    """The family of a checkpoint folder (``medvlm_family.json``, else ``config.json`` ``model_type``)."""
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise MedvlmError(f"{folder}: config.json not found (not a checkpoint folder)")
    model_type = read_json(cfg_file).get("model_type")
    if not isinstance(model_type, str):
        raise MedvlmError(f"{cfg_file}: no model_type field")
    meta_file = folder / FAMILY_FILE
    if meta_file.is_file():
        family = read_json(meta_file).get("family")
        if family != model_type:
            raise MedvlmError(f"{meta_file}: family {family!r} does not match config.json model_type {model_type!r}")
    get_family(model_type)
    return model_type


def _processor_class(spec: FamilySpec) -> Any:
    import transformers

    return getattr(image_only, spec.processor_class, None) or getattr(transformers, spec.processor_class)


def _image_processor_class(folder: Path, spec: FamilySpec) -> Any:
    """The torchvision-free class of the image processor the folder names (the family's own if it names none)."""
    import transformers

    named = None
    for name in _PROCESSOR_FILES:
        f = folder / name
        if f.is_file():
            d = read_json(f)
            d = d.get("image_processor", d) if isinstance(d.get("image_processor"), dict) else d
            named = d.get("image_processor_type") or named
    if named is None:
        return getattr(transformers, spec.image_processor_class)
    base = named.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, base + "Pil", None)
    if cls is None:
        raise MedvlmError(
            f"{folder}: image processor {named!r} exists only as a torchvision implementation here (no {base}Pil "
            "class in transformers); medvlm never installs torchvision. Save the folder with a PIL image processor "
            f"(family {spec.name} uses {spec.image_processor_class})"
        )
    return cls


def _check_processor_class(folder: Path, spec: FamilySpec) -> None:
    f = folder / HF_PROCESSOR_FILE
    if not f.is_file():
        return
    named = read_json(f).get("processor_class")
    if named and named not in (spec.processor_class, spec.stock_processor_class):
        raise MedvlmError(
            f"{f}: processor_class {named!r} is not the {spec.name} family's ({spec.stock_processor_class}); a "
            "processor that needs a video processor needs torchvision, which medvlm never installs"
        )


def load_family_processor(path: str | os.PathLike, template: str | None = None) -> FamilyProcessor:
    """The :class:`FamilyProcessor` of a checkpoint folder (``template``: a medvlm template name, ``llava`` only)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    spec = get_family(family_of(folder))
    meta = read_json(folder / FAMILY_FILE) if (folder / FAMILY_FILE).is_file() else {}
    _check_processor_class(folder, spec)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    image_processor = _image_processor_class(folder, spec).from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False
    )
    try:
        processor = _processor_class(spec).from_pretrained(
            str(folder),
            tokenizer=tokenizer,
            image_processor=image_processor,
            local_files_only=True,
            trust_remote_code=False,
        )
    except (OSError, AttributeError, ValueError) as e:
        raise MedvlmError(f"{folder}: cannot load the {spec.name} processor ({e})") from e
    if type(processor.image_processor).__name__ != type(image_processor).__name__:
        raise MedvlmError(
            f"{folder}: the {spec.name} processor loaded {type(processor.image_processor).__name__}, "
            f"not the torchvision-free {type(image_processor).__name__}"
        )
    return FamilyProcessor(
        spec,
        processor,
        *_training_template(folder, spec, processor, template or meta.get("template"), explicit=template is not None),
    )


def _training_template(
    folder: Path, spec: FamilySpec, processor: Any, template: str | None, explicit: bool
) -> tuple[str, str | None]:
    """The marked chat template to train and prompt with, and the medvlm template name it came from."""
    if spec.template_file is None:
        if template is None:
            raise MedvlmError(
                f"{folder}: a {spec.name} checkpoint needs a medvlm chat template name (medvlm_family.json "
                "'template', or pass template=...: vicuna_v1, mistral_instruct, chatml, ...)"
            )
        from medvlm.data.templates import get_template

        return get_template(template).to_jinja(), template
    if explicit:
        raise MedvlmError(
            f"family {spec.name} uses its own chat template; a medvlm template name only applies to the llava family"
        )
    marked = spec.chat_template()
    own = getattr(processor, "chat_template", None)
    if own and own != marked and spec.stock_template:
        check_same_rendering(processor, own, marked, where=f"{folder} ({spec.name})")
    return marked, None


_PROBE = [
    Message.from_dict(m)
    for m in (
        {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A chest radiograph."}]},
        {"role": "user", "content": [{"type": "text", "text": "Any effusion?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    )
]


def check_same_rendering(processor: Any, own: str, marked: str, where: str) -> None:
    """Refuse a checkpoint whose own chat template writes other text than the family's marked template."""
    for conv, gen in ((_PROBE, False), (_PROBE[1:], False), (_PROBE[:2], True), (_PROBE[1:4], True)):
        msgs = [m.to_dict() for m in conv]
        a = processor.apply_chat_template(msgs, chat_template=own, add_generation_prompt=gen)
        b = processor.apply_chat_template(msgs, chat_template=marked, add_generation_prompt=gen)
        if a != b:
            raise MedvlmError(
                f"{where}: the checkpoint's chat template renders a conversation differently from medvlm's family "
                f"template, so medvlm's labels would not match how the model was trained.\ncheckpoint: {a!r}\n"
                f"family:     {b!r}"
            )


def load_family(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, template: str | None = None
) -> tuple[Any, FamilyProcessor]:
    """Load a family checkpoint folder (safetensors only, no remote code) -> ``(model, processor)`` in eval mode."""
    import transformers

    from medvlm.model.build import check_weights, resolve_dtype

    folder = Path(path)
    check_weights(folder, "checkpoint")
    processor = load_family_processor(folder, template=template)
    cls = getattr(transformers, processor.spec.model_class)
    model = cls.from_pretrained(
        str(folder), dtype=resolve_dtype(dtype), use_safetensors=True, local_files_only=True, trust_remote_code=False
    )
    model.eval()
    return model, processor


def save_family(
    model: Any,
    processor: FamilyProcessor,
    out_dir: str | os.PathLike,
    title: str | None = None,
    extra_files: dict[str, str | dict] | None = None,
) -> Path:
    """Write the hub layout (config, safetensors, processor files naming the stock processor class), the
    ``medvlm_family.json`` metadata, a README.md model card with the research-only notice and ``extra_files``
    (name -> text, or dict written as JSON), atomically."""
    import transformers

    spec = processor.spec
    if not isinstance(model, getattr(transformers, spec.model_class)):
        raise MedvlmError(
            f"save_family needs a {spec.model_class}, got {type(model).__name__} (merge or unload adapters first)"
        )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        processor.processor.save_pretrained(str(tmp))
        # Hub checkpoints name the stock processor class; medvlm's image-only subclass loads that too.
        pc = tmp / HF_PROCESSOR_FILE
        if pc.is_file():
            d = read_json(pc)
            d["processor_class"] = spec.stock_processor_class
            write_json_atomic(pc, d)
        meta = {"family": spec.name, "format_version": 1, "end_of_turn": spec.end_of_turn}
        if processor.template is not None:
            meta["template"] = processor.template
        write_json_atomic(tmp / FAMILY_FILE, meta)
        write_text_atomic(tmp / MODEL_CARD_FILE, family_card(model, processor, title or out.name))
        write_named_files(tmp, extra_files)
    return out


def family_card(model: Any, processor: FamilyProcessor, title: str) -> str:
    """Markdown model card: the research-only notice, the family, parameter counts, and how to load it."""
    spec = processor.spec
    total = sum(p.numel() for p in model.parameters())
    proc_import = (
        f"from medvlm.model.families.processors import {spec.processor_class}"
        if spec.processor_class != spec.stock_processor_class
        else f"from transformers import {spec.processor_class}"
    )
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [medvlm, vision-language, biomedical, research-only]",
            "---",
            "",
            f"# {title}",
            "",
            f"> **Research use only.** {NOTICE}",
            "",
            f"- family: `{spec.name}` ({spec.model_class})",
            f"- parameters: {total:,}",
            f"- end-of-turn token: `{spec.end_of_turn}`",
            *([f"- chat template: medvlm `{processor.template}`"] if processor.template else []),
            "",
            "## Loading",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText",
            proc_import,
            "",
            "model = AutoModelForImageTextToText.from_pretrained(path)",
            f"processor = {spec.processor_class}.from_pretrained(path)",
            "# or: from medvlm.model.families import load_family; model, processor = load_family(path)",
            "```",
            "",
        ]
    )


def supported_families() -> list[str]:
    """Names of the supported families, in registry order."""
    return list(FAMILIES)

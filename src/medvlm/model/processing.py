"""``MedVLMProcessor``: tokenizer + image processor + chat template + image-token layout.

Composition, not a ``ProcessorMixin``: it turns a :class:`medvlm.data.schema.Sample` into the
feature dict of the collate contract (``input_ids``, ``labels``, ``pixel_values``), using
:func:`medvlm.data.templates.encode_conversation` for the text (which expands each image part into
``[im_start] + <image> * image_seq_length + [im_end]``) and the image processor for pixels, after
the aspect mode (``square``/``pad``/``resize``) of :mod:`medvlm.data.images`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvlm.data.images import apply_aspect, check_aspect, load_sample_images, mean_color
from medvlm.data.schema import Sample
from medvlm.data.templates import Encoded, encode_conversation, get_template
from medvlm.errors import MedvlmError
from medvlm.model.tokenizer import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN
from medvlm.utils.artifacts import IMAGE_PROCESSOR_FILE, PROCESSOR_FILE, TOKENIZER_CONFIG_FILE
from medvlm.utils.io import read_json, write_json_atomic


def input_side(image_processor: Any) -> int:
    """The square pixel side the image processor outputs (crop size if it centre-crops, else resize size)."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size

    def field(key: str) -> int | None:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    side = field("height") or field("shortest_edge")
    if not side:
        raise MedvlmError(f"cannot tell the input size of {type(image_processor).__name__} (size={size})")
    return int(side)


class MedVLMProcessor:
    """Everything needed to turn a conversation with images into model inputs, and tokens back into text."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        template: str,
        image_aspect: str,
        image_seq_length: int,
        mm_use_im_start_end: bool = False,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.chat_template = get_template(template)  # validates the name (error lists the known ones)
        self.image_aspect = check_aspect(image_aspect)
        self.image_seq_length = int(image_seq_length)
        self.mm_use_im_start_end = bool(mm_use_im_start_end)
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.im_start_token_id = self._token_id(IM_START_TOKEN) if self.mm_use_im_start_end else None
        self.im_end_token_id = self._token_id(IM_END_TOKEN) if self.mm_use_im_start_end else None
        self.image_side = input_side(image_processor)
        self.background = mean_color(image_processor.image_mean)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise MedvlmError(f"the tokenizer has no {token} token; add it as a special token first")
        return int(ids[0])

    @property
    def pad_token_id(self) -> int:
        """Padding id (the tokenizer's pad token)."""
        if self.tokenizer.pad_token_id is None:
            raise MedvlmError("the tokenizer has no pad token")
        return int(self.tokenizer.pad_token_id)

    # -- images ------------------------------------------------------------------------------
    def load_images(self, sample: Sample, image_folder: str | os.PathLike | None = None) -> list[Image.Image]:
        """Load the sample's images (paths relative to ``image_folder`` unless absolute)."""
        return load_sample_images(sample, image_folder)

    def preprocess_images(self, images: list[Image.Image]) -> torch.FloatTensor:
        """Aspect mode, then the image processor: ``FloatTensor[n, 3, H, W]``."""
        fitted = [apply_aspect(im.convert("RGB"), self.image_aspect, self.background, self.image_side) for im in images]
        pixels = self.image_processor(images=fitted, return_tensors="pt")["pixel_values"]  # [n, 3, H, W]
        return pixels.float()

    # -- text + images -> features ----------------------------------------------------------
    def encode_text(
        self, sample: Sample, add_generation_prompt: bool = False, max_length: int | None = None
    ) -> Encoded:
        """Tokens and labels of a sample's conversation (no images read): the text half of :meth:`encode`."""
        return encode_conversation(
            sample.messages,
            self.tokenizer,
            self.chat_template,
            image_seq_length=self.image_seq_length,
            image_token=IMAGE_TOKEN,
            im_start_token=IM_START_TOKEN if self.mm_use_im_start_end else None,
            im_end_token=IM_END_TOKEN if self.mm_use_im_start_end else None,
            add_generation_prompt=add_generation_prompt,
            max_length=max_length,
        )

    def encode(
        self,
        sample: Sample,
        image_folder: str | os.PathLike | None = None,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        images: list[Image.Image] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Features of one sample: ``input_ids`` [L], ``labels`` [L] (-100 = not learned), ``pixel_values``.

        ``images`` (already loaded) replace reading ``sample.images`` from disk. The number of image
        parts in the conversation must equal the number of images.
        """
        n_parts = sample.num_image_parts
        n_images = len(images) if images is not None else len(sample.images)
        if n_parts != n_images:
            raise MedvlmError(
                f"sample {sample.id!r}: the conversation has {n_parts} image part(s) but {n_images} image(s) were given"
            )
        try:
            enc = self.encode_text(sample, add_generation_prompt=add_generation_prompt, max_length=max_length)
        except MedvlmError as e:
            raise type(e)(f"sample {sample.id!r}: {e}") from e
        pixel_values = None
        if n_images:
            loaded = images if images is not None else self.load_images(sample, image_folder)
            pixel_values = self.preprocess_images(loaded)
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def decode(self, token_ids: list[int] | torch.Tensor) -> str:
        """Text of generated ids (special tokens dropped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields stored in ``medvlm_processor.json``."""
        return {
            "template": self.template,
            "image_aspect": self.image_aspect,
            "image_seq_length": self.image_seq_length,
            "mm_use_im_start_end": self.mm_use_im_start_end,
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer files, ``preprocessor_config.json`` and ``medvlm_processor.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        self.image_processor.save_pretrained(str(out))
        write_json_atomic(out / PROCESSOR_FILE, self.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MedVLMProcessor:
        """Load a processor saved by :meth:`save_pretrained` (local folder only)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        d = Path(path)
        for name in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE, TOKENIZER_CONFIG_FILE):
            if not (d / name).is_file():
                raise MedvlmError(f"{d}: {name} is missing (not a medvlm processor folder)")
        fields = read_json(d / PROCESSOR_FILE)
        missing = [k for k in ("template", "image_aspect", "image_seq_length") if k not in fields]
        if missing:
            raise MedvlmError(f"{d / PROCESSOR_FILE}: missing field(s) {', '.join(missing)}")
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
        return cls(
            tokenizer,
            image_processor,
            template=fields["template"],
            image_aspect=fields["image_aspect"],
            image_seq_length=fields["image_seq_length"],
            mm_use_im_start_end=fields.get("mm_use_im_start_end", False),
        )

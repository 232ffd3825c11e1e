"""``FamilyProcessor``: a medvlm :class:`~medvlm.data.schema.Sample` -> a family's model inputs and labels.

The conversation is rendered by the family's *marked* chat template (``{% generation %}`` around learned
text) through the family's own transformers processor with ``return_assistant_tokens_mask=True``: the
processor expands every image into its tokens and re-aligns the mask after the expansion, so the labels
are exactly the learned text, wherever the images sit. Learned text = each assistant answer plus its
end-of-turn token, and each ``vuser`` question (rendered as a user turn) plus its end-of-turn token.
Char spans of one rendered string are what :mod:`medvlm.data.templates` uses for the native model; here
the processor's own rendering and expansion produce the spans, so the two can never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from PIL import Image

from medvlm.data.collate import VLMCollator
from medvlm.data.images import load_image, load_sample_images
from medvlm.data.schema import Message, Sample
from medvlm.data.templates import IGNORE_INDEX, Encoded, ImageTruncationError, get_template, render
from medvlm.errors import MedvlmError
from medvlm.model.families.spec import FamilySpec


def _check_conversation(messages: list[Message], add_generation_prompt: bool, asks_questions: bool = False) -> None:
    """Roles, order and image placement every family template relies on (the templates do not check).

    ``asks_questions``: a generation prompt may follow an answer (the next turn is a VUSER question).
    """
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    offset = len(messages) - len(turns)
    if messages and messages[0].role == "system" and messages[0].num_images:
        raise MedvlmError("message 0 (system): image parts are not allowed in a system message")
    if not turns:
        raise MedvlmError("the conversation has no user/assistant turns")
    for j, m in enumerate(turns):
        i = j + offset
        if m.role not in ("user", "assistant", "vuser"):
            raise MedvlmError(f"message {i}: role {m.role!r} is not allowed here (system only comes first)")
        if (j % 2 == 1) != (m.role == "assistant"):
            raise MedvlmError(
                f"message {i}: expected a {'assistant' if j % 2 else 'user/vuser'} turn, got {m.role!r} "
                "(roles must alternate)"
            )
        if not m.content:
            raise MedvlmError(f"message {i} ({m.role}): empty content")
        if m.role != "user" and m.num_images:
            raise MedvlmError(f"message {i} ({m.role}): image parts are only allowed in user turns")
        for p in m.content:
            if p.get("type") not in ("text", "image"):
                raise MedvlmError(f"message {i}: unknown content part type {p.get('type')!r}")
    if turns[0].role == "vuser":
        raise MedvlmError(f"message {offset}: the first turn must be a user turn, not a vuser turn")
    last = turns[-1].role
    if add_generation_prompt and last == "assistant" and not asks_questions:
        raise MedvlmError(
            "add_generation_prompt needs the conversation to end with a user turn (this processor has "
            "no VUSER question prompt)"
        )
    if not add_generation_prompt and last != "assistant":
        raise MedvlmError(
            f"a training conversation must end with an assistant turn (message {len(messages) - 1} "
            f"is {last!r}); pass add_generation_prompt=True for a prompt"
        )


class FamilyProcessor:
    """A family's transformers processor + its marked chat template, speaking medvlm's feature contract."""

    def __init__(self, spec: FamilySpec, processor: Any, chat_template: str, template: str | None = None):
        self.spec = spec
        self.processor = processor
        self.chat_template = chat_template
        self.template = template
        """medvlm template name the chat template was made from (``llava`` family), else None."""
        tok = processor.tokenizer
        self.marker_ids = frozenset(self._token_id(t) for t in spec.image_markers)
        self.end_of_turn_id = self._token_id(spec.end_of_turn)
        self.markers = tuple(spec.image_markers)
        if tok.pad_token_id is None:
            raise MedvlmError(f"the {spec.name} tokenizer has no pad token")

    def _token_id(self, token: str) -> int:
        tok = self.processor.tokenizer
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise MedvlmError(f"the {self.spec.name} tokenizer does not have {token!r} as one token")
        return int(ids[0])

    @property
    def tokenizer(self) -> Any:
        """The family's tokenizer."""
        return self.processor.tokenizer

    @property
    def asks_questions(self) -> bool:
        """Whether a conversation ending with an answer can be continued with a VUSER question (STLLaVA-Med
        self-questioning): the family declares its ``question_header``, or its medvlm template has a VUSER role."""
        if self.spec.question_header:
            return True
        return self.template is not None and get_template(self.template).vuser is not None

    @property
    def pad_token_id(self) -> int:
        """Padding id (the tokenizer's pad token)."""
        return int(self.processor.tokenizer.pad_token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer: the end-of-turn token, then EOS if different."""
        ids = [self.end_of_turn_id]
        eos = self.processor.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(int(eos))
        return ids

    def collator(self, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> VLMCollator:
        """A :class:`VLMCollator` that carries and pads every tensor this family's processor returns."""
        return VLMCollator(
            self.pad_token_id,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            token_keys=self.spec.token_tensors,
            image_keys=self.spec.image_tensors,
        )

    # -- samples -> chat -------------------------------------------------------------------
    def load_images(self, sample: Sample, image_folder: str | os.PathLike | None = None) -> list[Image.Image]:
        """Load the sample's images (paths relative to ``image_folder`` unless absolute)."""
        return load_sample_images(sample, image_folder)

    def conversation(self, messages: list[Message], images: list[Image.Image]) -> list[dict]:
        """The family's chat format: HF message dicts whose image parts carry the PIL images in order."""
        it = iter(images)
        out = []
        for i, m in enumerate(messages):
            parts = []
            for p in m.content:
                if p.get("type") == "image":
                    parts.append({"type": "image", "image": next(it)})
                else:
                    text = p["text"]
                    for marker in self.markers:
                        if marker in text:
                            raise MedvlmError(
                                f"message {i} ({m.role}): text contains the image marker {marker!r}; "
                                "images must be image parts"
                            )
                    parts.append({"type": "text", "text": text})
            out.append({"role": m.role, "content": parts})
        return out

    def encode(
        self,
        sample: Sample,
        image_folder: str | os.PathLike | None = None,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        images: list[Image.Image] | None = None,
    ) -> dict[str, Any]:
        """Features of one sample: ``input_ids`` [L], ``attention_mask`` [L], ``labels`` [L] (not for a
        generation prompt), the family's per-token tensors [L] and its image tensors as the processor returns them.

        A generation prompt after an answer (the conversation ends with an assistant turn; :attr:`asks_questions`)
        prompts a VUSER question: the conversation as trained, then the family's ``question_header`` (the text a
        learned VUSER question follows; a medvlm template writes its VUSER tag itself), so the prompt's tokens are
        exactly those the ``sq`` stage trained before each question.

        Raises :class:`ImageTruncationError` when ``max_length`` would cut an image's tokens; otherwise
        the text is truncated from the end.
        """
        n_parts = sample.num_image_parts
        n_images = len(images) if images is not None else len(sample.images)
        if n_parts != n_images:
            raise MedvlmError(
                f"sample {sample.id!r}: the conversation has {n_parts} image part(s) but {n_images} image(s) were given"
            )
        asks = add_generation_prompt and bool(sample.messages) and sample.messages[-1].role == "assistant"
        try:
            _check_conversation(sample.messages, add_generation_prompt, self.asks_questions)
            if self.template is not None:  # a medvlm template also checks what it allows (vuser only in v1_sq)
                render(sample.messages, self.template, add_generation_prompt)
            pils = [] if not n_images else (images if images is not None else self.load_images(sample, image_folder))
            conv = self.conversation(sample.messages, pils)
        except MedvlmError as e:
            raise type(e)(f"sample {sample.id!r}: {e}") from e
        try:
            if asks and self.spec.question_header:
                out = self._question_prompt(conv, pils)
            else:
                out = self.processor.apply_chat_template(
                    conv,
                    chat_template=self.chat_template,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    add_generation_prompt=add_generation_prompt,
                    return_assistant_tokens_mask=not add_generation_prompt,
                )
        except (ValueError, TemplateError) as e:  # the template's or processor's own checks
            raise MedvlmError(f"sample {sample.id!r}: the {self.spec.name} processor refused it ({e})") from e
        feature: dict[str, Any] = {}
        ids = out.pop("input_ids")[0]  # [L]
        feature["input_ids"] = ids
        feature["attention_mask"] = out.pop("attention_mask")[0]  # [L]
        if not add_generation_prompt:
            mask = torch.as_tensor(out.pop("assistant_masks"))[0].bool()  # [L]
            feature["labels"] = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
        for key in self.spec.token_tensors:
            if key in out:
                feature[key] = out.pop(key)[0]  # [L]
        for key in self.spec.image_tensors:
            if key in out:
                feature[key] = out.pop(key)
        if out:
            raise MedvlmError(
                f"the {self.spec.name} processor returned tensors the family does not declare: {sorted(out)}"
            )
        if max_length is not None and ids.numel() > max_length:
            if any(int(t) in self.marker_ids for t in ids[max_length:]):
                raise ImageTruncationError(
                    f"sample {sample.id!r}: max_length {max_length} would cut image tokens (the conversation has "
                    f"{ids.numel()} tokens with {n_images} image(s))"
                )
            for key in ("input_ids", "attention_mask", "labels", *self.spec.token_tensors):
                if key in feature:
                    feature[key] = feature[key][:max_length]
        return feature

    def _question_prompt(self, conv: list[dict], images: list[Image.Image]) -> Any:
        """The VUSER prompt: the rendered conversation + ``question_header``, tokenised with its images in one call
        (as ``apply_chat_template`` tokenises its own rendering: no BOS added when the text starts with it)."""
        text = self.processor.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False)
        text += self.spec.question_header
        bos = self.tokenizer.bos_token
        kwargs = {"add_special_tokens": False} if bos is not None and text.startswith(bos) else {}
        return self.processor(text=[text], images=[images] if images else None, return_tensors="pt", **kwargs)

    def encode_text(
        self,
        sample: Sample,
        add_generation_prompt: bool = False,
        max_length: int | None = None,
        image_folder: str | os.PathLike | None = None,
    ) -> Encoded:
        """The tokens and labels of :meth:`encode` without decoding any pixels (to index a dataset).

        A family's image token count depends on the image's size (Qwen's dynamic resolution, Idefics3's
        tiles, LLaVA-OneVision's grid), and on nothing else: each image is replaced by a blank one of the
        size its file header declares, which the processor expands to the same tokens.
        """
        blanks = [
            Image.new(
                "RGB",
                _header_size(
                    Path(rel) if Path(rel).is_absolute() or image_folder is None else Path(image_folder) / rel,
                    sample.id,
                ),
            )
            for rel in sample.images
        ]
        feat = self.encode(sample, add_generation_prompt=add_generation_prompt, max_length=max_length, images=blanks)
        ids = feat["input_ids"].tolist()
        labels = feat["labels"].tolist() if "labels" in feat else [IGNORE_INDEX] * len(ids)
        return Encoded(input_ids=ids, labels=labels, num_images=len(blanks))

    def decode(self, token_ids: list[int] | torch.Tensor) -> str:
        """Text of generated ids (special tokens dropped)."""
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)


def _header_size(path: Path, sample_id: str) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (DICOM and odd files: fully loaded)."""
    from PIL import UnidentifiedImageError

    if not path.is_file():
        raise MedvlmError(f"sample {sample_id!r}: {path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return load_image(path).size  # DICOM, or a clear MedvlmError naming the file

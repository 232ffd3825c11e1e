"""Image-only processors for the families whose stock processor insists on a video processor.

transformers builds a video processor only with torchvision, which medvlm never installs. A processor's
parts are read from its ``__init__`` signature, so these subclasses, whose ``__init__`` names an image
processor and a tokenizer but no video processor, drop the video part and still save and load the hub
layout (``processor_config.json`` names the subclass; their ``from_pretrained`` also loads a folder that
names the stock class). ``AutoProcessor`` does not know them: load through :mod:`medvlm.model.families`.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (images and text only)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (images and text only)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any
    ):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor.

    The image-layout arguments are named in the signature (not only ``**kwargs``) because transformers
    saves exactly the ``__init__`` arguments: without them a reload would fall back to the defaults and
    count image tokens differently from the model.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

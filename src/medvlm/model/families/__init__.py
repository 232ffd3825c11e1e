"""Model families: transformers image-text-to-text models (Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3,
llava-hf LLaVA, LLaVA-OneVision) as a second backend beside the native medvlm LLaVA.

- :mod:`.spec`: the registry (``FAMILIES``, ``get_family``) — one :class:`FamilySpec` row per family.
- :mod:`.processors`: image-only processor subclasses (no video processor, so no torchvision).
- :mod:`.processing`: :class:`FamilyProcessor` (Sample -> features with exact labels; collator).
- :mod:`.io`: ``family_of``, ``load_family``, ``save_family``.
- :mod:`.tiny`: ``build_tiny_family`` (offline tiny builds for tests and ``model init --preset tiny-<family>``).
"""

from medvlm.model.families.spec import FAMILIES, FamilySpec, get_family

__all__ = ["FAMILIES", "FamilySpec", "get_family"]

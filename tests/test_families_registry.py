"""The family registry: every declared part prefix matches the transformers model; unknown names are clear errors."""

from __future__ import annotations

import pytest

from family_helpers import FAMILY_NAMES, tiny
from medvlm.errors import MedvlmError
from medvlm.model.families import FAMILIES, get_family
from medvlm.model.families.spec import part_of


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_declared_parts_cover_every_parameter(family):
    """align trains the connector: its prefixes must name real parameters, and the three parts cover the model."""
    model, proc = tiny(family)
    spec = proc.spec
    counts = {"connector": 0, "vision_tower": 0, "language_model": 0}
    for name, p in model.named_parameters():
        counts[part_of(spec, name)] += p.numel()
    assert all(counts.values()), counts
    for prefix in spec.connector:
        assert any(n.startswith(prefix) for n, _ in model.named_parameters()), prefix
    assert type(model).__name__ == spec.model_class
    assert type(proc.processor.image_processor).__name__ == spec.image_processor_class
    assert type(proc.processor).__name__ == spec.processor_class


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_processors_have_no_video_part(family):
    _, proc = tiny(family)
    assert getattr(proc.processor, "video_processor", None) is None


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(
        MedvlmError,
        match="unsupported model family 'qwen2_vl'.*supported families: qwen2_5_vl, "
        "qwen3_vl, gemma3, idefics3, llava, llava_onevision",
    ):
        get_family("qwen2_vl")
    with pytest.raises(MedvlmError, match="SmolVLM v1.*idefics3"):
        get_family("smolvlm")
    assert list(FAMILIES) == FAMILY_NAMES

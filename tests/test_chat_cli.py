"""``medvlm chat``: one-shot answers equal the engine's greedy answer; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.model.build import build_preset, load_pretrained, save_checkpoint
from medvlm.serve.chat import build_chat_sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=4)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("chat") / "tiny")


def test_chat_prints_exactly_the_engine_answer(checkpoint: Path, shared_dir: Path) -> None:
    image = shared_dir / "images" / "synpic42202.jpg"
    prompt = "Is there evidence of an aortic aneurysm?"
    model, processor = load_pretrained(checkpoint)
    expected = InferenceEngine(model, processor).generate(
        [build_chat_sample(prompt, [str(image)])], GenerationSettings(max_new_tokens=12)
    )[0]
    assert expected
    res = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(checkpoint),
            "--image",
            str(image),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == expected + "\n"
    # Relative image path + --image-folder gives the same answer.
    res = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(checkpoint),
            "--image",
            "synpic42202.jpg",
            "--image-folder",
            str(image.parent),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == expected + "\n"


def test_chat_sample_places_images() -> None:
    s = build_chat_sample("What is shown?", ["a.png"])
    assert s.messages[0].content == [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    s = build_chat_sample("Compare <image> with <image>", ["a.png", "b.png"])
    assert s.num_image_parts == 2 and s.images == ["a.png", "b.png"]
    with pytest.raises(MedvlmError, match=r"--prompt has 2 <image> placeholder\(s\) but 1 --image given"):
        build_chat_sample("Compare <image> with <image>", ["a.png"])


def test_chat_bad_image_is_a_clear_error(checkpoint: Path) -> None:
    # Without --prompt the chat is interactive; a missing image fails before the model loads.
    res = CliRunner().invoke(app, ["chat", "--model", str(checkpoint), "--image", "/nonexistent/x.png"])
    assert isinstance(res.exception, MedvlmError) and "x.png: image file not found" in str(res.exception)
    res = CliRunner().invoke(
        app, ["chat", "--model", str(checkpoint), "--image", "/nonexistent/x.png", "--prompt", "What?"]
    )
    assert isinstance(res.exception, MedvlmError) and "x.png: image file not found" in str(res.exception)

"""``medvlm model init`` / ``medvlm model info`` through the real CLI app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.errors import MedvlmError
from medvlm.model.build import load_pretrained


def test_model_init_then_info(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "tiny-cluster"
    res = runner.invoke(
        app,
        [
            "model",
            "init",
            "--preset",
            "tiny",
            "--projector",
            "cluster",
            "--out",
            str(out),
            "--image-size",
            "96",
            "--template",
            "llava_med_v0",
            "--aspect",
            "square",
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["projector_type"], cfg["template"], cfg["image_aspect"], cfg["image_seq_length"]) == (
        "cluster",
        "llava_med_v0",
        "square",
        144,
    )
    model, processor = load_pretrained(out)
    assert processor.template == "llava_med_v0" and processor.image_side == 96

    res = runner.invoke(app, ["model", "info", str(out)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for expected in (
        "CLIPVisionModel",
        "96px, patch 8",
        "hidden-state layer -1, strategy patch",
        "cluster",
        "LlamaForCausalLM",
        "llava_med_v0",
        "square",
        "144 per image",
        "vision_tower",
        "projector",
        "language_model",
        "trainable parts when saved: vision_tower, projector, language_model",
        "Research use only",
    ):
        assert expected in text, expected
    n_proj = sum(p.numel() for p in model.projector.parameters())
    assert f"{n_proj:,}" in text


def test_model_init_bad_projector_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["model", "init", "--projector", "perceiver", "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, MedvlmError)
    assert "unknown projector_type 'perceiver'; choose one of linear, mlp2x_gelu, cluster" in str(res.exception)
    assert not (tmp_path / "x").exists()

"""`medvlm model info` on a model-family folder, and the native loader's error when pointed at one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.errors import MedvlmError
from medvlm.model.build import load_pretrained
from medvlm.model.families.tiny import init_tiny_family


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return init_tiny_family("tiny-qwen2_5_vl", tmp_path_factory.mktemp("fam") / "tiny_qwen")


def test_model_info_on_a_family_folder_shows_family_and_part_counts(tiny_qwen):
    from medvlm.model.families.io import load_family

    res = CliRunner().invoke(app, ["model", "info", str(tiny_qwen)], terminal_width=200)
    assert res.exit_code == 0, res.output
    model, _ = load_family(tiny_qwen)
    total = sum(p.numel() for p in model.parameters())
    for text in (
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLImageProcessorPil",
        "connector",
        "vision_tower",
        "language_model",
        f"{total:,}",
        "not for clinical use",
    ):
        assert text in res.output, text


def test_native_loader_names_the_family_loader(tiny_qwen):
    with pytest.raises(MedvlmError, match="qwen2_5_vl checkpoint .*model family.*load_family"):
        load_pretrained(tiny_qwen)


def test_unsupported_model_type_lists_the_supported_families(tiny_qwen, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    for f in tiny_qwen.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "smolvlm"}))
    (folder / "medvlm_family.json").unlink()
    with pytest.raises(MedvlmError, match="not a native medvlm checkpoint.*supported families: qwen2_5_vl"):
        load_pretrained(folder)
    res = CliRunner().invoke(app, ["model", "info", str(folder)], terminal_width=200)
    assert res.exit_code != 0 and "supported families" in res.output + str(res.exception)

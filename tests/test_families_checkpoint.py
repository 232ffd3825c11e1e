"""Model-family checkpoints: ``model init --preset tiny-<family>`` saves the hub layout; medvlm reloads it with
equal logits; plain transformers loads it and greedy-generates the same tokens; bad folders get one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from family_helpers import FAMILY_NAMES, images, msgs, multi_turn_sample, tiny
from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError
from medvlm.model.families.io import family_of, load_family, save_family
from medvlm.utils.artifacts import FAMILY_FILE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved once by medvlm (module scope: built and written once)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILY_NAMES:
        model, proc = tiny(family)
        out[family] = save_family(model, proc, root / family)
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_reload_gives_equal_logits(family, saved):
    model, proc = tiny(family)
    loaded, lproc = load_family(saved[family])
    assert type(lproc.processor) is type(proc.processor) and lproc.chat_template == proc.chat_template
    feat = lproc.encode(multi_turn_sample(with_vuser=family != "llava"), images=images())
    assert torch.equal(
        feat["input_ids"], proc.encode(multi_turn_sample(with_vuser=family != "llava"), images=images())["input_ids"]
    )
    batch = lproc.collator()([feat])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    meta = json.loads((saved[family] / FAMILY_FILE).read_text())
    assert meta["family"] == family and family_of(saved[family]) == family
    assert "Research use only" in (saved[family] / "README.md").read_text()


def _plain_processor_class(family):
    import transformers

    from medvlm.model.families import FAMILIES, processors

    spec = FAMILIES[family]
    return getattr(processors, spec.processor_class, None) or getattr(transformers, spec.processor_class)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plain_transformers_generates_what_medvlm_generates(family, saved):
    from transformers import AutoModelForImageTextToText

    path = saved[family]
    plain = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True).eval()
    plain_proc = _plain_processor_class(family).from_pretrained(str(path), local_files_only=True)
    img = images()[0]
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is shown?"}]}]
    inputs = plain_proc.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )

    model, proc = load_family(path)
    s = Sample("g", msgs(("user", "<image>\nWhat is shown?")), images=["a"])
    short = proc.encode(s, images=[img], add_generation_prompt=True)
    batch = proc.collator(padding_side="left")([short])
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        ours = model.generate(**batch, **settings)[0, batch["input_ids"].shape[1] :]
        theirs = plain.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :]
    assert ours.tolist() == theirs.tolist() and len(ours) == 6


def test_model_init_cli_builds_a_family_preset(tmp_path):
    from typer.testing import CliRunner

    from medvlm.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    res = runner.invoke(app, ["model", "init", "--preset", "tiny-qwen2_5_vl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    model, proc = load_family(out)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000
    for args, why in (
        (["tiny-gemma3", "--aspect", "pad"], "--aspect apply to the native presets"),
        (["tiny-gemma3", "--template", "chatml"], "tiny-llava only"),
        (["tiny-internvl"], "family presets: tiny-qwen2_5_vl"),
    ):
        bad = runner.invoke(app, ["model", "init", "--preset", *args, "--out", str(tmp_path / "bad")])
        assert isinstance(bad.exception, MedvlmError) and why in str(bad.exception)
        assert not (tmp_path / "bad").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_families_are_refused_listing_the_supported_ones(saved, tmp_path):
    folder = _copy(saved["idefics3"], tmp_path / "smolvlm2")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / FAMILY_FILE).unlink()
    for model_type, why in (("smolvlm", "torchvision"), ("internvl", "unsupported model family 'internvl'")):
        cfg["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(MedvlmError, match=why) as e:
            load_family(folder)
        assert "qwen2_5_vl, qwen3_vl, gemma3, idefics3, llava, llava_onevision" in str(e.value)


def test_plain_hub_folder_takes_the_family_from_model_type(saved, tmp_path):
    folder = _copy(saved["qwen2_5_vl"], tmp_path / "hub")
    (folder / FAMILY_FILE).unlink()
    assert family_of(folder) == "qwen2_5_vl"
    model, proc = load_family(folder)
    assert proc.spec.name == "qwen2_5_vl"
    (folder / FAMILY_FILE).write_text(json.dumps({"family": "gemma3"}))
    with pytest.raises(MedvlmError, match="does not match config.json model_type 'qwen2_5_vl'"):
        load_family(folder)


def test_processor_needing_torchvision_is_refused(saved, tmp_path):
    folder = _copy(saved["idefics3"], tmp_path / "video")
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["processor_class"] = "SmolVLMProcessor"
    (folder / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(MedvlmError, match="SmolVLMProcessor.*torchvision"):
        load_family(folder)
    folder = _copy(saved["gemma3"], tmp_path / "tv-only")
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["image_processor"]["image_processor_type"] = "Llama4ImageProcessorFast"
    (folder / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(MedvlmError, match="Llama4ImageProcessorFast.*torchvision"):
        load_family(folder)


def test_a_checkpoint_whose_template_differs_from_the_family_is_refused(saved, tmp_path):
    from importlib import resources

    folder = _copy(saved["qwen2_5_vl"], tmp_path / "stock")
    stock = resources.files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text()
    (folder / "chat_template.jinja").write_text(stock)
    load_family(folder)  # the stock Qwen2.5-VL template writes the same text: accepted
    (folder / "chat_template.jinja").write_text(stock.replace("You are a helpful assistant.", "You are terse."))
    with pytest.raises(MedvlmError, match="renders a conversation differently"):
        load_family(folder)
    with pytest.raises(MedvlmError, match="only applies to the llava family"):
        load_family(saved["gemma3"], template="chatml")
    # LLaVA-OneVision trains and prompts with medvlm's own (self-consistent) format whatever the folder holds.
    folder = _copy(saved["llava_onevision"], tmp_path / "ov")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    _, proc = load_family(folder)
    assert proc.chat_template == proc.spec.chat_template()


def test_pickled_weights_are_refused(saved, tmp_path):
    folder = _copy(saved["gemma3"], tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(MedvlmError, match="pickled weights"):
        load_family(folder)

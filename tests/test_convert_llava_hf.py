"""`medvlm model export --to llava-hf`: plain transformers loads the export and computes what medvlm computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from medvlm.cli import main as cli_main
from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset, load_pretrained, save_checkpoint
from medvlm.model.convert import export_checkpoint

QUESTION = "What abnormality is seen in this CT?"


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_hf")
    model, processor = build_preset("tiny", projector="mlp2x_gelu", aspect="pad", seed=3)
    src = save_checkpoint(model, processor, root / "medvlm")
    dst = export_checkpoint(src, root / "hf", "llava-hf")
    return src, dst


@pytest.fixture(scope="module")
def hf(exported):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, dst = exported
    model = LlavaForConditionalGeneration.from_pretrained(str(dst)).eval()
    processor = AutoProcessor.from_pretrained(str(dst))
    return model, processor


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _hf_inputs(processor, image):
    """The model-card usage of every llava-hf checkpoint: render the template, then call the processor."""
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt")


def _three_usages(processor, image, n_image_tokens: int) -> dict[str, list[int]]:
    """Input ids as (a) the model card, (b) apply_chat_template(tokenize=True) and (c) vLLM's chat path build them."""
    card = _hf_inputs(processor, image)["input_ids"][0].tolist()
    tokenized = processor.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, images=[image]
    )
    # vLLM: the rendered template tokenized WITHOUT special tokens, then each <image> replaced by its features
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    vllm: list[int] = []
    for t in processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]:
        vllm += [t] * n_image_tokens if t == image_id else [t]
    return {
        "model card": card,
        "apply_chat_template(tokenize=True)": list(tokenized["input_ids"][0]),
        "vllm chat": vllm,
    }


def test_transformers_loads_export_with_same_inputs_and_logits(exported, hf, shared_dir):
    src, _ = exported
    hm, hp = hf
    image_path = shared_dir / "images" / "med_img_1.png"  # 593x756: the pad aspect matters
    image = Image.open(image_path).convert("RGB")
    model, processor = load_pretrained(src)
    sample = Sample(id="q", messages=[Message.from_text("user", f"<image>\n{QUESTION}")], images=[str(image_path)])
    ours = processor.encode(sample, add_generation_prompt=True)
    theirs = _hf_inputs(hp, image)
    assert theirs["input_ids"][0].tolist() == ours["input_ids"].tolist()
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
    with torch.no_grad():
        a = model(input_ids=ours["input_ids"][None], pixel_values=ours["pixel_values"]).logits  # [1, T, V]
        b = hm(**theirs).logits  # [1, T, V]
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # every way users call a llava-hf model gives medvlm's ids: one BOS, the template's
    for usage, ids in _three_usages(hp, image, hm.config.image_seq_length).items():
        assert ids == ours["input_ids"].tolist(), usage
    assert ours["input_ids"].tolist().count(hp.tokenizer.bos_token_id) == 1


def test_medvlm_chat_equals_transformers_generate(exported, hf, shared_dir, capsys):
    src, _ = exported
    hm, hp = hf
    image_path = shared_dir / "images" / "med_img_1.png"
    code, out, err = _run_cli(
        ["chat", "--model", str(src), "--image", str(image_path), "--prompt", QUESTION, "--max-new-tokens", "12"],
        capsys,
    )
    assert code == 0, err
    image = Image.open(image_path).convert("RGB")
    pixel_values = _hf_inputs(hp, image)["pixel_values"]
    answers = {}
    for usage, ids in _three_usages(hp, image, hm.config.image_seq_length).items():
        input_ids = torch.tensor([ids])
        with torch.no_grad():  # generation_config.json of the export
            gen = hm.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values,
                max_new_tokens=12,
                do_sample=False,
            )
        new = gen[0, len(ids) :].tolist()
        eos = hp.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos)]
        answers[usage] = hp.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert answers == {usage: out.strip() for usage in answers}
    assert out.strip()  # a real comparison: the tiny model says something


def test_template_without_bos_on_a_bos_adding_tokenizer(tmp_path, shared_dir):
    """chatml has no BOS; the tiny tokenizer adds one by default: the export's tokenizer must not."""
    from transformers import AutoProcessor

    model, processor = build_preset("tiny", template="chatml", seed=5)
    assert processor.tokenizer("a")["input_ids"][0] == processor.tokenizer.bos_token_id  # it would add BOS
    src = save_checkpoint(model, processor, tmp_path / "m")
    dst = export_checkpoint(src, tmp_path / "hf", "llava-hf")
    hp = AutoProcessor.from_pretrained(str(dst))
    image_path = shared_dir / "images" / "bio_patch.png"
    sample = Sample(id="q", messages=[Message.from_text("user", f"<image>\n{QUESTION}")], images=[str(image_path)])
    ours = processor.encode(sample, add_generation_prompt=True)["input_ids"].tolist()
    assert hp.tokenizer.bos_token_id not in ours
    n_image_tokens = json.loads((dst / "config.json").read_text())["image_seq_length"]
    for usage, ids in _three_usages(hp, Image.open(image_path).convert("RGB"), n_image_tokens).items():
        assert ids == ours, usage
    assert processor.tokenizer("a")["input_ids"][0] == processor.tokenizer.bos_token_id  # medvlm's own is unchanged


@pytest.mark.parametrize("aspect", ["square", "resize"])
def test_other_aspect_modes_give_identical_pixels(tmp_path, shared_dir, aspect):
    from transformers import AutoProcessor

    model, processor = build_preset("tiny", aspect=aspect)
    src = save_checkpoint(model, processor, tmp_path / "m")
    dst = export_checkpoint(src, tmp_path / "hf", "llava-hf")
    image = Image.open(shared_dir / "images" / "xy_chromosome.jpg").convert("RGB")
    ours = processor.preprocess_images([image])
    theirs = AutoProcessor.from_pretrained(str(dst)).image_processor(images=[image], return_tensors="pt")
    assert torch.equal(theirs["pixel_values"], ours)
    assert aspect in (dst / "README.md").read_text()


def test_config_processor_and_card(exported):
    import json

    _, dst = exported
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["vision_feature_layer"] == -1
    assert cfg["image_seq_length"] == 64 and cfg["image_token_index"] == 4
    proc = json.loads((dst / "processor_config.json").read_text())
    assert proc["patch_size"] == 8 and proc["num_additional_image_tokens"] == 1
    assert proc["image_processor"]["do_pad"] is True
    assert (dst / "chat_template.jinja").is_file()
    assert "Research use only" in (dst / "README.md").read_text()


@pytest.mark.parametrize("projector", ["linear", "cluster"])
def test_refuses_projectors_llava_hf_cannot_hold(tmp_path, capsys, projector):
    model, processor = build_preset("tiny", projector=projector)
    src = save_checkpoint(model, processor, tmp_path / "m")
    code, _, err = _run_cli(["model", "export", "--to", "llava-hf", str(src), str(tmp_path / "out")], capsys)
    assert code == 2
    assert f"projector_type {projector!r} cannot be exported to llava-hf" in err
    assert "Linear -> activation -> Linear" in err
    assert not (tmp_path / "out").exists()


def test_refuses_im_start_end_and_keeps_existing_output(tmp_path):
    model, processor = build_preset("tiny", mm_use_im_start_end=True)
    src = save_checkpoint(model, processor, tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MedvlmError, match="mm_use_im_start_end"):
        export_checkpoint(src, out, "llava-hf")
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_export_arguments(tmp_path, exported, capsys):
    src, _ = exported
    code, _, err = _run_cli(["model", "export", "--to", "gguf", str(src), str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown export format (--to) 'gguf'" in err and "llava-hf" in err
    with pytest.raises(MedvlmError, match="not found"):
        export_checkpoint(tmp_path / "missing", tmp_path / "o", "llava-hf")
    with pytest.raises(MedvlmError, match="is the input folder"):
        export_checkpoint(src, src, "llava-hf")
    assert not Path(tmp_path / "o").exists()

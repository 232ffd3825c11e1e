"""`medvlm model import --from llava-med-v1.5|v1.0` and `export --to llava-med-v1.5`, on tiny checkpoints
written here in exactly the published layouts (config keys, sharded safetensors + index, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medvlm.cli import main as cli_main
from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError
from medvlm.model.build import load_pretrained
from medvlm.model.convert import export_checkpoint, import_checkpoint

CORPUS = [
    "The chest radiograph shows a small left pleural effusion.",
    "What abnormality is seen in the CT scan?",
    "Histology shows tumour cells with large nuclei.",
    "[INST] Describe the image. [/INST] An MRI of the brain.",
]


def _tokenizer(extra: list[str]):
    """A Llama/Mistral-like tokenizer (BOS prepended, no <image> token), with ``extra`` added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:
        hf.add_tokens(extra, special_tokens=True)
    return hf


def _clip_folder(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A tiny local CLIP vision tower folder (config, safetensors, preprocessor); returns its tensors."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    tower = CLIPVisionModel(cfg)
    tower.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(str(folder))
    return {k: v.clone() for k, v in tower.state_dict().items()}


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::n_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def write_llava_med_v15(root: Path, tower_dir: Path, dtype=torch.bfloat16, store_tower: bool = True) -> Path:
    """A tiny microsoft/llava-med-v1.5-mistral-7b: LlavaMistralForCausalLM config + 3 shards + tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    src = root / "llava-med-v1.5"
    src.mkdir()
    tower = _clip_folder(tower_dir, seed=1) if not tower_dir.exists() else None
    tok = _tokenizer([])
    tok.save_pretrained(str(src))
    torch.manual_seed(2)
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    lm = MistralForCausalLM(text)
    tensors = {k: v.clone() for k, v in lm.state_dict().items()}
    tensors["model.mm_projector.0.weight"] = torch.randn(48, 32)
    tensors["model.mm_projector.0.bias"] = torch.randn(48)
    tensors["model.mm_projector.2.weight"] = torch.randn(48, 48)
    tensors["model.mm_projector.2.bias"] = torch.randn(48)
    if store_tower:
        tower = tower or {k: v for k, v in _load(tower_dir / "model.safetensors").items()}
        tensors.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in tower.items()})
    _write_sharded(src, {k: v.to(dtype) for k, v in tensors.items()}, 3)
    cfg = {k: v for k, v in text.to_dict().items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    cfg.update(
        {
            "architectures": ["LlavaMistralForCausalLM"],
            "model_type": "llava_mistral",
            "rope_theta": 1000000.0,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.36.2",
            "feature_outs": "encoder+decoder",
            "image_aspect_ratio": "pad",
            "img_size": 640,
            "mm_hidden_size": 32,
            "mm_patch_merge_type": "flat",
            "mm_projector_lr": None,
            "mm_projector_type": "mlp2x_gelu",
            "mm_resampler_type": None,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": str(tower_dir),
            "proj_vision": True,
            "tokenizer_model_max_length": 4096,
            "tokenizer_padding_side": "right",
            "tune_mm_mlp_adapter": False,
            "tune_vision": False,
            "use_mm_proj": True,
            "use_cache": False,
        }
    )
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    return src


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(_load(f))
    return out


@pytest.fixture(scope="module")
def v15(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15")
    src = write_llava_med_v15(root, root / "clip-tiny")
    dst = root / "medvlm"
    record = import_checkpoint(src, dst, "llava-med-v1.5")
    return root, src, dst, record


def test_import_v15_maps_every_tensor_and_runs(v15, shared_dir):
    root, src, dst, record = v15
    source = _all_tensors(src)
    model, processor = load_pretrained(dst)
    cfg = model.config
    assert (cfg.projector_type, cfg.template, cfg.image_aspect) == ("mlp2x_gelu", "mistral_instruct", "pad")
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.mm_use_im_start_end) == (
        -2,
        "patch",
        False,
    )
    assert record["vision_tower"].startswith("stored weights (")
    sd = model.state_dict()
    assert torch.equal(sd["projector.2.weight"], source["model.mm_projector.2.weight"])
    assert torch.equal(
        sd["vision_tower.encoder.layers.1.mlp.fc1.weight"],
        source["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"],
    )
    assert torch.equal(
        sd["language_model.model.layers.1.self_attn.q_proj.weight"], source["model.layers.1.self_attn.q_proj.weight"]
    )
    assert sd["projector.0.weight"].dtype == torch.bfloat16
    # <image> appended as the last row; its embedding and head rows are the mean of the others (LLaVA's init)
    rows = source["model.embed_tokens.weight"].shape[0]
    assert processor.image_token_id == rows and processor.tokenizer.pad_token == "<unk>"
    for ours, theirs in (
        ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("language_model.lm_head.weight", "lm_head.weight"),
    ):
        assert torch.equal(sd[ours][:rows], source[theirs])
        assert torch.equal(sd[ours][rows], source[theirs].float().mean(0).to(torch.bfloat16))
    sample = Sample(
        id="q",
        messages=[Message.from_text("user", "<image>\nWhat is seen?")],
        images=[str(shared_dir / "images" / "synpic42202.jpg")],
    )
    feats = processor.encode(sample, add_generation_prompt=True)
    assert processor.tokenizer.decode(feats["input_ids"][:8]).startswith("<s>[INST] <image><image>")
    with torch.no_grad():
        logits = model(input_ids=feats["input_ids"][None], pixel_values=feats["pixel_values"]).logits
    assert torch.isfinite(logits.float()).all()
    assert "Research use only" in (dst / "README.md").read_text()


def test_round_trip_v15_to_llava_hf_and_back(v15, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, src, dst, _ = v15
    hf = export_checkpoint(dst, tmp_path / "hf", "llava-hf")
    hm = LlavaForConditionalGeneration.from_pretrained(str(hf))
    assert torch.equal(hm.model.multi_modal_projector.linear_1.weight, _all_tensors(src)["model.mm_projector.0.weight"])
    assert AutoProcessor.from_pretrained(str(hf)).image_processor.do_pad
    back = export_checkpoint(dst, tmp_path / "v15", "llava-med-v1.5")
    source, exported = _all_tensors(src), _all_tensors(back)
    assert sorted(source) == sorted(exported)
    for k, v in source.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    cfg = json.loads((back / "config.json").read_text())
    orig = json.loads((src / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "vocab_size",
        "mm_projector_type",
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "image_aspect_ratio",
        "mm_use_im_start_end",
        "mm_vision_tower",
        "mm_hidden_size",
        "rope_theta",
        "hidden_size",
        "num_key_value_heads",
    ):
        assert cfg[key] == orig[key], key
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(back))) == orig["vocab_size"]
    again = import_checkpoint(back, tmp_path / "again", "llava-med-v1.5")
    assert again["added_token_rows"] == 1
    first, second = _all_tensors(dst), _all_tensors(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def _full_clip_folder(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A tiny full CLIPModel folder (vision_model.* + text_model.* tensors), as openai/clip-* folders are."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision_config=dict(
            image_size=64,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    )
    CLIPModel(cfg).save_pretrained(str(folder))
    saved = _load(folder / "model.safetensors")
    assert any(k.startswith("text_model.") for k in saved)
    return {k[len("vision_model.") :]: v for k, v in saved.items() if k.startswith("vision_model.")}


def test_vision_tower_path_replaces_stored_weights(v15, tmp_path, capsys):
    root, src, _, _ = v15
    other = tmp_path / "clip-other"
    tower = _full_clip_folder(other, seed=7)
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "model",
                "import",
                "--from",
                "llava-med-v1.5",
                str(src),
                "--out",
                str(tmp_path / "m"),
                "--vision-tower",
                str(other),
            ]
        )
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"vision tower: weights from {other}; the " in out and "stored tower tensors" in out
    imported = _all_tensors(tmp_path / "m")
    assert len(tower) == len([k for k in imported if k.startswith("vision_tower.")])
    for k, v in tower.items():
        assert torch.equal(imported["vision_tower." + k], v), k


def write_llava_med_v10(root: Path) -> Path:
    """A tiny LLaVA-Med v1.0: LLaMA + linear mm_projector, [PAD] <im_patch> <im_start> <im_end>, no tower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = root / "llava-med-v1.0"
    src.mkdir()
    tok = _tokenizer(["[PAD]", "<im_patch>", "<im_start>", "<im_end>"])
    tok.pad_token = "[PAD]"
    tok.save_pretrained(str(src))
    torch.manual_seed(4)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    tensors = {k: v.clone() for k, v in LlamaForCausalLM(text).state_dict().items()}
    tensors["model.mm_projector.weight"] = torch.randn(48, 32)
    tensors["model.mm_projector.bias"] = torch.randn(48)
    _write_sharded(src, tensors, 2)
    cfg = {k: v for k, v in text.to_dict().items() if k not in ("rope_parameters", "dtype")}
    cfg.update(
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "torch_dtype": "float32",
            "mm_vision_tower": "openai/clip-vit-large-patch14",
            "mm_hidden_size": 32,
            "mm_use_im_start_end": True,
            "mm_vision_select_layer": -2,
            "use_mm_proj": True,
            "sep_image_conv_front": False,
        }
    )
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    return src


def test_import_v10_needs_a_vision_tower_path(tmp_path, shared_dir):
    src = write_llava_med_v10(tmp_path)
    with pytest.raises(
        MedvlmError, match="stores no vision tower weights.*--vision-tower PATH.*openai/clip-vit-large-patch14"
    ):
        import_checkpoint(src, tmp_path / "m", "llava-med-v1.0")
    assert not (tmp_path / "m").exists()
    _clip_folder(tmp_path / "clip", seed=5)
    record = import_checkpoint(src, tmp_path / "m", "llava-med-v1.0", vision_tower=tmp_path / "clip")
    assert record["vision_tower"] == f"weights from {tmp_path / 'clip'}"
    model, processor = load_pretrained(tmp_path / "m")
    cfg = model.config
    assert (cfg.projector_type, cfg.template, cfg.mm_use_im_start_end, cfg.image_aspect) == (
        "linear",
        "llava_med_v0",
        True,
        "square",
    )
    tok = processor.tokenizer
    n = len(tok)
    assert tok.convert_tokens_to_ids(["<im_start>", "<im_end>", "<image>"]) == [n - 3, n - 2, n - 1]
    assert model.config.im_start_token_id == n - 3 and tok.pad_token == "[PAD]"
    source = _all_tensors(src)
    assert torch.equal(model.state_dict()["projector.weight"], source["model.mm_projector.weight"])
    sample = Sample(
        id="q",
        messages=[Message.from_text("user", "What is seen?\n<image>")],
        images=[str(shared_dir / "images" / "bio_patch.png")],
    )
    feats = processor.encode(sample, add_generation_prompt=True)
    ids = feats["input_ids"].tolist()
    assert ids.count(processor.image_token_id) == 16 and ids.count(cfg.im_start_token_id) == 1
    with torch.no_grad():
        assert torch.isfinite(
            model(input_ids=feats["input_ids"][None], pixel_values=feats["pixel_values"]).logits
        ).all()
    with pytest.raises(MedvlmError, match="projector_type 'linear' cannot be exported to llava-hf"):
        export_checkpoint(tmp_path / "m", tmp_path / "hf", "llava-hf")


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    src = write_llava_med_v10(tmp_path)
    # pickled shards: refused, never read
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    (pickled / "pytorch_model-00001-of-00002.bin").write_bytes(b"not read")
    with pytest.raises(
        MedvlmError,
        match=r"only has pickled weights \(pytorch_model-00001-of-00002.bin\).*never unpickles.*safetensors",
    ):
        import_checkpoint(pickled, tmp_path / "o", "llava-med-v1.0")
    # an index naming a missing shard
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MedvlmError, match="missing: model-00002-of-00002.safetensors"):
        import_checkpoint(src, tmp_path / "o", "llava-med-v1.0", vision_tower=tmp_path)
    with pytest.raises(MedvlmError, match="folder .*nope not found"):
        import_checkpoint(tmp_path / "nope", tmp_path / "o", "llava-med-v1.5")
    with pytest.raises(SystemExit) as e:
        cli_main(["model", "import", "--from", "llava-1.6", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown import format (--from) 'llava-1.6'" in err and "llava-med-v1.5" in err
    assert not (tmp_path / "o").exists()

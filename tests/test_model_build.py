"""Builders: compose from local tower + LM folders, the smol preset (real SmolLM2), preset errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.model.build import build_preset, compose, load_pretrained, save_checkpoint, sincos_positions
from medvlm.model.tokenizer import default_corpus

VISION = CLIPVisionConfig(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
)


def _write_lm(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny tied-embedding Llama + a tokenizer with neither <image> nor a pad token, as real LMs ship."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        default_corpus(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(hf),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    lm.save_pretrained(folder)
    hf.save_pretrained(folder)
    return lm, hf


def _write_tower(folder: Path, full_clip: bool) -> torch.nn.Module:
    torch.manual_seed(1)
    if full_clip:  # a full CLIP dual encoder + its image processor, as openai/clip-vit-* folders are
        text = CLIPTextConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        clip = CLIPModel(CLIPConfig(vision_config=VISION.to_dict(), text_config=text.to_dict()))
        clip.save_pretrained(folder)
        CLIPImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(folder)
        return clip.vision_model
    tower = CLIPVisionModel(VISION)
    tower.save_pretrained(folder)
    return tower


@pytest.mark.parametrize("full_clip", [True, False])
def test_compose_from_local_folders(tmp_path: Path, full_clip: bool, shared_dir: Path) -> None:
    lm, lm_tok = _write_lm(tmp_path / "lm")
    tower = _write_tower(tmp_path / "tower", full_clip)
    model, processor = compose(
        tmp_path / "tower",
        tmp_path / "lm",
        projector="linear",
        template="vicuna_v1",
        aspect="pad",
        mm_use_im_start_end=True,
    )
    # Tokens added: <image>, <im_start>, <im_end>; embeddings resized; LM head still tied.
    assert len(processor.tokenizer) == len(lm_tok) + 3
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(processor.tokenizer) == model.config.text_config.vocab_size
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert torch.equal(emb[: len(lm_tok)], lm.get_input_embeddings().weight)
    assert processor.pad_token_id == lm_tok.unk_token_id  # no pad in the LM tokenizer: unk, as LLaVA does
    # Pretrained weights carried over; the projector is new (stage-1 start).
    src = tower.state_dict()
    for k, v in model.vision_tower.state_dict().items():
        ref = src.get(k, src.get(k.removeprefix("vision_model.")))
        assert ref is not None and torch.equal(v, ref), k
    assert torch.equal(
        model.language_model.model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight
    )
    assert model.config.image_seq_length == 16 and model.config.mm_use_im_start_end
    expected_mean = [0.5, 0.5, 0.5] if full_clip else list(CLIPImageProcessorPil().image_mean)
    assert list(processor.image_processor.image_mean) == pytest.approx(expected_mean)
    # It runs, trains and survives a save/load.
    sample = Sample(
        id="c",
        messages=[Message.from_text("user", "<image>\nWhat is it?"), Message.from_text("assistant", "A radiograph.")],
        images=["synpic42202.jpg"],
    )
    feats = processor.encode(sample, image_folder=shared_dir / "images")
    ids = feats["input_ids"].tolist()
    assert ids.count(processor.im_start_token_id) == 1 and ids.count(processor.image_token_id) == 16
    model.train()
    loss = model(
        input_ids=feats["input_ids"][None], labels=feats["labels"][None], pixel_values=feats["pixel_values"]
    ).loss
    loss.backward()
    assert model.projector.weight.grad is not None
    model.eval()
    out = save_checkpoint(model, processor, tmp_path / "ckpt")
    loaded, _ = load_pretrained(out)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        args = dict(input_ids=feats["input_ids"][None], pixel_values=feats["pixel_values"])
        assert torch.equal(model(**args).logits, loaded(**args).logits)


def test_compose_refuses_pickled_language_model(tmp_path: Path) -> None:
    _write_lm(tmp_path / "lm")
    _write_tower(tmp_path / "tower", full_clip=False)
    (tmp_path / "lm" / "model.safetensors").rename(tmp_path / "lm" / "pytorch_model.bin")
    with pytest.raises(MedvlmError, match=r"language model folder .* only has pickled weights"):
        compose(tmp_path / "tower", tmp_path / "lm")
    with pytest.raises(MedvlmError, match="vision tower folder .* not found"):
        compose(tmp_path / "missing", tmp_path / "lm")


def test_preset_errors_are_clear() -> None:
    with pytest.raises(MedvlmError, match="unknown preset 'huge'; choose one of tiny, small, smol"):
        build_preset("huge")
    with pytest.raises(
        MedvlmError, match="unknown projector_type 'qformer'; choose one of linear, mlp2x_gelu, cluster"
    ):
        build_preset("tiny", projector="qformer")
    with pytest.raises(MedvlmError, match="image_size 70 must be a multiple of 8"):
        build_preset("tiny", image_size=70)
    with pytest.raises(MedvlmError, match="unknown chat template 'alpaca'"):
        build_preset("tiny", template="alpaca")
    with pytest.raises(MedvlmError, match="unknown image_aspect 'crop'"):
        build_preset("tiny", aspect="crop")


def test_from_scratch_presets_sizes_and_scratch_parts(tmp_path: Path) -> None:
    """tiny and small carry the demo's measured shape (patch 8, LM std 0.1 / 0.05) and say their parts are random."""
    tiny, proc = build_preset("tiny")
    assert tiny.config.image_seq_length == 64 and tiny.config.vision_feature_layer == -1
    assert tiny.config.text_config.num_hidden_layers == 3 and tiny.config.text_config.initializer_range == 0.1
    assert tiny.config.scratch_parts == ["vision_tower", "language_model"]
    small, _ = build_preset("small")
    n = sum(p.numel() for p in small.parameters())
    assert 20e6 <= n <= 30e6, n
    assert small.config.image_seq_length == 64 and small.config.scratch_parts == ["vision_tower", "language_model"]
    save_checkpoint(tiny, proc, tmp_path / "tiny")
    assert load_pretrained(tmp_path / "tiny")[0].config.scratch_parts == ["vision_tower", "language_model"]


def test_scratch_towers_start_with_exact_2d_sincos_positions(tmp_path: Path) -> None:
    """Row 1 + y * 8 + x of the tiny tower (64 px / patch 8 = 8 x 8 grid, width 64) is
    concat(sin(y w), cos(y w), sin(x w), cos(x w)), w_i = 1 / 10000 ** (i / 16); the class token's row is zero;
    the codes survive save / load and stay trainable."""
    import math

    tiny, proc = build_preset("tiny")
    w = tiny.vision_tower.embeddings.position_embedding.weight
    assert w.shape == (65, 64) and w.requires_grad
    y, x = 3, 5
    freqs = [1 / 10000 ** (i / 16) for i in range(16)]
    want = [math.sin(y * f) for f in freqs] + [math.cos(y * f) for f in freqs]
    want += [math.sin(x * f) for f in freqs] + [math.cos(x * f) for f in freqs]
    assert torch.allclose(w[1 + y * 8 + x], torch.tensor(want), atol=1e-6)
    assert torch.count_nonzero(w[0]) == 0
    small, _ = build_preset("small")
    ws = small.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(ws[1:], sincos_positions(8, 256))
    save_checkpoint(tiny, proc, tmp_path / "tiny")
    again = load_pretrained(tmp_path / "tiny")[0].vision_tower.embeddings.position_embedding.weight
    assert torch.equal(again, w)


def test_tiny_preset_is_deterministic_per_seed() -> None:
    a, _ = build_preset("tiny", seed=5)
    b, _ = build_preset("tiny", seed=5)
    c, _ = build_preset("tiny", seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_smol_preset_loads_real_smollm2() -> None:
    model, processor = build_preset("smol", projector="mlp2x_gelu", image_size=64)
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.tie_word_embeddings) == (576, 30, True)
    assert processor.template == "chatml" and processor.image_token_id == 49152
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == 49153
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not hasattr(model.config.text_config, "quantization_config")
    # Text-only question: the pretrained LM answers sensibly through the medvlm model and ChatML template.
    sample = Sample(
        id="q",
        messages=[
            Message.from_text("system", "You are a helpful assistant."),
            Message.from_text("user", "What is the capital of France?"),
        ],
    )
    answer = InferenceEngine(model, processor).generate([sample], GenerationSettings(max_new_tokens=12))[0]
    assert "Paris" in answer

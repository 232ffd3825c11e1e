"""The medvlm model on the HF stack: trainable parts, save/load, KV cache, checkpointing, PEFT, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig

from medvlm.data.collate import VLMCollator
from medvlm.data.schema import Message, Sample
from medvlm.data.templates import ImageTruncationError
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset, load_pretrained, save_checkpoint
from medvlm.model.config import MedVLMConfig
from medvlm.model.modeling import MedVLMForConditionalGeneration
from medvlm.model.parts import PARTS, parameter_counts, set_trainable, trainable_summary
from medvlm.notice import NOTICE

IMAGES = ("synpic42202.jpg", "synpic32933.jpg", "med_img_1.png", "bio_patch.png")


def _sample(i: int, question: str, answer: str, n_images: int = 1) -> Sample:
    text = "<image>\n" * n_images + question
    return Sample(
        id=f"s{i}",
        messages=[Message.from_text("user", text), Message.from_text("assistant", answer)],
        images=[IMAGES[(i + k) % len(IMAGES)] for k in range(n_images)],
    )


SAMPLES = [
    _sample(0, "What modality is this image?", "A chest radiograph."),
    _sample(1, "Is there free air under the right hemidiaphragm?", "Yes, there is free air."),
    _sample(2, "Describe the findings.", "A coronal abdominal CT with normal liver and kidneys.", n_images=2),
    _sample(3, "What tissue is shown?", "Histology."),
]


def _prompt(sample: Sample) -> Sample:
    """The sample's question only (for generation)."""
    return Sample(id=sample.id, messages=sample.messages[:1], images=sample.images)


def _batch(processor, shared_dir: Path, samples=SAMPLES) -> dict:
    feats = [processor.encode(s, image_folder=shared_dir / "images") for s in samples]
    return VLMCollator(pad_token_id=processor.pad_token_id)(feats)


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", projector="mlp2x_gelu", seed=0)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "cluster"])
def test_projector_only_training_changes_only_the_projector(projector: str, shared_dir: Path) -> None:
    model, processor = build_preset("tiny", projector=projector, seed=1)
    model.train()
    set_trainable(model, vision_tower=False, projector=True, language_model=False)
    summary = trainable_summary(model)
    assert summary["projector"][0] == summary["projector"][1] > 0
    assert summary["vision_tower"][0] == 0 and summary["language_model"][0] == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The optimizer sees every parameter (as a careless trainer would); freezing alone must protect them.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = model(**_batch(processor, shared_dir)).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    projector_params = {n for n in before if n.startswith("projector.")}
    unused = {"projector.ln_1.weight", "projector.ln_1.bias"}  # cluster: kept for published weights, unused
    assert changed == projector_params - unused
    for n, p in model.named_parameters():
        if not n.startswith("projector."):
            assert p.grad is None, n


def test_parts_cover_every_parameter(tiny) -> None:
    model, _ = tiny
    counts = parameter_counts(model)
    assert set(counts) == {*PARTS, "total"}
    assert sum(counts[p] for p in PARTS) == counts["total"]


def test_save_load_round_trip_is_exact_and_safetensors_only(tiny, tmp_path: Path, shared_dir: Path) -> None:
    model, processor = tiny
    out = save_checkpoint(model, processor, tmp_path / "ckpt", extra_files={"notes.txt": "hello", "run.json": {"a": 1}})
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "medvlm_processor.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "README.md",
        "notes.txt",
        "run.json",
        "trainable_parts.json",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert json.loads((out / "run.json").read_text()) == {"a": 1}
    card = (out / "README.md").read_text()
    assert NOTICE in card
    assert "mlp2x_gelu" in card and "LlamaForCausalLM" in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "medvlm"
    assert not list(tmp_path.glob(".ckpt*")), "temporary folders must not be left behind"

    loaded, proc2 = load_pretrained(out)
    assert type(loaded) is MedVLMForConditionalGeneration
    assert proc2.to_dict() == processor.to_dict() and proc2.image_token_id == processor.image_token_id
    batch = _batch(processor, shared_dir)
    batch2 = _batch(proc2, shared_dir)
    for k in batch:
        assert torch.equal(batch[k], batch2[k]), k
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_load_pretrained_refuses_pickles_and_missing_files(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    with pytest.raises(MedvlmError, match="not found"):
        load_pretrained(tmp_path / "nope")
    ckpt = save_checkpoint(model, processor, tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(MedvlmError, match=r"only has pickled weights \(pytorch_model.bin\).*safetensors only"):
        load_pretrained(ckpt)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(MedvlmError, match="no weights"):
        load_pretrained(ckpt)
    ckpt2 = save_checkpoint(model, processor, tmp_path / "ckpt2")
    (ckpt2 / "medvlm_processor.json").unlink()
    with pytest.raises(MedvlmError, match="medvlm_processor.json"):
        load_pretrained(ckpt2)


def test_generate_same_with_and_without_kv_cache(tiny, shared_dir: Path) -> None:
    model, processor = tiny
    model.eval()
    feats = processor.encode(_prompt(SAMPLES[2]), image_folder=shared_dir / "images", add_generation_prompt=True)
    ids = feats["input_ids"][None]
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=feats["pixel_values"],
        max_new_tokens=12,
        do_sample=False,
        min_new_tokens=12,
    )
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = model.generate(**kw, use_cache=True)
        uncached = model.generate(**kw, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 12
    assert torch.equal(cached, uncached)
    # The KV cache reaches the LM under the name the installed transformers uses (renamed in 5.25).
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_gradient_checkpointing_reaches_tower_and_lm_and_keeps_grads(shared_dir: Path) -> None:
    model, processor = build_preset("tiny", projector="cluster", seed=2)
    model.train()
    batch = _batch(processor, shared_dir)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = loss_and_grads()
    model.gradient_checkpointing_enable()  # library defaults, as the HF Trainer / TRL call it
    assert model.vision_tower.encoder.gradient_checkpointing
    assert model.language_model.model.gradient_checkpointing
    loss1, grads1 = loss_and_grads()
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert grads1.keys() == grads0.keys() and any(n.startswith("vision_tower.") for n in grads1)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_peft_lora_on_the_language_model_trains(shared_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, processor = build_preset("tiny", projector="linear", seed=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"language_model\..*\.(q_proj|v_proj)", task_type="CAUSAL_LM")
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global RNG: make them independent of test order
    peft_model = get_peft_model(model, config)
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and ".language_model." in n for n in lora)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    batch = _batch(processor, shared_dir)
    losses = []
    for _ in range(3):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, lora[n]) for n, p in peft_model.named_parameters() if n in lora)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    peft_model.eval()
    feats = processor.encode(_prompt(SAMPLES[0]), image_folder=shared_dir / "images", add_generation_prompt=True)
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=feats["input_ids"][None], pixel_values=feats["pixel_values"], max_new_tokens=3, do_sample=False
        )
    assert out.shape[1] >= feats["input_ids"].shape[0] + 1


def test_no_split_modules_and_attention_implementation(tiny) -> None:
    model, _ = tiny
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)
    eager = MedVLMForConditionalGeneration._from_config(model.config, attn_implementation="eager")
    assert eager.language_model.config._attn_implementation == "eager"
    assert eager.vision_tower.config._attn_implementation == "eager"
    sdpa = MedVLMForConditionalGeneration._from_config(model.config, attn_implementation="sdpa")
    assert sdpa.language_model.config._attn_implementation == "sdpa"


def test_siglip_tower_keeps_all_tokens_and_clip_cls_patch_adds_one() -> None:
    lm = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    ).to_dict()
    sig = SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    ).to_dict()
    model = MedVLMForConditionalGeneration(
        MedVLMConfig(vision_config=sig, text_config=lm, image_token_id=5, image_seq_length=16, projector_type="linear")
    )
    assert model.get_image_features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    with pytest.raises(MedvlmError, match="'cls_patch' needs a tower with a CLS token"):
        MedVLMForConditionalGeneration(
            MedVLMConfig(
                vision_config=sig,
                text_config=lm,
                image_token_id=5,
                image_seq_length=17,
                vision_feature_select_strategy="cls_patch",
            )
        )
    clip = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    ).to_dict()
    model = MedVLMForConditionalGeneration(
        MedVLMConfig(
            vision_config=clip,
            text_config=lm,
            image_token_id=5,
            image_seq_length=17,
            vision_feature_select_strategy="cls_patch",
        )
    )
    assert model.get_image_features(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_image_count_and_token_mismatches_are_clear_errors(tiny, shared_dir: Path) -> None:
    model, processor = tiny
    bad = Sample(id="rec-7", messages=SAMPLES[0].messages, images=["a.png", "b.png"])
    with pytest.raises(MedvlmError, match=r"sample 'rec-7': the conversation has 1 image part\(s\) but 2 image\(s\)"):
        processor.encode(bad)
    missing = Sample(id="rec-8", messages=SAMPLES[0].messages, images=["missing.png"])
    with pytest.raises(MedvlmError, match=r"sample 'rec-8'.*missing.png"):
        processor.encode(missing, image_folder=shared_dir / "images")
    batch = _batch(processor, shared_dir, SAMPLES[:2])
    with pytest.raises(MedvlmError, match=r"has 128 <image> tokens but 3 image\(s\) x 64 features"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2)[:3])
    with pytest.raises(MedvlmError, match="128 <image> tokens but no pixel_values"):
        model(input_ids=batch["input_ids"])


def test_truncation_into_image_tokens_is_a_clear_error(tiny, shared_dir: Path) -> None:
    model, processor = tiny
    full = processor.encode(SAMPLES[1], image_folder=shared_dir / "images")
    first_image = full["input_ids"].tolist().index(processor.image_token_id)
    with pytest.raises(ImageTruncationError, match=r"sample 's1': max_length .* would cut image tokens"):
        processor.encode(SAMPLES[1], image_folder=shared_dir / "images", max_length=first_image + 3)
    keep = first_image + model.config.image_seq_length + 4  # every image token and a few text tokens
    assert full["input_ids"].shape[0] > keep
    ok = processor.encode(SAMPLES[1], image_folder=shared_dir / "images", max_length=keep)
    assert ok["input_ids"].shape[0] == keep


def test_preprocess_images_pads_to_square_with_mean_colour(tiny, shared_dir: Path) -> None:
    from medvlm.data.images import load_image

    _, processor = tiny
    img = load_image(shared_dir / "images" / "med_img_1.png")  # 593 x 756, not square
    assert processor.image_aspect == "pad" and img.size[0] != img.size[1]
    pixels = processor.preprocess_images([img, img])
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    # The pad bands (left/right of the tall image) are the CLIP mean colour -> ~0 after normalisation.
    assert pixels[0, :, 32, 0].abs().max() < 0.02


def test_hf_trainer_trains_with_gradient_checkpointing(tmp_path: Path, shared_dir: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model, processor = build_preset("tiny", projector="cluster", seed=5)
    set_trainable(model, vision_tower=False, projector=True, language_model=True)
    feats = [processor.encode(s, image_folder=shared_dir / "images") for s in SAMPLES] * 2
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=5e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        bf16=False,
        remove_unused_columns=False,
        gradient_checkpointing=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model, args=args, train_dataset=feats, data_collator=VLMCollator(pad_token_id=processor.pad_token_id)
    )
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projector", "language_model"}

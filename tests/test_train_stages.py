"""Which parameters change in each stage (align, sft full, sft lora), the loss falls, bad input stops early."""

from __future__ import annotations

import json

import pytest
import torch

from medvlm.errors import MedvlmError
from medvlm.model.build import PRESET_TEMPLATES, build_preset, load_pretrained
from medvlm.train.run import run_training
from train_helpers import changed, make_demo, small_config, state


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("train_stages"))


def _initial(**kw):
    model, _ = build_preset("tiny", seed=42, **kw)
    return state(model)


def test_align_trains_only_the_projector(demo, tmp_path):
    before = _initial()
    cfg = small_config(demo, tmp_path / "align", stage="align", data_path=str(demo / "alignment.json"))
    result = run_training(cfg)
    model, processor = load_pretrained(tmp_path / "align")  # the output_dir is a loadable checkpoint
    after = state(model)
    assert all(changed(before, after, "projector.").values())
    assert not any(changed(before, after, "vision_tower.").values())
    assert not any(changed(before, after, "language_model.").values())
    assert result.steps == 3 and result.final_loss is not None
    # The checkpoint carries the run's config, data manifest and the processor's template.
    out = tmp_path / "align"
    assert "stage: align" in (out / "train_config.yaml").read_text()
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["files"][0]["sha256"] and manifest["samples"] == manifest["files"][0]["drawn"] > 0
    assert processor.template == model.config.template == PRESET_TEMPLATES["tiny"] == "mistral_instruct"
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 3


def test_align_with_im_start_end_trains_only_those_embedding_rows(demo, tmp_path):
    before = _initial(mm_use_im_start_end=True)
    cfg = small_config(
        demo,
        tmp_path / "align_se",
        stage="align",
        data_path=str(demo / "alignment.json"),
        model_kwargs={"mm_use_im_start_end": True},
        weight_decay=0.1,
    )
    run_training(cfg)
    model, _ = load_pretrained(tmp_path / "align_se")
    after = state(model)
    emb_key = "language_model.model.embed_tokens.weight"
    rows = [model.config.im_start_token_id, model.config.im_end_token_id]
    diff_rows = (before[emb_key] != after[emb_key]).any(dim=1).nonzero().flatten().tolist()
    assert sorted(diff_rows) == sorted(rows)
    others = {k: v for k, v in changed(before, after, "language_model.").items() if k != emb_key}
    assert not any(others.values())
    assert not any(changed(before, after, "vision_tower.").values())
    assert all(changed(before, after, "projector.").values())


def test_sft_full_trains_projector_and_lm_but_not_the_tower(demo, tmp_path):
    before = _initial()
    run_training(small_config(demo, tmp_path / "sft"))
    after = state(load_pretrained(tmp_path / "sft")[0])
    assert all(changed(before, after, "projector.").values())
    lm = changed(before, after, "language_model.")
    assert sum(lm.values()) >= 0.9 * len(lm)  # every LM tensor that takes part in the loss moved
    assert lm["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert not any(changed(before, after, "vision_tower.").values())


def test_sft_lora_trains_adapters_and_projector_and_saves_merged_weights(demo, tmp_path):
    before = _initial()
    out = tmp_path / "lora"
    run_training(
        small_config(
            demo,
            out,
            tune="lora",
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            lora_target_modules=["q_proj", "v_proj"],
            learning_rate=5e-3,
        )
    )
    after = state(load_pretrained(out)[0])  # merged weights: a plain medvlm checkpoint
    assert all(changed(before, after, "projector.").values())
    assert not any(changed(before, after, "vision_tower.").values())
    lm = changed(before, after, "language_model.")
    targets = {k for k in lm if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert targets and all(lm[k] for k in targets)
    assert not any(v for k, v in lm.items() if k not in targets)  # norms, embeddings, MLPs, k/o untouched
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and "projector" in adapter_cfg["modules_to_save"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_loss_falls_on_the_demo_dataset(demo, tmp_path):
    result = run_training(
        small_config(demo, tmp_path / "fall", max_steps=24, learning_rate=3e-3, per_device_train_batch_size=8)
    )
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses


def _no_training_happened(out):
    return not out.exists() or not any(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "over, message",
    [
        ({"image_folder": "/nonexistent/images"}, "image_folder /nonexistent/images: folder not found"),
        ({"template": "plain"}, "template 'plain' .* only stage 'align' trains with it, not 'sft'"),
        ({"global_batch_size": 10, "per_device_train_batch_size": 4}, "global_batch_size 10 is not divisible"),
        (
            {"tune": "lora", "lora_target_modules": ["q_proj", "query_key_value"]},
            r"lora_target_modules \['query_key_value'\] match no linear layer",
        ),
        ({"tune": "qlora"}, "qlora needs a CUDA GPU"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(demo, tmp_path, over, message):
    out = tmp_path / "bad"
    with pytest.raises(MedvlmError, match=message):
        run_training(small_config(demo, out, **over))
    assert _no_training_happened(out)


def test_missing_image_files_are_named_or_skipped(demo, tmp_path):
    rows = json.loads((demo / "vqa" / "train.json").read_text())[:12]
    rows[3]["image"] = "does_not_exist.png"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    with pytest.raises(MedvlmError, match="1 record\\(s\\) name an image file that does not exist.*does_not_exist.png"):
        run_training(small_config(demo, tmp_path / "o1", data_path=str(data)))
    result = run_training(
        small_config(demo, tmp_path / "o2", data_path=str(data), skip_missing_images=True, max_steps=1)
    )
    assert result.manifest["dropped"] == {"missing_image": 1} and result.manifest["samples"] == 11


def test_image_truncation_drops_and_counts(demo, tmp_path):
    # 16 image tokens + the prompt do not fit in 20 tokens: every sample would cut its image -> dropped, counted.
    with pytest.raises(MedvlmError, match="no trainable record.*image_truncated"):
        run_training(small_config(demo, tmp_path / "o", max_length=20))
    torch.manual_seed(0)

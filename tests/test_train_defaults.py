"""Stage defaults follow the starting model: random parts (tiny/small presets) train, get their own rates and epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from medvlm.data.readers import read_samples
from medvlm.errors import MedvlmError
from medvlm.train.config import load_config
from medvlm.train.data import augment_image, grouped_sources
from medvlm.train.run import run_training
from medvlm.train.stages import DEFAULT_BATCH, PUBLISHED_LR, SCRATCH, plan_stage, resolve_epochs, resolve_stage_defaults


def _cfg(tmp_path: Path, **over):
    keys = {"stage": "sft", "preset": "tiny", "data_path": str(tmp_path / "d.json"), "output_dir": str(tmp_path / "o")}
    keys.update(over)
    return load_config(None, keys)


class _ModelConfig:
    mm_use_im_start_end = False


def test_scratch_presets_take_every_default_from_the_scratch_recipe(tmp_path: Path) -> None:
    align = resolve_stage_defaults(_cfg(tmp_path, stage="align"))
    got = (align.tune_vision_tower, align.tune_language_model, align.learning_rate, align.image_augment)
    assert got == (SCRATCH.train_random_parts, SCRATCH.train_random_parts, SCRATCH.align_lr, SCRATCH.image_augment)
    assert (align.group_by_image, align.scratch_samples, align.num_train_epochs) == (
        SCRATCH.align_group_by_image,
        SCRATCH.align_samples,
        None,
    )
    assert align.per_device_train_batch_size == SCRATCH.batch_size
    plan = plan_stage(align, _ModelConfig())
    assert (plan.vision_tower, plan.projector, plan.language_model) == (True, True, True)
    sft = resolve_stage_defaults(_cfg(tmp_path))
    assert (sft.tune_vision_tower, sft.learning_rate, sft.num_train_epochs) == (True, SCRATCH.sft_lr, None)
    assert (sft.scratch_samples, sft.per_device_train_batch_size) == (SCRATCH.sft_samples, SCRATCH.batch_size)
    # align merges an image's questions (dense supervision for the random tower), sft asks one at a time
    assert (align.group_by_image, sft.group_by_image) == (True, False)
    # merged conversations put the yes/no questions last; a run that does not merge has nothing to order
    assert (align.group_yes_no_last, sft.group_yes_no_last) == (SCRATCH.group_yes_no_last, None) == (True, None)
    with pytest.raises(MedvlmError, match="group_yes_no_last: false orders merged conversations, but group_by_image"):
        _cfg(tmp_path, group_yes_no_last=False)
    # merging writes LLaVA JSON: with another data_format given, the default stays off instead of failing the run
    assert resolve_stage_defaults(_cfg(tmp_path, stage="align", data_format="llava")).group_by_image is False
    resolved = resolve_epochs(sft, 400)
    assert (resolved.num_train_epochs, resolved.scratch_samples) == (float(-(-SCRATCH.sft_samples // 400)), None)
    # the recipe differs from the published one where it says so
    assert (SCRATCH.align_lr, SCRATCH.sft_lr) != (PUBLISHED_LR["align"], PUBLISHED_LR["sft"])
    # smol: a pretrained LM, a random tower
    smol = resolve_stage_defaults(_cfg(tmp_path, stage="align", preset="smol"))
    assert (smol.tune_vision_tower, smol.tune_language_model, smol.learning_rate) == (True, None, SCRATCH.align_lr)
    smol_sft = resolve_stage_defaults(_cfg(tmp_path, preset="smol"))
    assert smol_sft.learning_rate == PUBLISHED_LR["sft"]  # its LM is pretrained
    # explicit keys always win
    own = resolve_stage_defaults(
        _cfg(
            tmp_path,
            stage="align",
            tune_vision_tower=False,
            learning_rate=3e-3,
            num_train_epochs=2,
            image_augment=False,
        )
    )
    assert (own.tune_vision_tower, own.learning_rate, own.num_train_epochs, own.image_augment) == (
        False,
        3e-3,
        2.0,
        False,
    )
    assert own.scratch_samples is None
    budget = resolve_stage_defaults(_cfg(tmp_path, scratch_samples=50))
    assert resolve_epochs(budget, 20).num_train_epochs == 3.0
    with pytest.raises(MedvlmError, match="num_train_epochs .* and scratch_samples .* both set"):
        resolve_stage_defaults(_cfg(tmp_path, num_train_epochs=2, scratch_samples=50))


def test_pretrained_checkpoints_keep_llava_med_defaults(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "medvlm"}))
    align = resolve_stage_defaults(_cfg(tmp_path, stage="align", preset=None, model_name_or_path=str(ckpt)))
    assert (
        align.tune_vision_tower,
        align.tune_language_model,
        align.learning_rate,
        align.num_train_epochs,
        align.image_augment,
        align.group_by_image,
    ) == (False, None, 2e-3, 1.0, False, False)
    assert align.per_device_train_batch_size == DEFAULT_BATCH
    assert plan_stage(align, _ModelConfig()).language_model is False
    sft = resolve_stage_defaults(_cfg(tmp_path, preset=None, model_name_or_path=str(ckpt)))
    assert (sft.learning_rate, sft.num_train_epochs) == (2e-5, 1.0)
    # STLLaVA-Med's stages keep their own semantics even on a tiny model
    sq = resolve_stage_defaults(_cfg(tmp_path, stage="sq"))
    assert (sq.tune_vision_tower, sq.learning_rate, sq.num_train_epochs, sq.image_augment, sq.group_by_image) == (
        False,
        2e-5,
        1.0,
        None,
        None,
    )  # keys sq does not read stay unset
    (ckpt / "config.json").write_text(json.dumps({"scratch_parts": "vision_tower"}))
    with pytest.raises(MedvlmError, match="scratch_parts must be a list"):
        resolve_stage_defaults(_cfg(tmp_path, preset=None, model_name_or_path=str(ckpt)))


def _vqa(tmp_path: Path) -> Path:
    recs = []
    for i in range(6):
        recs.append(
            {
                "id": i,
                "image": f"im{i // 3}.png",
                "answer_type": "OPEN",
                "question_type": "X",
                "conversations": [{"from": "human", "value": f"<image>\nq{i}?"}, {"from": "gpt", "value": f"a{i}"}],
            }
        )
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs))
    return p


def test_grouped_sources_merge_an_images_questions_once(tmp_path: Path) -> None:
    src = _vqa(tmp_path)
    cfg = _cfg(tmp_path, group_by_image=True)
    (grouped,) = grouped_sources(cfg)
    assert Path(grouped.path).parent == tmp_path / "o" / "grouped"
    samples = list(read_samples(grouped.path))
    assert len(samples) == 2 and sorted(len(s.messages) for s in samples) == [6, 6]
    assert grouped_sources(_cfg(tmp_path, group_by_image=False))[0].path == str(src)
    # the merged file holds each image's open answers before its yes/no answers (group_yes_no_last, on by default)
    recs = json.loads(src.read_text())
    for r in recs[::2]:
        r["conversations"][1]["value"] = "no"
    src.write_text(json.dumps(recs))
    for last, want in ((True, True), (False, False)):
        (grouped,) = grouped_sources(_cfg(tmp_path, group_by_image=True, group_yes_no_last=last, seed=0))
        answers = [[m.text for m in s.messages if m.role == "assistant"] for s in read_samples(grouped.path)]
        assert all(a == sorted(a, key=lambda t: t == "no") for a in answers) is want, answers
    assert grouped_sources(_cfg(tmp_path, stage="sq"))[0].path == str(src)
    # a file where no image has two questions (captions) is used as it is
    caps = tmp_path / "caps.json"
    caps.write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "image": f"im{i}.png",
                    "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "c"}],
                }
                for i in range(3)
            ]
        )
    )
    assert grouped_sources(_cfg(tmp_path, data_path=str(caps), group_by_image=True))[0].path == str(caps)


def test_augment_keeps_size_and_side(tmp_path: Path) -> None:
    img = Image.new("RGB", (64, 64), (20, 20, 20))
    img.paste((250, 250, 40), (8, 24, 20, 36))  # a lesion in the left half
    torch.manual_seed(0)
    outs = [augment_image(img, SCRATCH.augment_shift, SCRATCH.augment_jitter) for _ in range(8)]
    assert all(o.size == (64, 64) for o in outs)
    assert any(o.tobytes() != img.tobytes() for o in outs)
    for o in outs:
        px = o.load()
        bright = [x for x in range(64) for y in range(64) if px[x, y][0] > 150]
        assert bright and max(bright) < 32  # still entirely in the left half


def test_run_training_alone_refuses_an_eval_set(tmp_path: Path) -> None:
    _vqa(tmp_path)
    with pytest.raises(MedvlmError, match="run_training alone does not evaluate"):
        run_training(_cfg(tmp_path, eval_data_path=str(tmp_path / "d.json")))


def test_contradicting_keys_are_refused_up_front(tmp_path: Path) -> None:
    from medvlm.train.setup import use_feature_cache

    _vqa(tmp_path)
    with pytest.raises(MedvlmError, match="group_by_image: true writes LLaVA JSON, so it needs data_format: auto"):
        grouped_sources(_cfg(tmp_path, data_format="llava", group_by_image=True))
    frozen = _cfg(tmp_path, tune_vision_tower=False, feature_cache="on", image_augment=True)
    with pytest.raises(MedvlmError, match="image_augment: true changes the image at every read"):
        use_feature_cache(frozen, tower_trains=False)
    assert use_feature_cache(_cfg(tmp_path, tune_vision_tower=False, image_augment=False), tower_trains=False)

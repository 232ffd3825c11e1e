"""STLLaVA-Med stage 1 (``stage: sq``): VUSER conversion, its label masks, ViT-LoRA that really trains."""

from __future__ import annotations

import pytest

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.data.sq import sq_rng, to_self_questioning, vuser_turns
from medvlm.data.templates import encode_conversation
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset, load_pretrained
from medvlm.model.vit_lora import LoraSpec, apply_lora_adapters, lora_parameter_names
from medvlm.train.run import run_training
from medvlm.train.self_training import self_training_groups
from train_helpers import changed, make_demo, small_config, state


def _conversation(n_turns: int, image_in_turn: int | None = None) -> Sample:
    msgs = [
        Message("user", [image_part(), text_part("question zero")]),
        Message("assistant", [text_part("answer zero")]),
    ]
    images = ["a.png"]
    for k in range(1, n_turns):
        content = [text_part(f"question {k}")]
        if k == image_in_turn:
            content = [image_part(), *content]
            images.append("b.png")
        msgs += [Message("user", content), Message("assistant", [text_part(f"answer {k}")])]
    return Sample("s", msgs, images)


def test_vuser_conversion_rate_first_turn_and_seeding():
    sample = _conversation(11, image_in_turn=5)
    converted = total = 0
    for i in range(400):
        out = to_self_questioning(sample, 0.5, sq_rng(7, 0, i))
        users = [m for m in out.messages if m.role in ("user", "vuser")]
        assert users[0].role == "user"  # the image-bearing first turn never becomes VUSER
        assert users[5].role == "user"  # nor does a later turn that carries an image
        assert [m.role for m in out.messages[1::2]] == ["assistant"] * 11  # answers untouched
        assert [m.text for m in out.messages] == [m.text for m in sample.messages]
        converted += vuser_turns(out)
        total += 9  # turns 1..10 except the image turn
    assert 0.45 < converted / total < 0.55
    assert vuser_turns(to_self_questioning(sample, 0.0, sq_rng(0, 0, 0))) == 0
    assert vuser_turns(to_self_questioning(sample, 1.0, sq_rng(0, 0, 0))) == 9

    # Same (seed, epoch, index): same draw; a new epoch re-draws.
    def draws(seed, epoch):
        return [[m.role for m in to_self_questioning(sample, 0.5, sq_rng(seed, epoch, i)).messages] for i in range(20)]

    assert draws(3, 0) == draws(3, 0)
    assert draws(3, 0) != draws(3, 1)
    text_only = Sample(
        "t",
        [
            Message("user", [text_part("q")]),
            Message("assistant", [text_part("a")]),
            Message("user", [text_part("q2")]),
            Message("assistant", [text_part("a2")]),
        ],
    )
    assert to_self_questioning(text_only, 1.0, sq_rng(0, 0, 0)) is text_only
    with pytest.raises(MedvlmError, match="sq_r"):
        to_self_questioning(sample, 1.5, sq_rng(0, 0, 0))


def test_vuser_labels_learn_questions_only_in_vuser_turns():
    _, proc = build_preset("tiny", template="v1_sq", projector="cluster")
    tok = proc.tokenizer
    msgs = [
        Message("user", [image_part(), text_part("where is the lesion")]),
        Message("assistant", [text_part("left lung")]),
        Message("vuser", [text_part("how large is the mass")]),
        Message("assistant", [text_part("small nodule")]),
        Message("user", [text_part("what modality")]),
        Message("assistant", [text_part("chest radiograph")]),
    ]
    enc = encode_conversation(msgs, tok, "v1_sq", image_seq_length=proc.image_seq_length)
    assert enc.straddles == 0
    learned = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    text = tok.decode(learned)
    for s in ("how large is the mass", "left lung", "small nodule", "chest radiograph"):
        assert s in text
    for s in ("where is the lesion", "what modality", "USER", "ASSISTANT", "research assistant"):
        assert s not in text
    # The VUSER question's end token (EOS) is learned: 3 answers + 1 question end with EOS.
    assert learned.count(tok.eos_token_id) == 4
    # The same turn as a USER turn teaches nothing about the question.
    as_user = [Message(m.role if m.role != "vuser" else "user", m.content) for m in msgs]
    enc_u = encode_conversation(as_user, tok, "v1_sq", image_seq_length=proc.image_seq_length)
    assert "how large" not in tok.decode([t for t, lab in zip(enc_u.input_ids, enc_u.labels) if lab != -100])


def test_vit_lora_spec_groups_and_dropouts():
    model, _ = build_preset("tiny", template="v1_sq", projector="cluster", feature_layer=-2)
    peft = apply_lora_adapters(
        model,
        LoraSpec(8, 16, 0.05, ["q_proj", "v_proj"]),
        LoraSpec(4, 8, 0.2, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        modules_to_save=["projector"],
    )
    vit = lora_parameter_names(peft, "vision_tower")
    # Every feature-feeding encoder layer (tiny: 2 layers, features from layer -2 -> layer 0 only) x 6 linears x A/B.
    assert len(vit) == 12 and all("encoder.layers.0." in n for n in vit)
    a = dict(peft.named_parameters())
    assert all(a[n].shape[0 if "lora_A" in n else 1] == 4 for n in vit)  # vision rank 4, LM rank 8
    lm = lora_parameter_names(peft, "language_model")
    assert lm and all(a[n].shape[0 if "lora_A" in n else 1] == 8 for n in lm)
    drops = {n: m.lora_dropout["default"] for n, m in peft.named_modules() if hasattr(m, "lora_dropout")}
    assert all(d.p == 0.2 for n, d in drops.items() if ".vision_tower." in n)
    assert all(d.p == 0.05 for n, d in drops.items() if ".language_model." in n)
    groups = {g["name"]: g for g in self_training_groups(peft, 0.0, 2e-5, 5e-5)}
    assert groups["vision_no_decay"]["lr"] == 5e-5 and groups["projector_no_decay"]["lr"] == 2e-5
    assert "lr" not in groups["lm_no_decay"]  # the run's learning_rate (LM-LoRA)
    assert {id(p) for p in groups["vision_no_decay"]["params"]} == {id(a[n]) for n in vit}
    with pytest.raises(MedvlmError, match="match no linear layer"):
        apply_lora_adapters(build_preset("tiny")[0], None, LoraSpec(4, 8, 0.1, ["qkv"]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("stllava_sq"), n_images=16)


def _sq_config(demo, out, **over):
    keys = dict(
        stage="sq",
        model_kwargs={"template": "v1_sq", "vision_feature_layer": -2},
        projector_type="cluster",
        data_path=str(demo / "instruct.json"),
        tune="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        vit_lora_dropout=0.0,
        max_steps=2,
        learning_rate=5e-3,
        projector_lr=5e-3,
        vision_lr=5e-3,
        per_device_train_batch_size=2,
    )
    keys.update(over)
    return small_config(demo, out, **keys)


@pytest.mark.parametrize("mode", ["trained", "published"])
def test_sq_vit_lora_gradients_reach_the_tower_unless_published(demo, tmp_path, mode):
    before = state(build_preset("tiny", seed=42, template="v1_sq", projector="cluster", feature_layer=-2)[0])
    out = tmp_path / mode
    result = run_training(_sq_config(demo, out, vit_lora_grad=mode))
    model, processor = load_pretrained(out)  # merged: a plain medvlm checkpoint
    assert processor.template == "v1_sq" and model.config.projector_type == "cluster"
    after = state(model)
    tower = changed(before, after, "vision_tower.")
    adapted = {
        k: v
        for k, v in tower.items()
        if "encoder.layers.0." in k
        and k.endswith("proj.weight")
        or "encoder.layers.0.mlp.fc" in k
        and k.endswith(".weight")
    }
    assert len(adapted) == 6
    if mode == "trained":
        assert all(adapted.values())  # ViT-LoRA learned and was merged into the tower
    else:
        assert not any(tower.values())  # the published no_grad tower: its ViT-LoRA never trains
    assert not any(v for k, v in tower.items() if k not in adapted)  # everything else in the tower frozen
    # The whole projector trains (its ln_1 is unused by the published forward, so it never moves).
    assert all(v for k, v in changed(before, after, "projector.").items() if ".ln_1." not in k)
    assert changed(before, after, "language_model.")["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert result.steps == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("tune", ["lora", "full"])
def test_sq_full_tower_option_trains_every_tower_weight_at_the_vision_lr(demo, tmp_path, tune):
    """``tune_vision_tower: true`` + ``vit_lora: false`` (a named deviation): the whole tower learns, no ViT-LoRA."""
    before = state(build_preset("tiny", seed=42, template="v1_sq", projector="cluster", feature_layer=-2)[0])
    out = tmp_path / tune
    run_training(_sq_config(demo, out, tune=tune, tune_vision_tower=True, vit_lora=False, vision_lr=5e-3))
    after = state(load_pretrained(out)[0])
    tower = changed(before, after, "vision_tower.")
    moved = [k for k, v in tower.items() if v]
    # Every weight that feeds the features moves (the tiny tower's features come from layer -2, i.e. layer 0), norms
    # and embeddings included; ViT-LoRA would only touch the six adapted linears.
    feeding = [k for k in tower if ".encoder.layers.0." in k or ".embeddings." in k]
    assert len(feeding) > 6 and all(tower[k] for k in feeding), moved
    assert not any(tower[k] for k in tower if ".encoder.layers.1." in k)  # unused by the features: no gradient
    assert changed(before, after, "language_model.")["language_model.model.layers.0.self_attn.q_proj.weight"]
    if tune == "lora":  # no ViT-LoRA in the adapter: the tower is saved whole with it
        from safetensors import safe_open

        with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "vision_tower" in k and "lora_" in k]
        assert [k for k in keys if "vision_tower" in k]


def test_sq_full_tower_option_is_explicit_and_sq_only(demo, tmp_path):
    with pytest.raises(MedvlmError, match="vit_lora: false"):  # both at once is ambiguous
        run_training(_sq_config(demo, tmp_path / "a", tune_vision_tower=True))
    with pytest.raises(
        MedvlmError, match="tune_vision_tower is not used by stage 'dpo' .it applies to stages align, sft, sq."
    ):
        run_training(_sq_config(demo, tmp_path / "b", stage="dpo", tune_vision_tower=True, vit_lora=False))


def test_sq_refuses_a_model_without_the_v1_sq_template(demo, tmp_path):
    with pytest.raises(MedvlmError, match="v1_sq"):
        run_training(_sq_config(demo, tmp_path / "x", model_kwargs={}))


def test_sq_dataset_redraws_each_epoch_and_learns_more_tokens(demo):
    from types import SimpleNamespace

    from medvlm.train.config import DataSource
    from medvlm.train.data import build_dataset
    from medvlm.train.self_training import EpochCallback, SelfQuestioningDataset

    _, proc = build_preset("tiny", template="v1_sq", projector="cluster")
    base, _ = build_dataset(
        [DataSource(str(demo / "instruct.json"))], proc, image_folder=str(demo / "images"), max_length=512
    )
    ds = SelfQuestioningDataset(base, 0.5, seed=1)

    def labels():
        return [int((ds[i]["labels"] != -100).sum()) for i in range(len(ds))]

    plain = [int((base[i]["labels"] != -100).sum()) for i in range(len(ds))]
    epoch0 = labels()
    assert labels() == epoch0  # reproducible within an epoch
    assert all(a >= b for a, b in zip(epoch0, plain)) and sum(epoch0) > sum(plain)  # VUSER questions are learned
    EpochCallback(ds).on_epoch_begin(None, SimpleNamespace(epoch=1.0000001), None)
    assert ds.epoch == 1 and labels() != epoch0
    assert ds[0]["pixel_values"].shape[0] == 1

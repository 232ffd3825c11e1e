"""Training config: YAML + CLI overrides, every shipped recipe loads, bad keys fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medvlm.errors import MedvlmError
from medvlm.train.config import STAGES, TrainConfig, load_config, parse_overrides
from medvlm.train.run import resolve_accumulation

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIRS = ("llava_med", "debug", "stllava_med", "bases")
RECIPES = [p for d in RECIPE_DIRS for p in sorted((ROOT / "configs" / d).glob("*.yaml"))]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_loads_and_names_its_run_command(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[:6]
    assert first[0].startswith("#")
    assert any(f"medvlm train configs/{path.parent.name}/{path.name}" in line for line in first), first
    cfg = load_config(path)
    assert cfg.stage in STAGES
    assert cfg.output_dir


def test_every_recipe_folder_is_loaded():
    """A new configs/ folder of training YAMLs must be added to RECIPE_DIRS (accelerate configs are not recipes)."""
    assert {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()} == {*RECIPE_DIRS, "accelerate"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "bases").glob("*.yaml")), ids=lambda p: p.name)
def test_base_recipes_declare_a_family_and_pass_the_family_checks(path: Path):
    from medvlm.model.families.spec import get_family
    from medvlm.train.family_stage import check_family_config

    cfg = load_config(path)
    assert cfg.family is not None and get_family(cfg.family).name == cfg.family
    assert (cfg.stage, cfg.tune, cfg.bf16) == ("sft", "lora", True)
    check_family_config(cfg, cfg.family)  # nothing the family path would refuse


def test_paper_settings_in_llava_med_recipes():
    for v in ("v1_0", "v1_5"):
        s1 = load_config(ROOT / f"configs/llava_med/{v}_stage1_align.yaml")
        assert (s1.stage, s1.global_batch_size, s1.learning_rate, s1.num_train_epochs) == ("align", 128, 2e-3, 1.0)
        assert (s1.max_length, s1.lr_scheduler_type, s1.warmup_ratio, s1.weight_decay) == (2048, "cosine", 0.03, 0.0)
        s2 = load_config(ROOT / f"configs/llava_med/{v}_stage2_instruct.yaml")
        assert (s2.stage, s2.global_batch_size, s2.learning_rate, s2.num_train_epochs) == ("sft", 128, 2e-5, 3.0)
        for ds in ("vqa_rad", "slake", "pathvqa"):
            ft = load_config(ROOT / f"configs/llava_med/{v}_finetune_{ds}.yaml")
            assert (ft.learning_rate, ft.num_train_epochs, ft.stage) == (2e-5, 3.0, "sft")
    v10 = load_config(ROOT / "configs/llava_med/v1_0_stage1_align.yaml")
    assert v10.projector_type == "linear" and v10.model_kwargs["image_aspect"] == "square"
    assert v10.model_kwargs["template"] == "llava_med_v0"
    v15 = load_config(ROOT / "configs/llava_med/v1_5_stage1_align.yaml")
    assert v15.projector_type == "mlp2x_gelu" and v15.model_kwargs["image_aspect"] == "pad"
    assert v15.model_kwargs["template"] == "mistral_instruct"


def test_cli_overrides_are_typed_and_win_over_yaml(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("stage: sft\npreset: tiny\ndata_path: a.json\noutput_dir: out\nlearning_rate: 2.0e-5\n")
    cfg = load_config(p, ["--learning_rate", "1e-4", "--num_train_epochs=2", "--report_to", "wandb",
                          "--tune", "lora", "--lora_target_modules", "q_proj,v_proj", "--bf16",
                          "--tune_projector", "false", "--resume_from_checkpoint", "false",
                          "--logging_nan_inf_filter", "false"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.num_train_epochs == 2.0
    assert cfg.report_to == ["wandb"]
    assert cfg.tune == "lora" and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.bf16 is True and cfg.tune_projector is False and cfg.resume_from_checkpoint is False
    # Any other TrainingArguments field passes through to the Trainer.
    assert cfg.training_args == {"logging_nan_inf_filter": False}
    # The resolved config round-trips through YAML.
    again = load_config(None, {k: v for k, v in yaml.safe_load(cfg.to_yaml()).items()})
    assert again == cfg


def test_no_yaml_needs_only_the_four_keys():
    cfg = load_config(None, ["--stage", "align", "--model_name_or_path", "ckpt", "--data_path", "d.json",
                             "--output_dir", "o"])
    assert (cfg.stage, cfg.model_name_or_path, cfg.sources()[0].path) == ("align", "ckpt", "d.json")
    with pytest.raises(MedvlmError, match="output_dir is required"):
        load_config(None, ["--stage", "align", "--model_name_or_path", "ckpt", "--data_path", "d.json"])


def test_weighted_mixture_forms():
    cfg = TrainConfig(preset="tiny", output_dir="o", data_path=[{"path": "a.json", "weight": 2}, "b.json"])
    assert [(s.path, s.weight) for s in cfg.sources()] == [("a.json", 2.0), ("b.json", 1.0)]
    cfg = TrainConfig(preset="tiny", output_dir="o", data_path=["a.json", "b.json"], data_weights=[0.5, 3])
    assert [s.weight for s in cfg.sources()] == [0.5, 3.0]
    with pytest.raises(MedvlmError, match="data_weights has 1 entries"):
        TrainConfig(preset="tiny", output_dir="o", data_path=["a", "b"], data_weights=[1]).sources()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--learning_rat", "1e-4"], "unknown key 'learning_rat'; did you mean learning_rate"),
        (["--stage", "pretrain"], "stage: unknown value 'pretrain'"),
        (["--tune", "dora"], "tune: unknown value 'dora'"),
        (["--stage", "align", "--tune_projector", "false"], "projector frozen|tune_projector"),
        (["--per_device_train_batch_size", "four"], "per_device_train_batch_size: expected"),
        (["--preset", "tiny", "--model_name_or_path", "x"], "exactly one starting point"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    base = ["--model_name_or_path", "ckpt", "--data_path", "d.json", "--output_dir", "o"]
    if "--preset" in overrides:
        base = ["--data_path", "d.json", "--output_dir", "o"]
    with pytest.raises(MedvlmError, match=message):
        load_config(None, base + overrides)


def test_global_batch_must_divide():
    cfg = TrainConfig(preset="tiny", output_dir="o", data_path="d", global_batch_size=128, per_device_train_batch_size=16)
    assert resolve_accumulation(cfg, world=8) == 1
    assert resolve_accumulation(cfg, world=2) == 4
    cfg.per_device_train_batch_size = 6
    with pytest.raises(MedvlmError, match="global_batch_size 128 is not divisible by per_device_train_batch_size 6 x 2"):
        resolve_accumulation(cfg, world=2)


def test_override_parsing():
    assert parse_overrides(["--a", "1", "--b=x", "--flag", "--c", "y"]) == {"a": "1", "b": "x", "flag": "true", "c": "y"}
    with pytest.raises(MedvlmError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_cli_without_yaml_reaches_the_run_and_reports_errors(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "medvlm", "train", "--stage", "sft", "--preset", "tiny",
           "--data_path", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"), "--report_to", "[]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: data_path {tmp_path / 'missing.json'}: file not found" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "medvlm", "train", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope.yaml: config file not found" in bad.stderr

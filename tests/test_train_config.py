"""Training config: YAML + CLI overrides, every shipped recipe loads, bad keys fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medvlm.errors import MedvlmError
from medvlm.train.config import STAGES, TrainConfig, load_config, parse_overrides
from medvlm.train.run import resolve_accumulation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ACCELERATE = CONFIGS / "accelerate"
# every training recipe, however deep under configs/ (accelerate's launcher configs are not recipes)
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
ACCELERATE_YAMLS = sorted(ACCELERATE.rglob("*.yaml"))
DEEPSPEED_JSONS = sorted(ACCELERATE.rglob("*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_recipe_loads_and_names_its_run_command(path: Path):
    first = path.read_text(encoding="utf-8").splitlines()[:6]
    assert first[0].startswith("#")
    assert any(f"medvlm train {path.relative_to(ROOT).as_posix()}" in line for line in first), first
    cfg = load_config(path)
    assert cfg.stage in STAGES
    assert cfg.output_dir


def test_every_file_under_configs_is_loaded_by_a_test():
    """Recipes, accelerate configs and DeepSpeed JSONs are all walked recursively; nothing else may hide there."""
    files = {p for p in CONFIGS.rglob("*") if p.is_file()}
    assert files == {*RECIPES, *ACCELERATE_YAMLS, *DEEPSPEED_JSONS}, sorted(map(str, files))
    assert {p.parent.name for p in RECIPES} >= {"llava_med", "stllava_med", "debug", "bases"}
    assert len(ACCELERATE_YAMLS) == 4 and len(DEEPSPEED_JSONS) == 2


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerates_own_loader(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    first = path.read_text(encoding="utf-8").splitlines()[:6]
    assert any(f"accelerate launch --config_file {path.relative_to(ROOT).as_posix()}" in line for line in first), first
    cfg = load_config_from_file(str(path))  # unknown keys or a bad distributed_type raise here
    assert cfg.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED)
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file in DEEPSPEED_JSONS  # the path is relative to the repo root, where the run command is given
        stage = int(path.stem[-1])
        assert cfg.deepspeed_config["zero3_init_flag"] is (stage == 3)
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_configs_parse_with_the_hf_deepspeed_config(path: Path):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    ds = HfDeepSpeedConfig(str(path))
    assert ds.is_zero3() is (path.stem == "zero3")
    # batch sizes and clipping come from the medvlm config through the HF Trainer, never from the JSON
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds.get_value(key) == "auto", key


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
    cfg = load_config(
        p,
        [
            "--learning_rate",
            "1e-4",
            "--num_train_epochs=2",
            "--report_to",
            "wandb",
            "--tune",
            "lora",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--bf16",
            "--tune_projector",
            "false",
            "--resume_from_checkpoint",
            "false",
            "--logging_nan_inf_filter",
            "false",
        ],
    )
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
    cfg = load_config(
        None, ["--stage", "align", "--model_name_or_path", "ckpt", "--data_path", "d.json", "--output_dir", "o"]
    )
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
    cfg = TrainConfig(
        preset="tiny", output_dir="o", data_path="d", global_batch_size=128, per_device_train_batch_size=16
    )
    assert resolve_accumulation(cfg, world=8) == 1
    assert resolve_accumulation(cfg, world=2) == 4
    cfg.per_device_train_batch_size = 6
    with pytest.raises(
        MedvlmError, match="global_batch_size 128 is not divisible by per_device_train_batch_size 6 x 2"
    ):
        resolve_accumulation(cfg, world=2)


def test_override_parsing():
    assert parse_overrides(["--a", "1", "--b=x", "--flag", "--c", "y"]) == {
        "a": "1",
        "b": "x",
        "flag": "true",
        "c": "y",
    }
    with pytest.raises(MedvlmError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_cli_without_yaml_reaches_the_run_and_reports_errors(tmp_path):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "medvlm",
        "train",
        "--stage",
        "sft",
        "--preset",
        "tiny",
        "--data_path",
        str(tmp_path / "missing.json"),
        "--out",
        str(tmp_path / "o"),
        "--report_to",
        "[]",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: data_path {tmp_path / 'missing.json'}: file not found" in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "medvlm", "train", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nope.yaml: config file not found" in bad.stderr

"""train/ is one recipe per (stage, distributed) over shared modules: the table dispatches, refuses what it does not
list before any work, and no recipe imports another recipe or run.py (no import circles)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from medvlm.errors import MedvlmError
from medvlm.train.config import DISTRIBUTED_MODES, STAGES
from medvlm.train.run import RECIPES, run_training
from train_helpers import make_demo, small_config

TRAIN = Path(__file__).resolve().parents[1] / "src" / "medvlm" / "train"


def _imports(path: Path) -> set[str]:
    """Every ``medvlm.*`` module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("medvlm.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medvlm."):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from medvlm.train.recipes import sq`
    return out


def test_recipes_never_import_each_other_or_run():
    bad = []
    for f in sorted((TRAIN / "recipes").glob("*.py")):
        for mod in _imports(f):
            if mod.startswith("medvlm.train.recipes") or mod.startswith("medvlm.train.run"):
                bad.append(f"recipes/{f.name} imports {mod}")
    assert not bad, "a recipe imports another recipe or run.py; move what they share to a shared module:\n" + "\n".join(
        bad
    )


def test_shared_modules_never_import_recipes_or_run():
    bad = []
    for f in sorted(TRAIN.glob("*.py")):
        if f.name in ("run.py", "commands.py"):
            continue
        for mod in _imports(f):
            if mod.startswith("medvlm.train.recipes") or mod.startswith("medvlm.train.run"):
                bad.append(f"train/{f.name} imports {mod}")
    assert not bad, "\n".join(bad)


def test_every_table_entry_is_a_recipe_with_run():
    assert set(RECIPES.values()) == {f.stem for f in (TRAIN / "recipes").glob("*.py") if f.stem != "__init__"}
    for (stage, distributed), name in RECIPES.items():
        assert stage in STAGES and distributed in DISTRIBUTED_MODES
        assert callable(importlib.import_module(f"medvlm.train.recipes.{name}").run)


@pytest.mark.parametrize(
    "stage,distributed", [(s, d) for s in STAGES for d in DISTRIBUTED_MODES if (s, d) not in RECIPES]
)
def test_pairs_not_in_the_table_are_refused_before_any_work(stage, distributed, tmp_path):
    """e.g. ``sq`` / ``dpo`` with ``deepspeed_cpu`` used to train silently on the HF Trainer."""
    demo = make_demo(tmp_path)
    keys = dict(
        stage=stage,
        distributed=distributed,
        model_name_or_path=str(tmp_path / "no-such-checkpoint"),
        preset=None,
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(MedvlmError, match="distributed"):  # a YAML / CLI config is refused when it is read
        small_config(demo, tmp_path / "out", **keys)
    cfg = dataclasses.replace(
        small_config(demo, tmp_path / "out", preset=None, model_name_or_path=str(tmp_path / "no-such-checkpoint")),
        stage=stage,
        distributed=distributed,
    )  # built in Python, never validated
    with pytest.raises(
        MedvlmError,
        match=f"stage '{stage}' with distributed: {distributed} is not supported "
        r"\(stage '\w+' runs with distributed: auto\); supported stage/distributed",
    ):
        run_training(cfg)
    assert not (tmp_path / "out").exists()

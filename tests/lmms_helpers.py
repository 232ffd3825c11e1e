"""Helpers of the lmms-eval export tests: scripted answers, lmms-eval's ``!function`` YAML contract, scoring."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml


def scripted_answer(gold: str, i: int) -> str:
    """Answers that exercise every metric: exact, contained in a sentence, wrong, a bare yes."""
    return [gold, f"I think it is {gold.lower()} here", "an unrelated finding", "yes"][i % 4]


def read_docs(task_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (task_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]


def load_task_yaml(path: Path) -> dict[str, Any]:
    """The task YAML as lmms-eval's ``load_yaml_config`` reads it: ``!function mod.fn`` is ``fn`` of ``mod.py``
    beside the YAML (lmms_eval/utils.py ``import_function``: spec_from_file_location + exec_module per tag)."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.Loader, node: yaml.Node) -> Any:
        *module, name = loader.construct_scalar(node).split(".")
        spec = importlib.util.spec_from_file_location(".".join(module), path.parent / f"{'.'.join(module)}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return getattr(mod, name)

    Loader.add_constructor("!function", function)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


def write_answers(path: Path, answers: dict[str, str]) -> Path:
    path.write_text(
        "".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in answers.items()), encoding="utf-8"
    )
    return path


def lmms_keys(result: dict[str, Any]) -> dict[str, float]:
    """``medvlm eval score`` numbers under the names the exported task reports (``open_recall``, ...)."""
    out = {f"{g}_{m}": v for g in ("open", "closed") for m, v in result[g].items() if v is not None}
    items = result["per_item"]
    out["overall_accuracy"] = sum(it["accuracy"] for it in items) / len(items) * 100
    return out

"""``medvlm eval export-lmms``: the task folder honours lmms-eval's YAML / process_results / aggregation contract
and scores exactly as ``medvlm eval score`` (with medvlm installed, and with the generated copy alone)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench_helpers import write_all
from lmms_helpers import lmms_keys, load_task_yaml, read_docs, scripted_answer, write_answers
from medvlm.data.benchmarks.hub import convert_benchmark
from medvlm.errors import MedvlmError
from medvlm.eval.lmms_export import SCORING_SOURCES, export_lmms_task, scoring_copy_sources, task_name
from medvlm.eval.protocols import score_files

CASES = [("slake", "strict"), ("vqa-rad", "llava-med"), ("pathvqa", "llava-med-single"), ("slake", "exact-match")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmms")
    data = write_all(root / "data")
    tasks = {}
    for task, protocol in CASES:
        out = root / "tasks" / f"{task}-{protocol}"
        res = export_lmms_task(
            task, protocol, data[task], out, prompt_suffix="\nAnswer briefly.", closed_options=True, max_new_tokens=8
        )
        assert res["task_name"] == task_name(task, protocol) and res["n_questions"] == 6
        tasks[(task, protocol)] = out
    gts = {}
    for task in {t for t, _ in CASES}:
        convert_benchmark(task, data[task], root / "gt" / task, closed_options=True)
        gts[task] = root / "gt" / task
    return {"root": root, "data": data, "tasks": tasks, "gt": gts}


def _medvlm_scores(exported, task, protocol, answers, tmp_path) -> dict[str, float]:
    gt = exported["gt"][task]
    res = score_files(
        gt / "test.json",
        write_answers(tmp_path / f"{task}-{protocol}.jsonl", answers),
        protocol,
        gt / "train_open_answers.json" if protocol == "llava-med-single" else None,
    )
    return lmms_keys(res)


@pytest.mark.parametrize("task,protocol", CASES)
def test_process_results_and_aggregations_equal_eval_score(exported, task, protocol, tmp_path):
    out = exported["tasks"][(task, protocol)]
    cfg = load_task_yaml(out / f"{task_name(task, protocol)}.yaml")
    assert cfg["task"] == task_name(task, protocol) and cfg["output_type"] == "generate_until"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == out.resolve() / "test.jsonl"
    assert cfg["metadata"]["protocol"] == protocol and cfg["generation_kwargs"]["max_new_tokens"] == 8
    docs = read_docs(out)
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    for d in docs:
        (img,) = cfg["doc_to_visual"](d)
        assert img.mode == "RGB"
        text = cfg["doc_to_text"](d, kwargs)
        assert text.endswith("\nAnswer briefly.") and text.startswith(d["question"])
        assert cfg["doc_to_target"](d) == d["answer"]
    closed = [d for d in docs if d["group"] == "closed"]
    assert closed and all(d["options"] == ["yes", "no"] for d in closed)  # the [yes, no] suffix is kept for strict
    answers = {d["id"]: scripted_answer(d["answer"], i) for i, d in enumerate(docs)}
    per_doc = [cfg["process_results"](d, [answers[d["id"]]]) for d in docs]
    random.Random(0).shuffle(per_doc)  # lmms-eval may hand the values over in another order
    got = {}
    for spec in cfg["metric_list"]:
        got[spec["metric"]] = spec["aggregation"]([r[spec["metric"]] for r in per_doc])
    want = _medvlm_scores(exported, task, protocol, answers, tmp_path)
    assert got == want
    assert any(0 < v < 100 for v in want.values())  # the scripted answers give non-trivial numbers


def test_the_generated_copy_scores_the_same_without_medvlm(exported, tmp_path):
    """utils.py with `import medvlm` failing falls back to medvlm_scoring/ and gives the same numbers."""
    in_process = load_task_yaml(exported["tasks"][CASES[0]] / f"{task_name(*CASES[0])}.yaml")
    assert in_process["process_results"].__globals__["SCORER"] == "medvlm"  # installed, same protocol version
    for (task, protocol), out in exported["tasks"].items():
        assert {p.name for p in (out / "medvlm_scoring").iterdir() if p.suffix == ".py"} == {
            n for _, n in SCORING_SOURCES
        } | {"__init__.py"}
        for name, text in scoring_copy_sources().items():
            assert (out / "medvlm_scoring" / name).read_text(encoding="utf-8") == text
        docs = read_docs(out)
        answers = {d["id"]: scripted_answer(d["answer"], i) for i, d in enumerate(docs)}
        code = f"""
import json, sys
sys.modules["medvlm"] = None  # as if medvlm were not installed
sys.path.insert(0, {str(Path(__file__).parent)!r})
from lmms_helpers import load_task_yaml, read_docs
from pathlib import Path
out = Path({str(out)!r})
cfg = load_task_yaml(out / {task_name(task, protocol) + '.yaml'!r})
answers = json.loads({json.dumps(answers)!r})
docs = read_docs(out)
per_doc = [cfg["process_results"](d, [answers[d["id"]]]) for d in docs]
print(json.dumps({{"scorer": cfg["process_results"].__globals__["SCORER"], "numbers":
    {{s["metric"]: s["aggregation"]([r[s["metric"]] for r in per_doc]) for s in cfg["metric_list"]}}}}))
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["scorer"] == "copy"
        assert got["numbers"] == _medvlm_scores(exported, task, protocol, answers, tmp_path)


def test_export_refuses_bad_input(exported, tmp_path):
    with pytest.raises(MedvlmError, match="unknown protocol 'vqa-acc'"):
        export_lmms_task("slake", "vqa-acc", exported["data"]["slake"], tmp_path / "x")
    with pytest.raises(MedvlmError, match="exists and is not empty"):
        export_lmms_task("slake", "strict", exported["data"]["slake"], exported["tasks"][("slake", "strict")])
    with pytest.raises(MedvlmError, match="no 'train2' split"):
        export_lmms_task("slake", "strict", exported["data"]["slake"], tmp_path / "y", split="train2")
    assert not (tmp_path / "y").exists()

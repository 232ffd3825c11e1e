"""``medvlm eval bench`` / ``eval compare``: all three tasks on a tiny model, rerun, intervals, paired comparison."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench_helpers import tiny_model, write_all
from medvlm.errors import MedvlmError
from medvlm.eval.bench import BenchConfig, run_bench
from medvlm.eval.bootstrap import group_cis, paired_difference
from medvlm.eval.compare import compare_benches
from medvlm.eval.protocols import PROTOCOL_VERSIONS, PROTOCOLS, score_files
from medvlm.infer.engine import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=6)


def _cli(args: list[str]) -> None:
    from medvlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """`medvlm eval bench --task all` over the three hub-layout fixtures (answered once for the module)."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    write_all(data)
    model = tiny_model(root)
    out = root / "run"
    _cli(
        [
            "eval",
            "bench",
            "--task",
            "all",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--bootstrap",
            "200",
            "--seed",
            "3",
        ]
    )
    return {"root": root, "data": data, "model": model, "out": out}


def test_bench_folder_records_everything_and_scores_like_eval_score(bench):
    out = bench["out"]
    b = json.loads((out / "bench.json").read_text())
    assert set(b["tasks"]) == {"vqa-rad", "slake", "pathvqa"}
    assert b["protocols"] == {
        p: {"version": PROTOCOL_VERSIONS[p], "description": b["protocols"][p]["description"]} for p in PROTOCOLS
    }
    assert b["decoding"]["max_new_tokens"] == 6 and b["split"] == "test" and b["prompt_suffix"] == ""
    assert b["bootstrap"]["resamples"] == 200 and b["bootstrap"]["seed"] == 3
    assert "config.json" in b["model"]["files"] and len(b["model"]["files"]["config.json"]["sha256"]) == 64
    for task, t in b["tasks"].items():
        assert t["n_questions"] == 6 and t["answered_this_run"] == 6 and t["already_answered"] == 0
        src = t["source"]
        assert src["layout"] in ("hub-parquet", "hub-json-zip")
        assert all(len(f["sha256"]) == 64 for f in src["files"].values()) and src["files"]
        assert set(t["scores"]) == set(PROTOCOLS), t["skipped_protocols"]
        for protocol, rel in t["scores"].items():
            scores = json.loads((out / rel).read_text())
            again = score_files(
                out / task / "data" / "test.json",
                out / task / "answers.jsonl",
                protocol,
                out / task / "data" / "train_open_answers.json" if protocol == "llava-med-single" else None,
            )
            assert scores["open"] == again["open"] and scores["closed"] == again["closed"]
            for group, metrics in t["headline"][protocol].items():
                g, m = group.split()
                assert metrics["value"] == scores[g][m]
                lo, hi = metrics["ci95"]
                assert lo <= metrics["value"] <= hi
    slake = json.loads((out / b["tasks"]["slake"]["scores"]["strict"]).read_text())
    assert set(slake["breakdowns"]) == {"question_type", "modality"}
    assert set(slake["breakdowns"]["modality"]) == {"CT", "MRI", "X-Ray"}
    assert sum(v["n"] for v in slake["breakdowns"]["modality"].values()) == 6


def test_report_shows_the_table_with_intervals(bench):
    report = (bench["out"] / "report.md").read_text()
    assert "Research use only" in report
    for task in ("vqa-rad", "slake", "pathvqa"):
        assert f"### {task}" in report and (bench["out"] / f"plot_{task.replace('-', '_')}.png").is_file()
    rows = [line for line in report.splitlines() if line.startswith("| strict (1.0) |")]
    cell = re.compile(r"^ \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] $")
    assert len(rows) == 3 and all(sum(bool(cell.match(c)) for c in r.split("|")) == 4 for r in rows)
    assert (
        "| protocol (version) | open accuracy | open recall | open f1 | closed accuracy | overall accuracy |" in report
    )
    assert "Accuracy per modality (protocol `strict`)" in report


def test_rerun_answers_nothing_new_and_refuses_other_questions_or_model(bench, tmp_path):
    out = bench["out"]
    before = {t: (out / t / "answers.jsonl").read_bytes() for t in ("vqa-rad", "slake", "pathvqa")}
    cfg = BenchConfig(
        tasks=["vqa-rad", "slake", "pathvqa"],
        model=bench["model"],
        data={t: bench["data"] / t for t in before},
        out=out,
        settings=SETTINGS,
        bootstrap=200,
        seed=3,
        progress=False,
    )
    res = run_bench(cfg)
    assert all(t["answered_this_run"] == 0 and t["already_answered"] == 6 for t in res["tasks"].values())
    assert {t: (out / t / "answers.jsonl").read_bytes() for t in before} == before
    cfg.prompt_suffix = "\nAnswer briefly."
    with pytest.raises(MedvlmError, match="holds answers to other questions"):
        run_bench(cfg)
    cfg.prompt_suffix = ""
    other = tmp_path / "other-model"
    shutil.copytree(bench["model"], other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # other files, other hashes
    cfg.model = other
    with pytest.raises(MedvlmError, match="holds answers of another model"):
        run_bench(cfg)
    cfg.model = bench["model"]
    cfg.split = "validation"  # vqa-rad has no validation split on the hub
    with pytest.raises(MedvlmError, match="vqa-rad: the data has no 'validation' split"):
        run_bench(cfg)


def test_compare_flags_a_real_difference_and_not_a_relabelled_copy(bench, tmp_path):
    a = bench["out"]
    # A relabelled copy: the same answers under another model id.
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    meta = json.loads((copy / "bench.json").read_text())
    meta["model"]["model_id"] = "renamed-model"
    (copy / "bench.json").write_text(json.dumps(meta))
    same = compare_benches(a / "bench.json", copy / "bench.json")
    assert not same["any_outside_noise"]
    for protos in same["tasks"].values():
        for metrics in protos.values():
            for d in metrics.values():
                assert d["diff"] == 0 and d["ci95"] == [0.0, 0.0]
    # A better run: every answer is the gold answer (rescored by a rerun that answers nothing new).
    better = tmp_path / "better"
    shutil.copytree(a, better)
    for task in ("vqa-rad", "slake", "pathvqa"):
        gt = {
            str(r["id"]): r["conversations"][1]["value"]
            for r in json.loads((better / task / "data" / "test.json").read_text())
        }
        rows = [json.loads(line) for line in (better / task / "answers.jsonl").read_text().splitlines()]
        for r in rows:
            r["text"] = gt[str(r["question_id"])]
        (better / task / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_bench(
        BenchConfig(
            tasks=["vqa-rad", "slake", "pathvqa"],
            model=bench["model"],
            data={t: bench["data"] / t for t in ("vqa-rad", "slake", "pathvqa")},
            out=better,
            settings=SETTINGS,
            bootstrap=200,
            seed=3,
            progress=False,
        )
    )
    diff = compare_benches(a / "bench.json", better / "bench.json")
    assert diff["any_outside_noise"]
    d = diff["tasks"]["slake"]["exact-match"]["overall accuracy"]
    assert d["b"] == 100.0 and d["diff"] == d["b"] - d["a"] and d["outside_noise"] and d["ci95"][0] > 0
    _cli(["eval", "compare", str(a / "bench.json"), str(better / "bench.json"), "--out", str(tmp_path / "cmp.json")])
    assert json.loads((tmp_path / "cmp.json").read_text())["any_outside_noise"]


def test_bootstrap_is_reproducible_covers_the_estimate_and_pairs():
    rng = np.random.default_rng(0)
    groups = {
        "open": {"accuracy": rng.random(700).round().tolist(), "f1": rng.random(700).tolist()},
        "closed": {"accuracy": (rng.random(300) < 0.7).astype(float).tolist()},
    }
    a = group_cis(groups, 1000, seed=5)
    assert a == group_cis(groups, 1000, seed=5)
    assert a != group_cis(groups, 1000, seed=6)
    for g, metrics in groups.items():
        for m, v in metrics.items():
            lo, hi = a[g][m]
            assert lo <= np.mean(v) * 100 <= hi and hi - lo > 1
    pooled = (sum(groups["open"]["accuracy"]) + sum(groups["closed"]["accuracy"])) / 1000 * 100
    assert a["overall"]["accuracy"][0] <= pooled <= a["overall"]["accuracy"][1]
    # overall needs the metric in every group
    assert group_cis({"open": {"f1": [0.5, 1.0]}, "closed": {"accuracy": [1.0]}}, 50, 0)["overall"] == {
        "accuracy": None
    }
    # paired: a constant +0.1 shift has the interval [10, 10]; identical runs [0, 0]
    x = np.asarray(groups["open"]["f1"])
    shifted = paired_difference({"f1": x}, {"f1": x + 0.1}, 500, 1)["f1"]
    assert shifted["ci95"] == pytest.approx([10.0, 10.0]) and shifted["outside_noise"]
    assert paired_difference({"f1": x}, {"f1": x}, 500, 1)["f1"]["ci95"] == [0.0, 0.0]

"""``medvlm data validate|stats|convert`` through the real CLI entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from PIL import Image
from typer.testing import CliRunner

from medvlm.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["data", *args])


def test_validate_good_file_exit_0_with_summary(shared_dir):
    r = _run(
        "validate", str(shared_dir / "formats" / "qa50_sample.jsonl"), "--image-folder", str(shared_dir / "images")
    )
    # the qa50 figures are not in ../shared/images: every one is reported missing
    assert r.exit_code == 1
    assert "record 0 (id 0): image: image '18063892_F3.jpg' missing" in r.output
    r = _run("validate", str(shared_dir / "formats" / "instruct_sample.json"))
    assert r.exit_code == 0, r.output
    assert "records" in r.output and "chest_xray" in r.output and "not checked" in r.output


def test_validate_bad_file_lists_each_problem(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (4, 4)).save(d / "ok.png")
    recs = [
        {
            "id": "a",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        {
            "id": "b",
            "image": "gone.png",
            "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}],
        },
    ]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(recs))
    r = _run("validate", str(f), "--image-folder", str(d))
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.startswith("record ")]
    assert lines == [
        "record 1 (id b): conversations[1]: roles do not alternate: expected a assistant turn, got user",
        "record 1 (id b): conversations[0]: no <image> placeholder while 1 image(s) given",
        "record 1 (id b): image: image 'gone.png' missing",
    ]


def test_validate_skip_bad_and_hard_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    good = json.dumps({"image": "a.png", "question": "q", "answer": "a"})
    f.write_text("\n".join([good] * 50 + ["{torn"] + [good] * 49) + "\n")
    r = _run("validate", str(f), "--skip-bad")
    assert r.exit_code == 1 and f"{f}:51: invalid JSON" in r.output
    assert re.search(r"records\s+\W\s+99\b", r.output) and re.search(r"skipped records\s+\W\s+1\b", r.output)
    r = subprocess.run([sys.executable, "-m", "medvlm", "data", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and ":51: invalid JSON" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "medvlm", "data", "validate", str(f), "--format", "nope"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown format 'nope'" in r.stderr


def test_stats_tables_and_json(shared_dir):
    f = str(shared_dir / "data" / "llava_med_eval" / "llava_med_eval_qa50_qa.jsonl")
    r = _run("stats", f)
    assert r.exit_code == 0 and "detailed_description" in r.output and "193" in r.output
    r = _run("stats", f, "--out", "-")
    st = json.loads(r.output)
    assert st["records"] == 193 and st["types"] == {"conversation": 143, "detailed_description": 50}


def test_convert_vqa_rad(tmp_path):
    src = tmp_path / "rad"
    (src / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(src / "VQA_RAD Image Folder" / "s.jpg")
    rec = {
        "qid": 1,
        "image_name": "s.jpg",
        "question": "Is it normal?",
        "answer": "yes",
        "answer_type": "CLOSED",
        "question_type": "ABN",
        "phrase_type": "test_freeform",
    }
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec, dict(rec, qid=2, phrase_type="freeform")]))
    out = tmp_path / "out"
    r = _run("convert", "vqa-rad", "--in", str(src), "--out", str(out), "--closed-options")
    assert r.exit_code == 0, r.output
    assert "train: 1" in r.output and "test: 1" in r.output
    (t,) = json.loads((out / "test.json").read_text())
    assert (
        t["conversations"][0]["value"]
        == "<image>\nIs it normal? Please choose from the following two options: [yes, no]"
    )
    r = _run("convert", "vqa-rad", "--in", str(src), "--out", str(out))
    assert r.exit_code != 0 and "not empty" in str(r.exception)

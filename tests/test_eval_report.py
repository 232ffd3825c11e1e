"""`medvlm eval report RUN_DIR`: report.md + plots with the numbers, the settings and the research-only notice."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medvlm.errors import MedvlmError
from medvlm.eval.chat_summary import summarize_records
from medvlm.eval.commands import app
from medvlm.eval.protocols import score_files
from medvlm.eval.report import write_report
from medvlm.notice import NOTICE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path, shared_dir):
    d = shared_dir / "data/metric_fixture"
    for proto, name in (("llava-med", "scores.json"), ("strict", "scores_strict.json")):
        r = score_files(d / "gt_test.json", d / "pred_answers.jsonl", proto, bootstrap=100)
        (tmp_path / name).write_text(json.dumps(r))
    recs = [
        {"question_id": i, "type": t, "domain": dom, "reference_score": 8.0, "model_score": m, "error": None}
        for i, (t, dom, m) in enumerate(
            [
                ("conversation", "mri", 6.0),
                ("conversation", "ct_scan", 4.0),
                ("detailed_description", "mri", 8.0),
                ("conversation", "histology", 2.0),
            ]
        )
    ]
    (tmp_path / "chat_summary.json").write_text(json.dumps(summarize_records(recs)))
    (tmp_path / "decoding.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 128, "num_beams": 1}))
    return tmp_path


def test_report_files_and_numbers(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.md"
    md = out.read_text(encoding="utf-8")
    for png in ("plot_protocols.png", "plot_question_types.png", "plot_domains.png"):
        data = (run_dir / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({png})" in md
    assert NOTICE in md
    assert "| max_new_tokens | `128` |" in md and "From `decoding.json`" in md
    for name in ("scores.json", "scores_strict.json"):
        s = json.loads((run_dir / name).read_text())
        assert f"protocol `{s['protocol']}`" in md
        for g in ("open", "closed"):
            for m, v in s[g].items():
                lo, hi = s["ci95"][g][m]
                assert f"| {g} | {m} | {v:.2f} | [{lo:.2f}, {hi:.2f}] |" in md
    chat = json.loads((run_dir / "chat_summary.json").read_text())
    assert chat["overall"]["relative_score"] == pytest.approx(62.5)
    assert "| overall | 4 | 0 | 8.00 | 5.00 | 62.50 |" in md
    assert "| mri | 2 | 0 | 8.00 | 7.00 | 87.50 |" in md
    assert "| closed | 342 | " in md and "| open | 306 | " in md  # per question type (open/closed here)


def test_report_without_settings_and_cli(tmp_path, shared_dir):
    d = shared_dir / "data/metric_fixture"
    (tmp_path / "scores.json").write_text(
        json.dumps(score_files(d / "gt_test.json", d / "pred_answers.jsonl", "exact-match"))
    )
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "decoding settings not recorded" in md and "plot_domains.png" not in md
    assert (tmp_path / "plot_protocols.png").read_bytes().startswith(PNG_MAGIC)


def test_report_errors(tmp_path):
    with pytest.raises(MedvlmError, match="nothing to report"):
        write_report(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(MedvlmError, match="scores.json: not a scores file"):
        write_report(tmp_path)

"""The README's CLI sequence with the defaults reads the image, on data that is not medvlm's own generator.

A shortened ``benchmarks/bench_defaults.py``: ``model init --preset tiny`` -> ``train --stage align`` ->
``train --stage sft --eval_data_path`` -> ``eval vqa`` -> ``eval score --protocol llava-med``, through the CLI, on the
independent generator ``benchmarks/synth2.py``; only the sample budget per stage (``--scratch_samples``) is shortened.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from typer.testing import CliRunner

from medvlm.cli import app

SYNTH2 = Path(__file__).resolve().parents[1] / "benchmarks" / "synth2.py"


def _synth2():
    spec = importlib.util.spec_from_file_location("synth2", SYNTH2)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res.output


def test_documented_cli_sequence_beats_the_image_blind_baseline(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _synth2().generate(data, n_images=220, test_images=100, seed=0)
    # Evaluate on the closed questions only: every one is a yes/no whose answer was drawn 50:50 independently of
    # its text (synth2 draws the answer first, then a predicate or modality name that makes it true or false).
    # Whatever an image-blind model does, its number of hits on n such questions is Binomial(n, 1/2).
    test = [r for r in json.loads((data / "test.json").read_text()) if r["answer_type"] == "CLOSED"]
    n = len(test)
    assert n == 300
    (data / "test_closed.json").write_text(json.dumps(test))
    images, train, gt = str(data / "images"), str(data / "train.json"), str(data / "test_closed.json")
    m = tmp_path / "m"
    _cli("model", "init", "--preset", "tiny", "--out", str(m / "init"))
    common = [
        "--data_path",
        train,
        "--image_folder",
        images,
        "--scratch_samples",
        "600",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]
    _cli("train", "--stage", "align", "--model_name_or_path", str(m / "init"), "--out", str(m / "align"), *common)
    out = _cli(
        "train",
        "--stage",
        "sft",
        "--model_name_or_path",
        str(m / "align"),
        "--out",
        str(m / "sft"),
        "--eval-questions",
        gt,
        *common,
    )
    assert "image-blind" in out and "CLOSED/SIDE" in out and "CLOSED/MODALITY" in out
    ev = json.loads((m / "sft" / "eval_scores.json").read_text())
    _cli(
        "eval",
        "vqa",
        "--model",
        str(m / "sft"),
        "--questions",
        gt,
        "--image-folder",
        images,
        "--out",
        str(m / "answers.jsonl"),
    )
    _cli(
        "eval",
        "score",
        "--gt",
        gt,
        "--pred",
        str(m / "answers.jsonl"),
        "--protocol",
        "llava-med",
        "--out",
        str(m / "scores.json"),
    )
    closed = json.loads((m / "scores.json").read_text())["closed"]["accuracy"]
    assert abs(closed - ev["closed_accuracy"]) < 1e-9  # train's own evaluation = the documented eval commands
    blind = 100 * ev["blind"]["closed"]
    # Margin 15 points over n = 300 fair yes/no questions: an image-blind model reaches 65 % with probability
    # P(Binomial(300, 1/2) >= 195) = 1.1e-7 (z = 15 / sqrt(2500 / 300) = 5.2). The blind baseline (majority per kind,
    # learned on train) is itself ~50 here; the assert is against 50 + 15 and against the measured baseline + 12.
    # Measured (seed 0, 1 thread): closed 67.0 - modality yes/no 82, side yes/no 59.5 - in ~75 s on 2 cores.
    assert closed >= 65.0, (closed, blind, ev["by_kind"])
    assert closed >= blind + 12.0, (closed, blind)

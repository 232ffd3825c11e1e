"""Train, then answer an eval set and show per question kind whether the model reads the image.

``medvlm train ... --eval-questions test.json`` (the recipe key ``eval_data_path``; stages ``align``/``sft``): after
training, the new checkpoint answers the converted-VQA eval file, which is scored with the ``llava-med`` protocol; each
question kind's (``answer_type``/``question_type``) accuracy (closed) or recall (open) is printed next to the
image-blind baseline - the majority answer per kind learned from the training files
(:func:`medvlm.data.synth.blind_baseline`).
A kind at its blind figure has learned nothing from the pixels. The numbers go to ``output_dir/eval_scores.json``.

This lives in the evaluation layer because it generates answers (:mod:`medvlm.infer`) after training
(:mod:`medvlm.train`); ``medvlm train`` is registered from here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from medvlm.errors import MedvlmError
from medvlm.utils.artifacts import EVAL_ANSWERS_FILE, EVAL_SCORES_FILE
from medvlm.utils.cli import renamed

MAIN_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "help": "Train a medvlm model (stage 'align', 'sft', or STLLaVA-Med's 'sq' / 'dpo') from a YAML recipe; "
    "any key can be overridden with --key value (e.g. --learning_rate 1e-4). The checkpoint folder is --out "
    "(the recipe's output_dir). Without a YAML, give --stage, --model_name_or_path (or --preset), "
    "--data_path and --out. --eval-questions test.json answers a converted-VQA eval set after training and "
    "prints each question kind's score next to its image-blind baseline.",
    # --output_dir on the command line is the CLI's old spelling of --out (the YAML key stays output_dir).
    "cls": renamed({"--output_dir": "--out", "--output-dir": "--out"}),
}
PROTOCOL = "llava-med"


def vqa_train_files(paths: list[str]) -> list[str]:
    """The training files in converted-VQA form (first record has ``answer_type``): the blind baseline's source."""
    from medvlm.data.readers.stream import iter_raw_records

    out = []
    for p in paths:
        records = iter_raw_records(Path(p))
        first = next(records, None)
        records.close()  # only the first record is needed
        if first is not None and isinstance(first.value, dict) and "answer_type" in first.value:
            out.append(p)
    return out


def per_kind(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"CLOSED/SIDE": {"score": x100, "n": n}}`` from a ``llava-med`` scores object's ``per_item`` rows."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in scores["per_item"]:
        metric = "accuracy" if row["type"] == "closed" else "recall"
        kind = f"{str(row.get('answer_type') or row['type']).upper()}/{row.get('question_type') or 'ALL'}"
        values[kind].append(float(row[metric]))
    return {k: {"score": 100 * sum(v) / len(v), "n": len(v)} for k, v in sorted(values.items())}


def kind_table(kinds: dict[str, dict[str, float]], blind: dict[str, Any] | None, title: str) -> Any:
    """A rich table: kind, n, model score, blind baseline and the difference (x100)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("question kind", "n", "model", "image-blind", "model - blind"):
        t.add_column(col, justify="left" if col == "question kind" else "right")
    for kind, row in kinds.items():
        b = (blind or {}).get("by_kind", {}).get(kind)
        bs = 100 * b["score"] if b else None
        t.add_row(
            kind,
            str(row["n"]),
            f"{row['score']:.1f}",
            "n/a" if bs is None else f"{bs:.1f}",
            "n/a" if bs is None else f"{row['score'] - bs:+.1f}",
        )
    return t


def evaluate_checkpoint(
    model: str | Path,
    eval_path: str | Path,
    image_folder: str | None,
    train_files: list[str],
    out_dir: str | Path,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Answer ``eval_path`` with ``model``, score it (``llava-med``), add per-kind scores and the blind baseline.

    Writes ``out_dir/eval_answers.jsonl`` and ``out_dir/eval_scores.json``; returns the latter's object.
    """
    from medvlm.data.synth import blind_baseline
    from medvlm.eval.protocols import score_files
    from medvlm.eval.vqa import run_vqa
    from medvlm.infer.engine import GenerationSettings
    from medvlm.utils.io import write_json_atomic

    out_dir = Path(out_dir)
    answers = out_dir / EVAL_ANSWERS_FILE
    if answers.exists():
        answers.unlink()  # a new checkpoint: never resume another model's answers
    run_vqa(
        model,
        eval_path,
        answers,
        image_folder,
        GenerationSettings(max_new_tokens=16),
        batch_size=batch_size,
        progress=False,
    )
    scores = score_files(eval_path, answers, PROTOCOL)
    vqa_files = vqa_train_files(train_files)
    blind = blind_baseline(vqa_files, eval_path) if vqa_files else None
    counts = scores["counts"]
    result = {
        "protocol": PROTOCOL,
        "closed_accuracy": scores["closed"]["accuracy"] if counts["closed"] else None,
        "open_recall": scores["open"]["recall"] if counts["open"] else None,
        "by_kind": per_kind(scores),
        "blind": blind,
        "blind_from": vqa_files,
        "eval_data_path": str(eval_path),
    }
    write_json_atomic(out_dir / EVAL_SCORES_FILE, result)
    return result


def train_and_evaluate(cfg: Any, callbacks: list | None = None, console: Any = None) -> tuple[Any, dict | None]:
    """``run_training(cfg)``, then, with ``cfg.eval_data_path``, :func:`evaluate_checkpoint` and its table printed."""
    from medvlm.train.run import run_training

    if cfg.eval_data_path:
        if cfg.stage not in ("align", "sft"):
            raise MedvlmError(f"eval_data_path applies to stages align and sft, not {cfg.stage!r}")
        if not Path(cfg.eval_data_path).is_file():
            raise MedvlmError(f"eval_data_path {cfg.eval_data_path}: file not found")
    result = run_training(cfg, callbacks, evaluated_by_caller=True)
    if not cfg.eval_data_path:
        return result, None
    from rich.console import Console

    console = console or Console()
    ev = evaluate_checkpoint(
        cfg.output_dir, cfg.eval_data_path, cfg.image_folder, [s.path for s in cfg.sources()], cfg.output_dir
    )
    console.print(kind_table(ev["by_kind"], ev["blind"], f"{cfg.eval_data_path} ({PROTOCOL}, x100)"))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.1f}"  # None / NaN: no question of that type

    blind = ev["blind"]
    tail = (
        f" (image-blind {fmt(100 * blind['closed'])} / {fmt(100 * blind['open_recall'])})"
        if blind
        else " (no converted-VQA training file: no blind baseline)"
    )
    console.print(
        f"closed accuracy {fmt(ev['closed_accuracy'])}, open recall {fmt(ev['open_recall'])}{tail}", highlight=False
    )
    return result, ev


def main(
    ctx: typer.Context,
    config: Annotated[
        Optional[str], typer.Argument(help="YAML recipe (configs/llava_med/*.yaml, configs/debug/*.yaml).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Checkpoint folder to write (overrides the recipe's output_dir).")
    ] = None,
    eval_questions: Annotated[
        Optional[Path],
        typer.Option(
            "--eval-questions",
            help="Converted-VQA file answered and scored after an align/sft run (the recipe's eval_data_path): "
            "each question kind's score beside its image-blind baseline, in OUT/eval_scores.json.",
        ),
    ] = None,
) -> None:
    """Train a medvlm model from a YAML recipe plus ``--key value`` overrides."""
    from medvlm.train.config import load_config

    args = list(ctx.args)
    if config is not None and config.startswith("--"):
        args.insert(0, config)  # no YAML: the first override landed in the positional slot
        config = None
    if out is not None:
        args += ["--output_dir", str(out)]
    if eval_questions is not None:
        args += ["--eval_data_path", str(eval_questions)]
    cfg = load_config(config, args)
    result, _ = train_and_evaluate(cfg)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    typer.echo(
        f"done: {result.steps} steps in {result.seconds:.1f} s, final loss {loss}; checkpoint: {result.output_dir}"
    )

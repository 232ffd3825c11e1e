"""Summary of a judged chat benchmark: per question type, per domain and overall (LLaVA-Med's table).

Groups: ``conversation``, ``detailed_description``, the five domains (each question counted under its
primary domain: chest_xray > mri > histology > gross > ct_scan, first true wins) and ``overall``. Per
group: the reference (GPT-4) mean, the model mean, the **relative score** = mean over questions of
model / reference x 100 (the paper's number), the ratio of the means x 100, counts, and a percentile
bootstrap CI95 of the relative score.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medvlm.data.readers.figures import DOMAINS
from medvlm.errors import MedvlmError
from medvlm.eval.judge import load_judged
from medvlm.utils.io import write_json_atomic

GROUPS: tuple[str, ...] = ("conversation", "detailed_description", *DOMAINS, "overall")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _group_stats(pairs: list[tuple[float, float]], failed: int) -> dict[str, Any]:
    n = len(pairs)
    if n == 0:
        return {
            "count": 0,
            "failed": failed,
            "reference_mean": None,
            "model_mean": None,
            "relative_score": None,
            "ratio_of_means": None,
            "relative_score_ci95": None,
        }
    ref = [r for r, _ in pairs]
    mod = [m for _, m in pairs]
    ratios = [m / r for r, m in pairs if r > 0]  # a reference score of 0 has no ratio (never 1..10 scored)
    rel = sum(ratios) / len(ratios) * 100 if ratios else None
    ref_mean, mod_mean = sum(ref) / n, sum(mod) / n
    ci = None
    if len(ratios) > 1:
        arr = np.asarray(ratios, dtype=np.float64)
        idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(arr), size=(BOOTSTRAP_RESAMPLES, len(arr)))
        means = arr[idx].mean(axis=1) * 100  # [resamples]
        ci = [float(v) for v in np.percentile(means, [2.5, 97.5])]
    return {
        "count": n,
        "failed": failed,
        "reference_mean": ref_mean,
        "model_mean": mod_mean,
        "relative_score": rel,
        "ratio_of_means": mod_mean / ref_mean * 100 if ref_mean > 0 else None,
        "relative_score_ci95": ci,
    }


def summarize_records(records: list[dict]) -> dict[str, dict[str, Any]]:
    """Per-group statistics of judged records (records with an ``error`` only count as ``failed``)."""
    pairs: dict[str, list[tuple[float, float]]] = {g: [] for g in GROUPS}
    failed: dict[str, int] = dict.fromkeys(GROUPS, 0)
    for i, rec in enumerate(records):
        groups = ["overall"]
        if rec.get("type") in ("conversation", "detailed_description"):
            groups.append(rec["type"])
        if rec.get("domain") in DOMAINS:
            groups.append(rec["domain"])
        if rec.get("error") is not None or rec.get("reference_score") is None or rec.get("model_score") is None:
            for g in groups:
                failed[g] += 1
            continue
        try:
            pair = (float(rec["reference_score"]), float(rec["model_score"]))
        except (TypeError, ValueError) as e:
            raise MedvlmError(f"judged record {i} (question_id {rec.get('question_id')!r}): bad scores ({e})") from e
        for g in groups:
            pairs[g].append(pair)
    return {g: _group_stats(pairs[g], failed[g]) for g in GROUPS}


def summarize_judged(path: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Summarise a judged JSONL (one record per question; a later scored line replaces a failed one)."""
    records = list(load_judged(path).values())
    if not records:
        raise MedvlmError(f"{path}: no judged records")
    summary = summarize_records(records)
    if out is not None:
        write_json_atomic(out, summary)
    return summary


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summary_table(summary: dict[str, dict[str, Any]]) -> Any:
    """A ``rich`` table of the summary (groups as rows)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="GPT-judged chat benchmark",
        box=box.SIMPLE,
        pad_edge=False,
        collapse_padding=True,  # fits 80 columns
        caption="relative = mean over questions of model / GPT-4 x 100 (the paper's score); "
        "ratio = model mean / GPT-4 mean x 100",
    )
    for col in ("group", "n", "failed", "GPT-4", "model", "relative", "CI95", "ratio"):
        table.add_column(col, justify="left" if col == "group" else "right", no_wrap=True)
    for g in GROUPS:
        s = summary[g]
        ci = s.get("relative_score_ci95")
        table.add_row(
            g,
            str(s["count"]),
            str(s.get("failed", 0)),
            _fmt(s["reference_mean"]),
            _fmt(s["model_mean"]),
            _fmt(s["relative_score"], 1),
            "-" if not ci else f"{ci[0]:.1f}-{ci[1]:.1f}",
            _fmt(s["ratio_of_means"], 1),
        )
    return table

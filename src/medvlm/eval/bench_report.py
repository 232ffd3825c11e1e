"""``report.md`` of a bench folder: the headline table with CI95 per task x protocol, breakdowns, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.eval.report import bar_chart
from medvlm.notice import NOTICE
from medvlm.utils.io import read_json, write_text_atomic

COLUMN_ORDER: tuple[str, ...] = ("open accuracy", "open recall", "open f1", "closed accuracy", "overall accuracy")


def _cell(v: Any, ci: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


def write_bench_report(bench_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and ``plot_*.png`` for the ``bench.json`` in ``bench_dir``; returns the report path."""
    bench_dir = Path(bench_dir)
    bench = read_json(bench_dir / "bench.json")
    if not isinstance(bench, dict) or not isinstance(bench.get("tasks"), dict):
        raise MedvlmError(f"{bench_dir / 'bench.json'}: not a bench.json of `medvlm eval bench`")
    boot = bench.get("bootstrap") or {}
    md = [
        "# medvlm benchmark report",
        "",
        f"> **Research use only.** {NOTICE}",
        "",
        f"Model `{bench['model']['model_id']}` (`{bench['model']['path']}`), split `{bench['split']}`, "
        f"prompt suffix `{json.dumps(bench['prompt_suffix'])}`, closed options: {bench.get('closed_options')}.",
        "",
        f"Decoding: `{json.dumps(bench['decoding'])}`.",
        "",
        f"Intervals: 95% {boot.get('method')}, {boot.get('resamples')} resamples, seed {boot.get('seed')}.",
        "",
        "## Headline numbers (value [CI95], x100)",
        "",
    ]
    protocols = list(bench.get("protocols") or {})
    for task, t in bench["tasks"].items():
        src = t["source"]
        md += [
            f"### {task}",
            "",
            f"{t['n_questions']} questions; data `{src['folder']}` (layout `{src['layout']}`); "
            f"{t['answered_this_run']} answered by this run, {t['already_answered']} already answered.",
            "",
        ]
        present = {c for p in protocols for c in (t["headline"].get(p) or {})}
        cols = [c for c in COLUMN_ORDER if c in present] + sorted(present - set(COLUMN_ORDER))
        md += ["| protocol (version) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for p in protocols:
            h = t["headline"].get(p)
            if h is None:
                md.append(
                    f"| {p} | " + " | ".join("-" for _ in cols) + f" |  (skipped: {t['skipped_protocols'].get(p)})"
                )
                continue
            md.append(
                f"| {p} ({bench['protocols'][p]['version']}) | "
                + " | ".join(_cell((h.get(c) or {}).get("value"), (h.get(c) or {}).get("ci95")) for c in cols)
                + " |"
            )
        md.append("")
        series = [
            (
                p,
                [(t["headline"][p].get(c) or {}).get("value") for c in cols],
                [(t["headline"][p].get(c) or {}).get("ci95") for c in cols],
            )
            for p in protocols
            if p in t["headline"]
        ]
        plot = f"plot_{_slug(task)}.png"
        bar_chart(f"{task}: headline metrics per protocol", "score (x100)", cols, series, bench_dir / plot)
        md += [f"![{task} headline metrics]({plot})", ""]
        # Breakdowns are protocol-specific; the strict protocol's accuracy is shown (others are in the scores files).
        shown = "strict" if "strict" in t["scores"] else next(iter(t["scores"]), None)
        if shown:
            scores = read_json(bench_dir / t["scores"][shown])
            for key, cats in (scores.get("breakdowns") or {}).items():
                md += [
                    f"Accuracy per {key.replace('_', ' ')} (protocol `{shown}`):",
                    "",
                    f"| {key.replace('_', ' ')} | n | accuracy [CI95] |",
                    "|---|---|---|",
                ]
                md += [f"| {c} | {v['n']} | {_cell(v['value'], v['ci95'])} |" for c, v in cats.items()]
                md.append("")
                plot = f"plot_{_slug(task)}_{key}.png"
                bar_chart(
                    f"{task}: accuracy per {key.replace('_', ' ')} ({shown})",
                    "accuracy (%)",
                    list(cats),
                    [(shown, [v["value"] for v in cats.values()], [v["ci95"] for v in cats.values()])],
                    bench_dir / plot,
                )
                md += [f"![{task} accuracy per {key}]({plot})", ""]
    md += ["## Protocols", "", "| protocol | version | what it computes |", "|---|---|---|"]
    md += [f"| {p} | {v['version']} | {v['description']} |" for p, v in (bench.get("protocols") or {}).items()]
    md += ["", "---", "", f"_{NOTICE}_", ""]
    out = bench_dir / "report.md"
    write_text_atomic(out, "\n".join(md))
    return out

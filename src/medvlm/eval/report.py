"""``medvlm eval report RUN_DIR``: a markdown report with plots of everything scored in a run folder.

Reads every ``scores*.json`` (from ``medvlm eval score``) and every ``chat_summary*.json`` /
``summary*.json`` (from ``medvlm eval chat-summary``) in the folder, plus the decoding settings from
``decoding.json`` or ``run.json`` when present, and writes ``report.md`` and PNG plots (per protocol, per
question type, per chat group/domain; CI95 as error bars) beside them. Plots use matplotlib's Agg
canvas directly, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.eval.bootstrap import mean_ci
from medvlm.eval.chat_summary import GROUPS
from medvlm.eval.protocols import PROTOCOL_DESCRIPTIONS
from medvlm.notice import NOTICE
from medvlm.utils.io import atomic_path, read_json, write_text_atomic

SETTINGS_FILES: tuple[str, ...] = ("decoding.json", "run.json")
MAIN_METRICS: tuple[tuple[str, str, str], ...] = (
    ("open", "accuracy", "open accuracy"),
    ("open", "recall", "open recall"),
    ("open", "f1", "open F1"),
    ("closed", "accuracy", "closed accuracy"),
)


@dataclass
class _Scores:
    path: Path
    data: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.path.stem} ({self.data['protocol']})"


def _load_scores(path: Path) -> _Scores:
    data = read_json(path)
    if not isinstance(data, dict) or not all(k in data for k in ("protocol", "counts", "open", "closed")):
        raise MedvlmError(f"{path}: not a scores file of `medvlm eval score` (needs protocol, counts, open, closed)")
    return _Scores(path, data)


def _load_chat_summary(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("overall"), dict)
        or "relative_score" not in data["overall"]
    ):
        raise MedvlmError(f"{path}: not a chat summary of `medvlm eval chat-summary` (needs an 'overall' group)")
    return data


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci: Any) -> str:
    return "-" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def per_question_type(scores: dict[str, Any], resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Accuracy per ``question_type`` (or per open/closed when the data has none) with a bootstrap CI95."""
    items = scores.get("per_item") or []
    use_qt = any(it.get("question_type") for it in items)
    groups: dict[str, list[float]] = {}
    for it in items:
        key = (it.get("question_type") or "unknown") if use_qt else it["type"]
        if it.get("accuracy") is not None:
            groups.setdefault(key, []).append(float(it["accuracy"]))
    return {
        k: {"n": len(v), "accuracy": sum(v) / len(v) * 100, "ci95": mean_ci(v, resamples, seed, k)}
        for k, v in sorted(groups.items())
    }


def _save(fig: Any, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def bar_chart(
    title: str, ylabel: str, categories: list[str], series: list[tuple[str, list[float | None], list[Any]]], dest: Path
) -> None:
    """Grouped bar chart: one group per category, one bar per series; CI95 ``[lo, hi]`` as error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(categories))
    fig = Figure(figsize=(max(6.0, 1.3 * len(categories) * max(1, n / 2)), 4.2))
    ax = fig.add_subplot()
    ymax = 1.0
    for i, (name, values, cis) in enumerate(series):
        vals = [np.nan if v is None else v for v in values]
        err = np.array(
            [
                [0.0 if (v is None or not c) else v - c[0] for v, c in zip(values, cis)],
                [0.0 if (v is None or not c) else c[1] - v for v, c in zip(values, cis)],
            ]
        )  # [2, categories]
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, vals, width, label=name, yerr=err, capsize=3, error_kw={"elinewidth": 1})
        for b, v, c in zip(bars, values, cis):
            if v is not None:  # the value label sits above the error bar
                top = c[1] if c else v
                ax.annotate(
                    f"{v:.1f}",
                    (b.get_x() + b.get_width() / 2, top),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
                ymax = max(ymax, top)
    ax.set_xticks(
        x, categories, rotation=20 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center"
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, ymax * (1.3 if len(series) > 1 else 1.12))  # headroom for the labels and the legend
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", ncol=min(len(series), 3))
    fig.text(0.99, 0.01, "Research use only - not for clinical use.", ha="right", va="bottom", fontsize=6, alpha=0.7)
    _save(fig, dest)


def _settings(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    for name in SETTINGS_FILES:
        p = run_dir / name
        if p.is_file():
            data = read_json(p)
            if not isinstance(data, dict):
                raise MedvlmError(f"{p}: expected a JSON object of settings")
            return name, data
    return None, {}


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and the plots into ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MedvlmError(f"{run_dir}: not a directory")
    scores = [_load_scores(p) for p in sorted(run_dir.glob("scores*.json"))]
    chat_paths = sorted({*run_dir.glob("chat_summary*.json"), *run_dir.glob("summary*.json")})
    chats = [(p, _load_chat_summary(p)) for p in chat_paths]
    if not scores and not chats:
        raise MedvlmError(f"{run_dir}: nothing to report (no scores*.json, chat_summary*.json or summary*.json)")
    settings_name, settings = _settings(run_dir)

    md = ["# medvlm evaluation report", "", f"> **Research use only.** {NOTICE}", "", f"Run folder: `{run_dir}`", ""]
    md += ["## Decoding settings", ""]
    if settings:
        md += [f"From `{settings_name}`:", "", "| setting | value |", "|---|---|"]
        md += [f"| {k} | `{json.dumps(v, ensure_ascii=False)}` |" for k, v in settings.items()]
    else:
        md.append(f"No {' or '.join(SETTINGS_FILES)} in the run folder: decoding settings not recorded.")
    md.append("")

    if scores:
        md += ["## VQA scores", ""]
        for s in scores:
            d = s.data
            md += [
                f"### `{s.path.name}` - protocol `{d['protocol']}`",
                "",
                f"Protocol: {PROTOCOL_DESCRIPTIONS.get(d['protocol'], 'unknown protocol')}.",
                "",
            ]
            if d.get("inputs"):
                md += [
                    f"Inputs: gt `{d['inputs'].get('gt')}`, predictions `{d['inputs'].get('pred')}`"
                    + (f", candidates `{d['inputs']['candidates']}`" if d["inputs"].get("candidates") else "")
                    + ".",
                    "",
                ]
            skipped = (d.get("skipped") or {}).get("count", 0)
            md += [
                f"Questions: {d['counts']['open']} open, {d['counts']['closed']} closed"
                + (f", {skipped} skipped (answer types {d['skipped']['answer_types']})" if skipped else "")
                + ".",
                "",
            ]
            ci = d.get("ci95") or {}
            md += ["| group | metric | value | CI95 |", "|---|---|---|---|"]
            for g in ("open", "closed"):
                for m, v in d[g].items():
                    if v is not None:
                        md.append(f"| {g} | {m} | {_fmt(v)} | {_ci((ci.get(g) or {}).get(m))} |")
            if ci:
                md += ["", f"CI95: {ci.get('method')}, {ci.get('resamples')} resamples, seed {ci.get('seed')}."]
            pqt = per_question_type(d)
            if pqt:
                md += [
                    "",
                    "Accuracy per question type:",
                    "",
                    "| question type | n | accuracy | CI95 |",
                    "|---|---|---|---|",
                ]
                md += [f"| {k} | {v['n']} | {_fmt(v['accuracy'])} | {_ci(v['ci95'])} |" for k, v in pqt.items()]
            md.append("")
        cats = [label for _, _, label in MAIN_METRICS]
        series = [
            (
                s.label,
                [s.data[g].get(m) for g, m, _ in MAIN_METRICS],
                [((s.data.get("ci95") or {}).get(g) or {}).get(m) for g, m, _ in MAIN_METRICS],
            )
            for s in scores
        ]
        bar_chart("VQA metrics per protocol", "score (x100)", cats, series, run_dir / "plot_protocols.png")
        qt = [per_question_type(s.data) for s in scores]
        qcats = sorted({k for t in qt for k in t})
        qseries = [
            (s.label, [t.get(k, {}).get("accuracy") for k in qcats], [t.get(k, {}).get("ci95") for k in qcats])
            for s, t in zip(scores, qt)
        ]
        bar_chart("Accuracy per question type", "accuracy (%)", qcats, qseries, run_dir / "plot_question_types.png")
        md += [
            "![VQA metrics per protocol](plot_protocols.png)",
            "",
            "![Accuracy per question type](plot_question_types.png)",
            "",
        ]

    if chats:
        md += [
            "## GPT-judged chat benchmark",
            "",
            "Relative score = mean over questions of model score / reference (GPT-4) score x 100 (as in the "
            "LLaVA-Med paper); ratio of means = model mean / reference mean x 100.",
            "",
        ]
        for p, summ in chats:
            md += [
                f"### `{p.name}`",
                "",
                "| group | count | failed | reference | model | relative score | CI95 | ratio of means |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for g in GROUPS:
                r = summ.get(g)
                if r is None:
                    continue
                md.append(
                    f"| {g} | {r['count']} | {r.get('failed', 0)} | {_fmt(r['reference_mean'])} | "
                    f"{_fmt(r['model_mean'])} | {_fmt(r['relative_score'])} | {_ci(r.get('relative_score_ci95'))} | "
                    f"{_fmt(r['ratio_of_means'])} |"
                )
            md.append("")
        gcats = [g for g in GROUPS if any((s.get(g) or {}).get("count") for _, s in chats)]
        cseries = [
            (
                p.stem,
                [(s.get(g) or {}).get("relative_score") for g in gcats],
                [(s.get(g) or {}).get("relative_score_ci95") for g in gcats],
            )
            for p, s in chats
        ]
        bar_chart(
            "Chat benchmark: relative score per group",
            "relative score (%)",
            gcats,
            cseries,
            run_dir / "plot_domains.png",
        )
        md += ["![Relative score per group](plot_domains.png)", ""]

    md += ["---", "", f"_{NOTICE}_", ""]
    out = run_dir / "report.md"
    write_text_atomic(out, "\n".join(md))
    return out

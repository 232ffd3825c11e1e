"""``medvlm eval compare A/bench.json B/bench.json``: paired-bootstrap differences of two bench runs.

Both runs must have answered the same questions (the converted split's hash and the question ids
must agree). For every task and protocol both ran, each headline metric's difference B - A gets a
95% interval from resampling the questions (the same resamples for both runs, stratified by
open / closed as in :mod:`medvlm.eval.bench`); the difference is "outside noise" when the interval
excludes 0. Identical per-question scores (e.g. a copy of a run under another name) give 0 [0, 0].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.eval.bench import HEADLINE
from medvlm.eval.bootstrap import METHOD, paired_difference
from medvlm.utils.io import read_json


def _load_bench(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise MedvlmError(f"{path}: not a bench.json of `medvlm eval bench`")
    return data


def _items(bench_path: Path, rel: str) -> dict[str, dict[str, Any]]:
    scores = read_json(bench_path.parent / rel)
    if not isinstance(scores, dict) or not isinstance(scores.get("per_item"), list):
        raise MedvlmError(f"{bench_path.parent / rel}: a scores file without per_item values")
    return {str(it["id"]): it for it in scores["per_item"]}


def compare_benches(
    a: str | os.PathLike, b: str | os.PathLike, resamples: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Paired differences B - A per task, protocol and headline metric (see the module doc)."""
    a, b = Path(a), Path(b)
    ba, bb = _load_bench(a), _load_bench(b)
    boot = ba.get("bootstrap") or {}
    resamples = resamples if resamples is not None else (boot.get("resamples") or 1000)
    seed = seed if seed is not None else int(boot.get("seed") or 0)
    if resamples < 1:
        raise MedvlmError(f"resamples must be >= 1 (got {resamples})")
    out: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
        "model_a": ba["model"]["model_id"],
        "model_b": bb["model"]["model_id"],
        "resamples": resamples,
        "seed": seed,
        "method": "paired " + METHOD,
        "tasks": {},
    }
    common = [t for t in ba["tasks"] if t in bb["tasks"]]
    if not common:
        raise MedvlmError(f"{a} and {b} have no task in common")
    for task in common:
        ta, tb = ba["tasks"][task], bb["tasks"][task]
        ha, hb = ta["source"].get("converted"), tb["source"].get("converted")
        if ha != hb or ba.get("split") != bb.get("split"):
            raise MedvlmError(
                f"{task}: the two runs answered different questions (split {ba.get('split')} vs "
                f"{bb.get('split')}, converted data {ha} vs {hb}); a paired comparison needs the same data"
            )
        res: dict[str, Any] = {}
        for protocol in [p for p in ta["scores"] if p in tb["scores"]]:
            ia, ib = _items(a, ta["scores"][protocol]), _items(b, tb["scores"][protocol])
            if set(ia) != set(ib):
                raise MedvlmError(
                    f"{task}/{protocol}: the runs scored different question ids ({len(set(ia) ^ set(ib))} differ)"
                )
            ids = list(ia)
            metrics: dict[str, Any] = {}
            for g, m in HEADLINE[protocol]:
                sel = ids if g == "overall" else [i for i in ids if ia[i]["type"] == g]
                d = paired_difference(
                    {m: [float(ia[i][m]) for i in sel]}, {m: [float(ib[i][m]) for i in sel]}, resamples, seed, key=g
                )
                metrics[f"{g} {m}"] = d[m]
            res[protocol] = metrics
        out["tasks"][task] = res
    out["any_outside_noise"] = any(
        v["outside_noise"] for t in out["tasks"].values() for p in t.values() for v in p.values()
    )
    return out

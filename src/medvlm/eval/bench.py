"""``medvlm eval bench``: VQA-RAD / SLAKE / PathVQA in one command, every protocol, with bootstrap CIs.

For each task: find the data (public release, hub parquet / JSON + zip, or a Hugging Face cache;
:mod:`medvlm.data.benchmarks.hub`), convert it once into ``OUT/TASK/data`` (reused while the source files'
hashes are unchanged), answer the split with the batched, resumable answerer of
:mod:`medvlm.eval.vqa` (a rerun answers only what is missing), score with every named protocol,
add percentile-bootstrap intervals (:mod:`medvlm.eval.bootstrap`) and per question type / modality
breakdowns, and write::

    OUT/bench.json                  model, data hashes, split, prompt suffix, decoding, protocol versions,
                                    headline numbers
    OUT/report.md, OUT/plot_*.png   the table with intervals and the plots (medvlm.eval.bench_report)
    OUT/TASK/data/                  the converted dataset (test.json, images/, train_open_answers.json, source.json)
    OUT/TASK/questions.json         what the model was asked (prompt suffix applied)
    OUT/TASK/model.json             hashes of the model files that wrote the answers
    OUT/TASK/answers.jsonl          answers (+ decoding.json beside them)
    OUT/TASK/scores_PROTOCOL.json   per-item and aggregate scores, ci95, breakdowns
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm import __version__
from medvlm.errors import MedvlmError
from medvlm.eval.bootstrap import METHOD, category_cis, group_cis
from medvlm.eval.protocols import PROTOCOL_DESCRIPTIONS, PROTOCOL_VERSIONS, PROTOCOLS, score_files
from medvlm.notice import NOTICE
from medvlm.utils.io import read_json, write_json_atomic

TASKS: tuple[str, ...] = ("vqa-rad", "slake", "pathvqa")
BENCH_FILE = "bench.json"
# The numbers a table shows per protocol (every metric of every group still gets an interval in the scores files).
HEADLINE: dict[str, tuple[tuple[str, str], ...]] = {
    "llava-med": (("open", "recall"), ("closed", "accuracy")),
    "llava-med-single": (("open", "accuracy"), ("closed", "accuracy")),
    "strict": (("open", "accuracy"), ("open", "f1"), ("closed", "accuracy"), ("overall", "accuracy")),
    "exact-match": (("open", "accuracy"), ("closed", "accuracy"), ("overall", "accuracy")),
}
BREAKDOWNS: tuple[str, ...] = ("question_type", "modality")


@dataclass
class BenchConfig:
    """One ``medvlm eval bench`` run."""

    tasks: list[str]
    """Benchmarks to run, from :data:`TASKS`."""
    model: Path
    """A saved medvlm model folder."""
    data: dict[str, Path]
    """Source folder per task (release files, hub files, or a Hugging Face cache)."""
    out: Path
    """The bench folder (reused by a rerun: converted data and answers are kept)."""
    split: str = "test"
    """Split answered and scored (``test``, or ``validation`` where the dataset has one)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the CI95 of every metric (0 = none)."""
    seed: int = 0
    """Bootstrap seed."""
    prompt_suffix: str = ""
    """Text appended to every question the model sees
    (e.g. ``\\nAnswer the question using a single word or phrase.``)."""
    closed_options: bool = False
    """Append LLaVA-Med's ``Please choose from the following two options: [yes, no]`` to yes/no questions."""
    settings: Any = None
    """:class:`medvlm.infer.engine.GenerationSettings` (greedy, 64 new tokens when None)."""
    batch_size: int = 16
    """Questions per generate call."""
    processes: int = 1
    """Answering processes (see ``medvlm eval vqa --processes``)."""
    model_id: str | None = None
    """``model_id`` of the answers (default: the model folder name)."""
    progress: bool = True
    """Show progress bars."""
    protocols: tuple[str, ...] = PROTOCOLS
    """Protocols scored (all by default)."""


def file_sha256(path: Path, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{sha256, bytes, mtime_ns}`` of a file; reuses ``cache[str(path)]`` when size and mtime are unchanged."""
    st = path.stat()
    old = (cache or {}).get(str(path))
    if (
        isinstance(old, dict)
        and old.get("bytes") == st.st_size
        and old.get("mtime_ns") == st.st_mtime_ns
        and old.get("sha256")
    ):
        return old
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_sha256(root: Path) -> str:
    """One hash over every file under ``root`` (relative names and bytes, sorted): the converted images."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def resolve_data(tasks: list[str], data: list[str]) -> dict[str, Path]:
    """``--data DIR`` (a dataset folder, a folder with one sub-folder per task, or a HF cache) or
    ``--data TASK=DIR``."""
    out: dict[str, Path] = {}
    plain: list[Path] = []
    for d in data:
        task, sep, path = d.partition("=")
        if sep and task in TASKS:
            out[task] = Path(path).expanduser()
        elif sep and not Path(d).exists():
            raise MedvlmError(f"--data {d}: {task!r} is not a task; use TASK=DIR with TASK one of {', '.join(TASKS)}")
        else:
            plain.append(Path(d).expanduser())
    if len(plain) > 1:
        raise MedvlmError("give one plain --data DIR, or one --data TASK=DIR per task")
    for t in tasks:
        if t in out:
            continue
        if not plain:
            raise MedvlmError(f"no data folder for task {t}: pass --data DIR or --data {t}=DIR")
        out[t] = plain[0] / t if (plain[0] / t).is_dir() else plain[0]
    return {t: out[t] for t in tasks}


def _prepare_data(
    task: str, src: Path, tdir: Path, closed_options: bool, split: str, old: dict[str, Any]
) -> dict[str, Any]:
    """Convert (or reuse) the task's data; returns the source record for bench.json."""
    from medvlm.data.benchmarks.hub import convert_benchmark, locate

    info = locate(task, src)
    cache = {str(info.folder / k): v for k, v in ((old.get("source") or {}).get("files") or {}).items()}
    files = {p.relative_to(info.folder).as_posix(): file_sha256(p, cache) for p in info.files}
    record = {
        "path": str(src),
        "folder": str(info.folder),
        "layout": info.layout,
        "files": files,
        "closed_options": closed_options,
    }
    data_dir = tdir / "data"
    prev = read_json(data_dir / "source.json") if (data_dir / "source.json").is_file() else None

    def digests(fs: Any) -> dict[str, Any]:  # content only: a touched or moved file is the same data
        return {k: (v or {}).get("sha256") for k, v in (fs or {}).items()}

    same = (
        isinstance(prev, dict)
        and digests(prev.get("files")) == digests(files)
        and prev.get("closed_options") == closed_options
        and prev.get("layout") == info.layout
    )
    if not same:
        if (tdir / "answers.jsonl").is_file():
            raise MedvlmError(
                f"{tdir}: holds answers to another version of the {task} data (the source files or "
                "--closed-options changed); use a new --out or delete that folder"
            )
        convert_benchmark(task, src, data_dir, closed_options=closed_options, overwrite=True)
        write_json_atomic(data_dir / "source.json", record)
    if not (data_dir / f"{split}.json").is_file():
        raise MedvlmError(
            f"{task}: the data has no {split!r} split (found: "
            + ", ".join(sorted(p.stem for p in data_dir.glob("*.json") if p.stem in ("train", "validation", "test")))
            + ")"
        )
    record["converted"] = {
        f"{split}.json": file_sha256(data_dir / f"{split}.json")["sha256"],
        "images": folder_sha256(data_dir / "images"),
    }
    return record


def _write_questions(gt_path: Path, dest: Path, suffix: str, answered: bool) -> int:
    """The split's records with ``suffix`` appended to each question (scoring still reads the gt file).

    With answers already in the folder, the questions must be the ones they answer (same data, split,
    prompt suffix and closed options): a changed set is refused rather than mixed.
    """
    recs = read_json(gt_path)
    out = []
    for r in recs:
        r = dict(r)
        conv = [dict(t) for t in r["conversations"]]
        conv[0]["value"] = conv[0]["value"] + suffix
        r["conversations"] = conv
        out.append(r)
    if answered and dest.is_file() and read_json(dest) != out:
        raise MedvlmError(
            f"{dest.parent}: holds answers to other questions (the split, --prompt-suffix, "
            "--closed-options or the data changed); use a new --out or delete that folder"
        )
    write_json_atomic(dest, out)
    return len(out)


def _per_group_values(result: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    groups: dict[str, dict[str, list[float]]] = {}
    for g in ("open", "closed"):
        metrics = [m for m, v in result[g].items() if v is not None]
        items = [it for it in result["per_item"] if it["type"] == g]
        groups[g] = {m: [float(it[m]) for it in items] for m in metrics}
    return groups


def add_intervals(result: dict[str, Any], gt: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Add ``ci95`` (every metric, plus overall accuracy), ``overall`` and ``breakdowns`` to a scores result."""
    per_group = _per_group_values(result)
    acc = [float(it["accuracy"]) for it in result["per_item"]]
    result["overall"] = {"accuracy": sum(acc) / len(acc) * 100 if acc else 0.0}
    cis = group_cis(per_group, resamples, seed) if resamples > 0 else {}
    result["ci95"] = {"method": METHOD, "resamples": resamples, "seed": seed, **cis} if resamples > 0 else {}
    by_id = {str(r["id"]): r for r in gt}
    result["breakdowns"] = {}
    for key in BREAKDOWNS:
        cats = [by_id.get(str(it["id"]), {}).get(key) for it in result["per_item"]]
        if any(c for c in cats):
            result["breakdowns"][key] = category_cis(acc, [str(c or "unknown") for c in cats], resamples, seed)
    return result


def headline(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The table's numbers of one scores result: ``{"open recall": {"value", "ci95"}, ...}``."""
    out = {}
    for g, m in HEADLINE[result["protocol"]]:
        out[f"{g} {m}"] = {
            "value": (result.get(g) or {}).get(m),
            "ci95": ((result.get("ci95") or {}).get(g) or {}).get(m),
        }
    return out


def _model_record(model: Path, old: dict[str, Any]) -> dict[str, Any]:
    cache = {str(model / k): v for k, v in ((old.get("model") or {}).get("files") or {}).items()}
    files = {
        p.relative_to(model).as_posix(): file_sha256(p, cache)
        for p in sorted(model.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }
    return {"path": str(model.resolve()), "files": files}


def _check_model(model: dict[str, Any], tdir: Path, answered: bool) -> None:
    """Answers already in ``tdir`` must come from the same model files (``model.json`` records their hashes)."""
    record = {"path": model["path"], "files": {k: v["sha256"] for k, v in model["files"].items()}}
    path = tdir / "model.json"
    if answered and path.is_file():
        old = read_json(path)
        if isinstance(old, dict) and old.get("files") != record["files"]:
            raise MedvlmError(
                f"{tdir}: holds answers of another model ({old.get('path')}, files differ from "
                f"{record['path']}); use a new --out or delete that folder"
            )
    write_json_atomic(path, record)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; writes the bench folder and returns ``bench.json``'s object."""
    from medvlm.eval.bench_report import write_bench_report
    from medvlm.eval.vqa import run_vqa, settings_dict
    from medvlm.infer.engine import GenerationSettings

    started = time.time()
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad or not cfg.tasks:
        raise MedvlmError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)} or all")
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    if bad:
        raise MedvlmError(f"unknown protocol(s) {bad}; known: {', '.join(PROTOCOLS)}")
    if cfg.bootstrap < 0:
        raise MedvlmError(f"--bootstrap must be >= 0 (got {cfg.bootstrap})")
    if not Path(cfg.model).is_dir():
        raise MedvlmError(f"--model {cfg.model}: not a model folder")
    settings = (cfg.settings or GenerationSettings()).validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    old = read_json(out / BENCH_FILE) if (out / BENCH_FILE).is_file() else {}
    old = old if isinstance(old, dict) else {}
    model_id = cfg.model_id or Path(cfg.model).resolve().name
    bench: dict[str, Any] = {
        "notice": NOTICE,
        "medvlm_version": __version__,
        "model": {"model_id": model_id, **_model_record(Path(cfg.model), old)},
        "split": cfg.split,
        "prompt_suffix": cfg.prompt_suffix,
        "closed_options": cfg.closed_options,
        "decoding": settings_dict(settings),
        "batch_size": cfg.batch_size,
        "protocols": {
            p: {"version": PROTOCOL_VERSIONS[p], "description": PROTOCOL_DESCRIPTIONS[p]} for p in cfg.protocols
        },
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "method": METHOD},
        "tasks": {},
    }
    for task in cfg.tasks:
        tdir = out / task
        tdir.mkdir(parents=True, exist_ok=True)
        answered = (tdir / "answers.jsonl").is_file()
        _check_model(bench["model"], tdir, answered)
        source = _prepare_data(
            task, cfg.data[task], tdir, cfg.closed_options, cfg.split, (old.get("tasks") or {}).get(task) or {}
        )
        gt_path = tdir / "data" / f"{cfg.split}.json"
        questions = tdir / "questions.json"
        n = _write_questions(gt_path, questions, cfg.prompt_suffix, answered)
        res = run_vqa(
            cfg.model,
            questions,
            tdir / "answers.jsonl",
            tdir / "data" / "images",
            settings,
            batch_size=cfg.batch_size,
            processes=cfg.processes,
            model_id=model_id,
            progress=cfg.progress,
        )
        gt = read_json(gt_path)
        cands = tdir / "data" / "train_open_answers.json"
        scores: dict[str, str] = {}
        heads: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for protocol in cfg.protocols:
            if protocol == "llava-med-single" and not (read_json(cands) or {}).get("0"):
                skipped[protocol] = "the train split has no open answers to use as candidates"
                continue
            result = score_files(gt_path, res.out, protocol, cands if protocol == "llava-med-single" else None)
            result["protocol_version"] = PROTOCOL_VERSIONS[protocol]
            add_intervals(result, gt, cfg.bootstrap, cfg.seed)
            name = f"scores_{protocol}.json"
            write_json_atomic(tdir / name, result)
            scores[protocol] = f"{task}/{name}"
            heads[protocol] = headline(result)
        bench["tasks"][task] = {
            "source": source,
            "n_questions": n,
            "answered_this_run": res.answered,
            "already_answered": res.resumed,
            "answers": f"{task}/answers.jsonl",
            "decoding_file": f"{task}/decoding.json",
            "scores": scores,
            "headline": heads,
            "skipped_protocols": skipped,
        }
    bench["seconds"] = round(time.time() - started, 3)
    write_json_atomic(out / BENCH_FILE, bench)
    write_bench_report(out)
    return bench

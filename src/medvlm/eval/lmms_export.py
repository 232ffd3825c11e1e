"""``medvlm eval export-lmms``: a VQA benchmark as an lmms-eval task folder (``lmms-eval --include_path DIR``).

The folder holds ``TASK.yaml`` (``dataset_path: json`` over the folder's ``test.jsonl`` by absolute
path: move the folder and export again), ``utils.py`` (doc_to_visual / doc_to_text / process_results and one
aggregation per metric), ``test.jsonl`` (the converted split, one doc per question, with the fields
scoring needs), ``images/`` and, for ``llava-med-single``, ``candidates.json``.

``process_results`` scores with :func:`medvlm.eval.protocols.score_item` and the aggregations with
:func:`medvlm.eval.protocols.mean_x100` over the documents in test-file order, so the numbers are the
ones ``medvlm eval score`` prints for the same answers. ``utils.py`` imports medvlm when it is
installed with the same protocol version, else ``medvlm_scoring/``: a copy of medvlm's scoring
modules written by this exporter from the installed sources (imports rewritten to relative ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from medvlm import __version__
from medvlm.errors import MedvlmError
from medvlm.eval.protocols import (
    ANSWER_TYPES,
    PROTOCOL_DESCRIPTIONS,
    PROTOCOL_VERSIONS,
    PROTOCOLS,
    defined_metrics,
    gold_answer,
    question_options,
    read_candidates,
    read_gt,
)
from medvlm.notice import NOTICE
from medvlm.utils.io import atomic_dir, write_json_atomic

# medvlm modules copied into medvlm_scoring/ (package-relative file -> copy name) and the import rewrites.
SCORING_SOURCES: tuple[tuple[str, str], ...] = (
    ("errors.py", "errors.py"),
    ("utils/io.py", "io.py"),
    ("eval/normalize.py", "normalize.py"),
    ("eval/metrics.py", "metrics.py"),
    ("eval/bootstrap.py", "bootstrap.py"),
    ("eval/protocols.py", "protocols.py"),
)
IMPORT_REWRITES: tuple[tuple[str, str], ...] = (
    ("from medvlm.errors import", "from .errors import"),
    ("from medvlm.utils.io import", "from .io import"),
    ("from medvlm.eval.normalize import", "from .normalize import"),
    ("from medvlm.eval import metrics as M", "from . import metrics as M"),
    ("from medvlm.eval.bootstrap import", "from .bootstrap import"),
)


def task_name(task: str, protocol: str) -> str:
    """lmms-eval task name: ``medvlm_vqa_rad_strict``."""
    return "medvlm_" + re.sub(r"[^a-z0-9]+", "_", f"{task}_{protocol}".lower())


def metric_names(protocol: str) -> list[tuple[str, str]]:
    """``(group, metric)`` pairs the task reports: every metric the protocol defines, and overall accuracy."""
    return [(g, m) for g, ms in defined_metrics(protocol).items() for m in ms] + [("overall", "accuracy")]


def scoring_copy_sources() -> dict[str, str]:
    """The text of each ``medvlm_scoring/`` file as this medvlm would write it (imports rewritten)."""
    root = Path(__file__).resolve().parents[1]
    out = {}
    for rel, name in SCORING_SOURCES:
        text = (root / rel).read_text(encoding="utf-8")
        for old, new in IMPORT_REWRITES:
            text = text.replace(old, new)
        if re.search(r"^\s*(from|import) medvlm\b", text, re.MULTILINE):
            raise MedvlmError(f"medvlm/{rel}: an import the scoring copy cannot rewrite; update IMPORT_REWRITES")
        out[name] = text
    digest = hashlib.sha256("".join(out[n] for _, n in SCORING_SOURCES).encode("utf-8")).hexdigest()
    out["__init__.py"] = (
        f'"""medvlm {__version__} scoring code, copied by `medvlm eval export-lmms`. {NOTICE}"""\n\n'
        f'MEDVLM_VERSION = "{__version__}"\nSOURCES_SHA256 = "{digest}"\n'
    )
    return out


_UTILS = '''"""lmms-eval hooks of {task_name}, written by `medvlm eval export-lmms` (medvlm {version}).

{notice}

Protocol `{protocol}` (version {protocol_version}): {description}.
process_results scores one answer exactly as `medvlm eval score --protocol {protocol}` does; each
aggregation is medvlm's mean x 100 over the documents in test.jsonl order.
"""

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
PROTOCOL = {protocol!r}
PROTOCOL_VERSION = {protocol_version!r}
METRICS = {metrics!r}


def _load_protocols():
    """medvlm's scorer when installed at the same protocol version, else the copy beside this file."""
    try:
        from medvlm.eval import protocols

        if protocols.PROTOCOL_VERSIONS.get(PROTOCOL) == PROTOCOL_VERSION:
            return protocols, "medvlm"
    except ImportError:
        pass
    # one module name per task folder: tasks exported by different medvlm versions can run in one process
    name = "medvlm_scoring_" + hashlib.sha256(str(HERE).encode("utf-8")).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "medvlm_scoring" / "__init__.py",
                                                      submodule_search_locations=[str(HERE / "medvlm_scoring")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(name + ".protocols"), "copy"


P, SCORER = _load_protocols()
CANDIDATES = None
if (HERE / "candidates.json").is_file():  # llava-med-single's candidate answers (the train split's open answers)
    CANDIDATES = P.M.normalize_candidates(json.loads((HERE / "candidates.json").read_text(encoding="utf-8")))


def doc_to_visual(doc):
    # the export wrote these images itself; still, only the raster formats medvlm reads are opened
    with Image.open(HERE / doc["image"], formats=("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {{}}
    return f"{{kw.get('pre_prompt', '')}}{{doc['question']}}{{kw.get('post_prompt', '')}}"


def doc_to_target(doc):
    return doc["answer"]


def score_doc(doc, prediction):
    """medvlm's per-question values of this protocol for one answer."""
    item = P.ScoreItem(id=doc["id"], group=doc["group"], answer_type=doc["answer_type"], gold=doc["answer"],
                       pred=prediction, options=doc.get("options") or None, question_type=doc.get("question_type"))
    return P.score_item(item, PROTOCOL, CANDIDATES)


def process_results(doc, results):
    prediction = results[0] if results else ""
    row = score_doc(doc, prediction)
    out = {{}}
    for group, metric in METRICS:
        value = row.get(metric) if group in ("overall", doc["group"]) else None
        out[f"{{group}}_{{metric}}"] = {{"i": doc["doc_index"], "group": doc["group"],
                                        "value": None if value is None else float(value)}}
    return out


def _aggregate(group, items):
    chosen = sorted((it for it in items if it["value"] is not None and group in ("overall", it["group"])),
                    key=lambda it: it["i"])
    return P.mean_x100([it["value"] for it in chosen])

{aggregations}
'''


def _utils_py(task: str, protocol: str) -> str:
    aggs = "\n".join(
        f"\ndef agg_{g}_{m}(items):\n    return _aggregate({g!r}, items)\n" for g, m in metric_names(protocol)
    )
    return _UTILS.format(
        task_name=task_name(task, protocol),
        version=__version__,
        notice=NOTICE,
        protocol=protocol,
        protocol_version=PROTOCOL_VERSIONS[protocol],
        description=PROTOCOL_DESCRIPTIONS[protocol],
        metrics=[list(x) for x in metric_names(protocol)],
        aggregations=aggs,
    )


def _task_yaml(task: str, protocol: str, prompt_suffix: str, max_new_tokens: int, data_file: Path) -> str:
    name = task_name(task, protocol)
    fn = "!function utils.{}"
    cfg: dict[str, Any] = {
        # An absolute path: lmms-eval 0.6 passes data_files to datasets as given (0.7 resolves relative ones).
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": fn.format("doc_to_visual"),
        "doc_to_text": fn.format("doc_to_text"),
        "doc_to_target": fn.format("doc_to_target"),
        "process_results": fn.format("process_results"),
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "metric_list": [
            {"metric": f"{g}_{m}", "aggregation": fn.format(f"agg_{g}_{m}"), "higher_is_better": True}
            for g, m in metric_names(protocol)
        ],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": prompt_suffix}},
        "metadata": {
            "version": PROTOCOL_VERSIONS[protocol],
            "medvlm_version": __version__,
            "protocol": protocol,
            "dataset": task,
        },
    }
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
    # lmms-eval resolves `!function module.name` tags; safe_dump quoted them as plain strings.
    return re.sub(r"'(!function [A-Za-z0-9_.]+)'", r"\1", text)


def export_lmms_task(
    task: str,
    protocol: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    prompt_suffix: str = "",
    closed_options: bool = False,
    max_new_tokens: int = 64,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert ``task`` from ``data`` and write the lmms-eval task folder ``out``; returns a summary."""
    from medvlm.data.benchmarks.hub import HUB_REPOS, convert_benchmark

    if task not in HUB_REPOS:
        raise MedvlmError(f"unknown task {task!r}; choose one of {', '.join(HUB_REPOS)}")
    if protocol not in PROTOCOLS:
        raise MedvlmError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedvlmError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    with atomic_dir(out) as tmp:
        conv = tmp / ".converted"
        convert_benchmark(task, data, conv, closed_options=closed_options)
        gt_path = conv / f"{split}.json"
        if not gt_path.is_file():
            raise MedvlmError(f"{task}: the data has no {split!r} split")
        docs = []
        for i, rec in enumerate(read_gt(gt_path)):
            where = f"{gt_path}: record {i}"
            group = ANSWER_TYPES.get(rec["answer_type"])
            if group is None:
                continue
            q = rec["conversations"][0]["value"].replace("<image>", "").strip()
            img = Path("images") / rec["image"]
            (tmp / img).parent.mkdir(parents=True, exist_ok=True)
            if not (tmp / img).exists():
                shutil.copyfile(conv / "images" / rec["image"], tmp / img)
            docs.append(
                {
                    "doc_index": len(docs),
                    "id": str(rec["id"]),
                    "question": q,
                    "answer": gold_answer(rec, where),
                    "answer_type": rec["answer_type"],
                    "group": group,
                    "options": question_options(rec) or [],
                    "question_type": rec.get("question_type"),
                    "modality": rec.get("modality"),
                    "image": img.as_posix(),
                }
            )
        if protocol == "llava-med-single":
            cands = (
                read_candidates(conv / "train_open_answers.json")
                if (conv / "train_open_answers.json").is_file()
                else []
            )
            write_json_atomic(tmp / "candidates.json", cands)
        (tmp / "test.jsonl").write_text(
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
        )
        shutil.rmtree(conv)
        (tmp / f"{task_name(task, protocol)}.yaml").write_text(
            _task_yaml(task, protocol, prompt_suffix, max_new_tokens, out.resolve() / "test.jsonl"), encoding="utf-8"
        )
        (tmp / "utils.py").write_text(_utils_py(task, protocol), encoding="utf-8")
        (tmp / "medvlm_scoring").mkdir()
        for name, text in scoring_copy_sources().items():
            (tmp / "medvlm_scoring" / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(
            f"# {task_name(task, protocol)}\n\n> **Research use only.** {NOTICE}\n\n"
            f"lmms-eval task written by `medvlm eval export-lmms` (medvlm {__version__}): {task} {split} split, "
            f"protocol `{protocol}` v{PROTOCOL_VERSIONS[protocol]} ({PROTOCOL_DESCRIPTIONS[protocol]}).\n\n"
            f"Run: `lmms-eval --include_path {out} --tasks {task_name(task, protocol)} --model ...`\n",
            encoding="utf-8",
        )
    return {"task_name": task_name(task, protocol), "n_questions": len(docs), "out": str(out)}

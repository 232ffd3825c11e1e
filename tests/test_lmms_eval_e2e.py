"""End to end with the real lmms-eval: ``lmms-eval --model openai --include_path`` runs the exported tasks
against ``medvlm serve api`` (a tiny model) and against scripted answers; the aggregate numbers it writes
equal ``medvlm eval score`` on the answers it logged (``--log_samples``).

lmms-eval is an optional extra that pip cannot resolve here (0.2.1-0.7.3 require torchvision); it is
installed with ``pip install 'medvlm[lmms]' && pip install --no-deps 'lmms-eval==0.6.1'`` (README). Without
it this module fails at import (scripts/bootstrap.sh installs it, so CI always runs it: no silent skip);
tests/test_lmms_export.py checks the same contract without lmms-eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import lmms_eval  # noqa: E402,F401  (install: pip install 'medvlm[lmms]' && pip install --no-deps 'lmms-eval==0.6.1')
import pytest

from bench_helpers import tiny_model, write_all  # noqa: E402
from lmms_helpers import lmms_keys, read_docs, scripted_answer, write_answers  # noqa: E402
from medvlm.data.benchmarks.hub import convert_benchmark  # noqa: E402
from medvlm.eval.lmms_export import export_lmms_task, task_name  # noqa: E402
from medvlm.eval.protocols import score_files  # noqa: E402
from medvlm.serve.server import free_port  # noqa: E402
from openai_test_server import last_user_text, openai_server_factory  # noqa: E402,F401

SUFFIX = "\nAnswer briefly."
HERE = Path(__file__).resolve().parent


def _env(hf_home: Path | None = None) -> dict[str, str]:
    src = str(Path(__import__("medvlm").__file__).resolve().parents[1])
    env = dict(os.environ, OPENAI_API_KEY="unused", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, str(HERE)]))
    if hf_home is not None:  # datasets caches the task's JSONL here, offline, not in the user's home
        env.update(HF_HOME=str(hf_home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return env


def _run_lmms(include: Path, tasks: list[str], base_url: str, model: str, out: Path) -> dict:
    """``lmms-eval --model openai ... --include_path ... --log_samples``; its aggregates and logged answers per task."""
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "openai",
        "--model_args",
        f"model_version={model},base_url={base_url}",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(out / "hf_home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = out.glob("*/*_results.json")
    data = json.loads(results.read_text())
    numbers = {
        t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "_stderr" not in k}
        for t, r in data["results"].items()
    }
    answers = {}
    for t in tasks:
        (samples,) = out.glob(f"*/*_samples_{t}.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        (yaml_path,) = include.rglob(f"{t}.yaml")
        docs = read_docs(yaml_path.parent)  # doc_id is the row of test.jsonl (the logged samples omit the doc)
        answers[t] = {docs[r["doc_id"]]["id"]: r["filtered_resps"][0] for r in rows}
    return {"numbers": numbers, "answers": answers}


def _export(root: Path, cases: list[tuple[str, str]], data: dict[str, Path]) -> dict[tuple[str, str], Path]:
    return {
        (t, p): Path(export_lmms_task(t, p, data[t], root / f"{t}-{p}", prompt_suffix=SUFFIX, max_new_tokens=8)["out"])
        for t, p in cases
    }


def _check(run: dict, cases, gt_root: Path, data: dict[str, Path], tmp: Path) -> list[dict]:
    checked = []
    for task, protocol in cases:
        name = task_name(task, protocol)
        gt = gt_root / task
        if not gt.is_dir():
            convert_benchmark(task, data[task], gt)
        answers = run["answers"][name]
        assert len(answers) == 6
        res = score_files(
            gt / "test.json",
            write_answers(tmp / f"{name}.jsonl", answers),
            protocol,
            gt / "train_open_answers.json" if protocol == "llava-med-single" else None,
        )
        want = lmms_keys(res)
        assert run["numbers"][name] == want, name
        checked.append(want)
    return checked


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmms_e2e")
    return {"root": root, "data": write_all(root / "data"), "model": tiny_model(root)}


def test_lmms_eval_against_medvlm_serve_api_equals_eval_score(setup, tmp_path):
    cases = [("vqa-rad", "llava-med"), ("slake", "strict"), ("pathvqa", "exact-match")]
    include = tmp_path / "tasks"
    _export(include, cases, setup["data"])
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medvlm",
            "serve",
            "api",
            "--model",
            str(setup["model"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "medvlm serve api did not start"
            time.sleep(0.3)
        run = _run_lmms(
            include, [task_name(t, p) for t, p in cases], f"http://127.0.0.1:{port}/v1", "tiny", tmp_path / "run"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    _check(run, cases, tmp_path / "gt", setup["data"], tmp_path)
    texts = [a for t in run["answers"].values() for a in t.values()]
    assert len(set(texts)) > 3 and all(isinstance(a, str) and a for a in texts)  # the tiny model answered


def test_lmms_eval_with_scripted_answers_equals_eval_score(setup, tmp_path, openai_server_factory):
    """Non-trivial numbers (the tiny model scores ~0): a scripted server answers right, half-right or wrong."""
    cases = [("slake", "llava-med-single"), ("vqa-rad", "strict"), ("pathvqa", "llava-med")]
    include = tmp_path / "tasks"
    exported = _export(include, cases, setup["data"])
    script = {}
    for out in exported.values():
        for i, d in enumerate(read_docs(out)):
            assert d["question"] not in script
            script[d["question"]] = scripted_answer(d["answer"], i)

    def respond(body) -> str:
        text = last_user_text(body)
        assert text.endswith(SUFFIX), text
        return script[text[: -len(SUFFIX)]]

    server = openai_server_factory(respond)
    run = _run_lmms(include, [task_name(t, p) for t, p in cases], server.base_url, "scripted", tmp_path / "run")
    numbers = _check(run, cases, tmp_path / "gt", setup["data"], tmp_path)
    assert all(any(0 < v < 100 for v in n.values()) for n in numbers)
    images = [
        p
        for r in server.requests
        for m in r.body["messages"]
        for p in m["content"]
        if isinstance(m["content"], list) and p.get("type") == "image_url"
    ]
    assert len(images) == 18  # every question went with its image

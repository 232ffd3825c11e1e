"""``medvlm eval ...``: score VQA answers under a named protocol, run the GPT-judged chat benchmark, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.llm import LLMConfig, llm_options
from medvlm.notice import SHORT_NOTICE
from medvlm.utils.cli import renamed

app = typer.Typer(
    help=f"Evaluate answers: VQA scoring protocols, the GPT-judged chat benchmark, reports. {SHORT_NOTICE}",
    no_args_is_help=True,
)


def _scores_table(result: dict) -> object:
    from rich.table import Table

    table = Table(
        title=f"protocol {result['protocol']}: {result['counts']['open']} open, "
        f"{result['counts']['closed']} closed, {result['skipped']['count']} skipped"
    )
    for col in ("group", "metric", "value", "CI95"):
        table.add_column(col, justify="left" if col in ("group", "metric") else "right")
    ci = result.get("ci95") or {}
    for g in ("open", "closed"):
        for m, v in result[g].items():
            if v is not None:
                c = (ci.get(g) or {}).get(m)
                table.add_row(g, m, f"{v:.4f}", "-" if not c else f"[{c[0]:.2f}, {c[1]:.2f}]")
    return table


@app.command()
def score(
    gt: Annotated[Path, typer.Option("--gt", help="Converted VQA test.json (id, answer_type, conversations).")],
    pred: Annotated[Path, typer.Option("--pred", help="Answer file JSONL (question_id, text).")],
    protocol: Annotated[str, typer.Option("--protocol", help="llava-med | llava-med-single | strict | exact-match.")],
    candidates: Annotated[
        Optional[Path], typer.Option("--candidates", help="Candidate answers {\"0\": [...]} (llava-med-single).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the scores JSON here.")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for CI95 (0 = none).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
) -> None:
    """Score an answer file against a converted VQA test set under one named protocol."""
    from rich.console import Console

    from medvlm.eval.protocols import score_files
    from medvlm.utils.io import write_json_atomic

    result = score_files(gt, pred, protocol, candidates, bootstrap=bootstrap, seed=seed)
    if out is not None:
        write_json_atomic(out, result)
    console = Console()
    console.print(_scores_table(result))
    if result["skipped"]["count"]:
        console.print(
            f"skipped {result['skipped']['count']} question(s) with answer types {result['skipped']['answer_types']}"
        )
    if out is not None:
        console.print(f"wrote {out}")


@app.command(cls=renamed({"--model": "--judge-model"}))
@llm_options(model_flag="--judge-model", model="gpt-4o")
def chat(
    questions: Annotated[Path, typer.Option("--questions", help="llava_med_eval_qa50_qa.jsonl.")],
    answers: Annotated[Path, typer.Option("--answers", help="Model answers JSONL (question_id, text).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Judged JSONL (resumable: scored questions are skipped). The LLM "
            "response cache defaults to OUT.llm_cache.sqlite beside it.",
        ),
    ],
    llm: LLMConfig,
    swap: Annotated[
        bool, typer.Option("--swap/--no-swap", help="Also judge with the answers in reverse order and average.")
    ] = False,
    parse_retries: Annotated[
        int, typer.Option("--parse-retries", help="Follow-up requests when a reply's scores cannot be read.")
    ] = 2,
) -> None:
    """Ask an LLM judge to score the model's answers against the GPT-4 references (LLaVA-Med's chat benchmark)."""
    from medvlm.eval.judge import judge_chat

    if llm.cache_path is None:
        llm.cache_path = out.with_name(out.name + ".llm_cache.sqlite")
    res = judge_chat(questions, answers, out, llm, swap=swap, parse_retries=parse_retries)
    typer.echo(
        f"judged {res.judged} question(s), {res.resumed} already in {out}, {res.parse_retries} follow-up(s) "
        f"for unreadable scores"
    )
    typer.echo(res.usage)
    if res.failed:
        typer.echo(f"{len(res.failed)} question(s) left without scores (rerun to retry):", err=True)
        for f in res.failed:
            typer.echo(f"  {f}", err=True)


@app.command("chat-summary")
def chat_summary(
    judged: Annotated[Path, typer.Argument(help="Judged JSONL from `medvlm eval chat`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the per-group summary JSON here.")] = None,
) -> None:
    """Per-group table (conversation, detailed description, domains, overall) of a judged chat benchmark."""
    from rich.console import Console

    from medvlm.eval.chat_summary import summarize_judged, summary_table

    summary = summarize_judged(judged, out)
    Console().print(summary_table(summary))
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="Folder with scores*.json / chat summaries.")]) -> None:
    """Write report.md and PNG plots for the scores and chat summaries in RUN_DIR."""
    from medvlm.eval.report import write_report

    typer.echo(f"wrote {write_report(run_dir)}")


@app.command(cls=renamed({"--model-id": "--served-model-name"}))
def vqa(
    model: Annotated[Path, typer.Option("--model", help="A saved medvlm model folder.")],
    questions: Annotated[Path, typer.Option("--questions", help="Converted VQA test.json or qa50-style JSONL (text).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Answer file (JSONL); decoding.json is written beside it. Resumable: answered questions are skipped.",
        ),
    ],
    image_folder: Annotated[
        Optional[Path], typer.Option("--image-folder", help="Folder the image paths are relative to.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Questions decoded together (rows of the continuous batch).")
    ] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Upper bound on answer tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass when sampling.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            help="Split the questions into K chunks answered by K processes (cores/K threads each), merged in order.",
        ),
    ] = 1,
    served_model_name: Annotated[
        Optional[str],
        typer.Option(
            "--served-model-name", help="The model's name in the answers (model_id; default: the model folder name)."
        ),
    ] = None,
    data_format: Annotated[
        str, typer.Option("--format", help="Questions file format (auto, vqa_test, qa50, ...).")
    ] = "auto",
    self_question: Annotated[
        int,
        typer.Option(
            "--self-question",
            help="STLLaVA-Med test-time self-questioning: the model "
            "describes the image and asks/answers K questions "
            "first (v1_sq models and model families).",
        ),
    ] = 0,
) -> None:
    """Answer a VQA test set with a model: batched, resumable, in the original answer-file format."""
    from medvlm.eval.vqa import run_vqa
    from medvlm.infer.engine import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    res = run_vqa(
        model,
        questions,
        out,
        image_folder,
        settings,
        batch_size=batch_size,
        processes=processes,
        model_id=served_model_name,
        format=data_format,
        self_question=self_question,
    )
    typer.echo(
        f"answered {res.answered} question(s) ({res.resumed} already in {out}) of {res.total} in "
        f"{res.seconds:.1f} s; wrote {res.out} and {res.decoding}"
    )


@app.command(cls=renamed({"--model-id": "--served-model-name"}))
def bench(
    task: Annotated[str, typer.Option("--task", help="vqa-rad | slake | pathvqa | all.")],
    model: Annotated[Path, typer.Option("--model", help="A saved medvlm model folder.")],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="DIR: the dataset folder (release files, hub parquet / "
            "JSON + imgs.zip), a folder with one sub-folder per task, or a "
            "Hugging Face hub / datasets cache; or TASK=DIR (repeatable).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Bench folder; a rerun keeps the converted data and answers.")],
    split: Annotated[str, typer.Option("--split", help="Split to answer and score.")] = "test",
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for every CI95 (0 = none).")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    prompt_suffix: Annotated[
        str,
        typer.Option(
            "--prompt-suffix",
            help="Appended to every question (e.g. "
            "'\\nAnswer the question using a single word or phrase.'; "
            "a literal \\n becomes a newline).",
        ),
    ] = "",
    closed_options: Annotated[
        bool,
        typer.Option(
            "--closed-options/--no-closed-options", help="Append LLaVA-Med's '[yes, no]' options to yes/no questions."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions per generate call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Upper bound on answer tokens.")] = 64,
    processes: Annotated[int, typer.Option("--processes", help="Answering processes (see eval vqa).")] = 1,
    served_model_name: Annotated[
        Optional[str],
        typer.Option("--served-model-name", help="The model's name in the answers (model_id; default: folder name)."),
    ] = None,
) -> None:
    """Answer and score VQA-RAD / SLAKE / PathVQA with every protocol, with bootstrap CI95; writes bench.json and
    report.md."""
    from medvlm.eval.bench import TASKS, BenchConfig, resolve_data, run_bench
    from medvlm.infer.engine import GenerationSettings

    tasks = list(TASKS) if task == "all" else [task]
    cfg = BenchConfig(
        tasks=tasks,
        model=model,
        data=resolve_data(tasks, data),
        out=out,
        split=split,
        bootstrap=bootstrap,
        seed=seed,
        prompt_suffix=prompt_suffix.replace("\\n", "\n"),
        closed_options=closed_options,
        settings=GenerationSettings(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
        processes=processes,
        model_id=served_model_name,
    )
    res = run_bench(cfg)
    for t, r in res["tasks"].items():
        typer.echo(
            f"{t}: {r['n_questions']} questions, {r['answered_this_run']} answered now, "
            f"{r['already_answered']} already answered"
        )
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'report.md'}")


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="bench.json of run A.")],
    b: Annotated[Path, typer.Argument(help="bench.json of run B (differences are B - A).")],
    bootstrap: Annotated[Optional[int], typer.Option("--bootstrap", help="Resamples (default: A's).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed (default: A's).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the comparison JSON here.")] = None,
) -> None:
    """Paired-bootstrap difference B - A of two `eval bench` runs, and whether it is outside noise."""
    from rich.console import Console
    from rich.table import Table

    from medvlm.eval.compare import compare_benches
    from medvlm.utils.io import write_json_atomic

    res = compare_benches(a, b, bootstrap, seed)
    if out is not None:
        write_json_atomic(out, res)
    table = Table(
        title=f"B ({res['model_b']}) - A ({res['model_a']}), {res['resamples']} paired resamples, seed {res['seed']}"
    )
    for col in ("task", "protocol", "metric", "A", "B", "B - A", "CI95", "outside noise"):
        table.add_column(col)
    for t, protos in res["tasks"].items():
        for p, metrics in protos.items():
            for m, d in metrics.items():
                if d["n"]:
                    table.add_row(
                        t,
                        p,
                        m,
                        f"{d['a']:.2f}",
                        f"{d['b']:.2f}",
                        f"{d['diff']:+.2f}",
                        f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]",
                        "YES" if d["outside_noise"] else "no",
                    )
    Console().print(table)
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command("export-lmms")
def export_lmms(
    task: Annotated[str, typer.Option("--task", help="vqa-rad | slake | pathvqa.")],
    protocol: Annotated[str, typer.Option("--protocol", help="llava-med | llava-med-single | strict | exact-match.")],
    data: Annotated[
        Path, typer.Option("--data", help="The dataset folder or a Hugging Face cache (as for eval bench).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Task folder to write (pass it to lmms-eval --include_path).")],
    split: Annotated[str, typer.Option("--split", help="Split to export.")] = "test",
    prompt_suffix: Annotated[
        str, typer.Option("--prompt-suffix", help="Appended to every question (\\n = newline).")
    ] = "",
    closed_options: Annotated[
        bool,
        typer.Option(
            "--closed-options/--no-closed-options", help="Append LLaVA-Med's '[yes, no]' options to yes/no questions."
        ),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="generation_kwargs.max_new_tokens.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Write an lmms-eval task folder (YAML, utils.py, test JSONL, images) scoring like `medvlm eval score`."""
    from medvlm.eval.lmms_export import export_lmms_task

    res = export_lmms_task(
        task,
        protocol,
        data,
        out,
        split=split,
        prompt_suffix=prompt_suffix.replace("\\n", "\n"),
        closed_options=closed_options,
        max_new_tokens=max_new_tokens,
        overwrite=overwrite,
    )
    typer.echo(
        f"wrote lmms-eval task {res['task_name']} ({res['n_questions']} questions) to {out}; run: "
        f"lmms-eval --include_path {out} --tasks {res['task_name']} ..."
    )

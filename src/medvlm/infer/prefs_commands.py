"""``medvlm prefs generate``: STLLaVA-Med preference pairs from a stage-1 model and an image-aware LLM judge.

Only calls :func:`medvlm.infer.prefs.generate_preferences`. ``--model`` is the VLM checkpoint, so the
judge's model name is ``--judge-model`` (the other endpoint options match the shared LLM option set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.notice import SHORT_NOTICE

app = typer.Typer(
    name="prefs",
    help=f"STLLaVA-Med self-training data: the model asks and answers, an LLM judge prefers. {SHORT_NOTICE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_LLM = "Judge endpoint"


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Option("--model", help="Stage-1 (sq) checkpoint: native with the v1_sq template, or a model family.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of unlabeled images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="prefs.json (STLLaVA-Med format); prefs.trl.jsonl is written beside it.")],
    questions_per_image: Annotated[int, typer.Option("--questions-per-image", help="Questions the model asks per image.")] = 5,
    ties: Annotated[str, typer.Option("--ties", help="drop: equal scores give no pair; second: the published rule (second answer chosen).")] = "drop",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N images.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed of question/answer sampling.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generation batch size.")] = 8,
    parse_retries: Annotated[int, typer.Option("--parse-retries", help="Re-asks when a judge reply has no readable scores.")] = 2,
    judge_model: Annotated[str, typer.Option("--judge-model", help="Judge model name (image-aware).", rich_help_panel=_LLM)] = "gpt-4o",
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible endpoint; default: OpenAI.", rich_help_panel=_LLM)] = None,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Variable holding the API key ('' = none).", rich_help_panel=_LLM)] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Judge requests in flight.", rich_help_panel=_LLM)] = 4,
    retries: Annotated[int, typer.Option("--retries", help="Retries per request.", rich_help_panel=_LLM)] = 5,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per HTTP request.", rich_help_panel=_LLM)] = 120.0,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="SQLite response cache (default: OUT.llm_cache.sqlite).", rich_help_panel=_LLM)] = None,
) -> None:
    """Describe each image, ask N questions, sample two answers each, let the judge choose; resumable."""
    from medvlm.infer.prefs import PrefsConfig, generate_preferences, summary
    from medvlm.llm.config import LLMConfig

    cfg = PrefsConfig(model=model, images=images, out=out, questions_per_image=questions_per_image, ties=ties,
                      limit=limit, seed=seed, batch_size=batch_size, parse_retries=parse_retries)
    llm = LLMConfig(model=judge_model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                    retries=retries, timeout=timeout, cache_path=cache)
    report = generate_preferences(cfg, llm)
    typer.echo(summary(report))
    if report.failed:
        typer.echo(f"{len(report.failed)} image(s) failed; rerun the same command to retry them "
                   "(finished images and cached judge replies are reused).", err=True)
        raise typer.Exit(1)

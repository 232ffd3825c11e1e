"""``medvlm prefs ...``, the ``infer`` area's verbs: ``prefs generate`` makes STLLaVA-Med preference pairs
from a stage-1 model and an image-aware LLM judge.

Only calls :func:`medvlm.infer.prefs.generate_preferences`. ``--model`` is the VLM checkpoint, so the
judge's model name is ``--judge-model``; the endpoint options are the shared set of :func:`medvlm.llm.llm_options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.llm.config import LLMConfig
from medvlm.llm.options import llm_options
from medvlm.notice import SHORT_NOTICE
from medvlm.utils.cli import renamed

app = typer.Typer(
    name="prefs",
    help=f"STLLaVA-Med self-training data: the model asks and answers, an LLM judge prefers. {SHORT_NOTICE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("generate", cls=renamed({"--images": "--image-folder"}))
@llm_options(model_flag="--judge-model", model="gpt-4o")
def generate_cmd(
    model: Annotated[
        Path,
        typer.Option("--model", help="Stage-1 (sq) checkpoint: native with the v1_sq template, or a model family."),
    ],
    image_folder: Annotated[
        Path, typer.Option("--image-folder", help="Folder of unlabeled images (searched recursively).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="prefs.json (STLLaVA-Med format); prefs.trl.jsonl is written beside it. "
            "The judge's response cache defaults to OUT.llm_cache.sqlite.",
        ),
    ],
    questions_per_image: Annotated[
        int, typer.Option("--questions-per-image", help="Questions the model asks per image.")
    ] = 5,
    ties: Annotated[
        str,
        typer.Option(
            "--ties", help="drop: equal scores give no pair; second: the published rule (second answer chosen)."
        ),
    ] = "drop",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N images.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed of question/answer sampling.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generation batch size.")] = 8,
    parse_retries: Annotated[
        int, typer.Option("--parse-retries", help="Re-asks when a judge reply has no readable scores.")
    ] = 2,
    *,
    llm: LLMConfig,
) -> None:
    """Describe each image, ask N questions, sample two answers each, let the judge choose; resumable."""
    from medvlm.infer.prefs import PrefsConfig, generate_preferences, summary

    cfg = PrefsConfig(
        model=model,
        images=image_folder,
        out=out,
        questions_per_image=questions_per_image,
        ties=ties,
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        parse_retries=parse_retries,
    )
    report = generate_preferences(cfg, llm)
    typer.echo(summary(report))
    if report.failed:
        typer.echo(
            f"{len(report.failed)} image(s) failed; rerun the same command to retry them "
            "(finished images and cached judge replies are reused).",
            err=True,
        )
        raise typer.Exit(1)

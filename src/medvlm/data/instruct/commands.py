"""``medvlm instruct generate|postprocess``: LLaVA-Med-style instruction data from figure captions.

The commands only call :mod:`medvlm.data.instruct`; the LLM options are the shared set of
:func:`medvlm.llm.llm_options`.
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
    name="instruct",
    help="Generate LLaVA-Med-style instruction conversations from figure captions with an LLM, then clean them. "
    f"{SHORT_NOTICE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("generate", cls=renamed({"--model": "--llm-model"}))
@llm_options()
def generate_cmd(
    captions: Annotated[
        Path, typer.Option("--captions", help="llava_med_instruct_fig_captions.json (object of lists per domain).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL (appended to; a rerun resumes).")],
    inline_mentions: Annotated[
        bool, typer.Option("--inline-mentions", help="Also show the paper's sentences that mention the figure.")
    ] = False,
    max_samples: Annotated[
        Optional[int], typer.Option("--max-samples", help="Exactly this many figures (round-robin over domains).")
    ] = None,
    few_shot: Annotated[
        Optional[Path], typer.Option("--few-shot", help="Few-shot file replacing the packaged examples.")
    ] = None,
    *,
    llm: LLMConfig,
) -> None:
    """Ask an LLM for a User/Assistant conversation per figure, seeing only its caption (and mentions)."""
    from medvlm.data.instruct.generate import GenerateConfig, generate_instructions

    cfg = GenerateConfig(
        captions=captions, out=out, inline_mentions=inline_mentions, max_samples=max_samples, few_shot=few_shot
    )
    rep = generate_instructions(cfg, llm)
    for line in rep.dropped_lines:
        typer.echo(f"warning: {line}", err=True)
    typer.echo(
        f"selected {rep.selected} figures ({rep.duplicates} duplicate pair_ids skipped); "
        f"{rep.already_done} already in {out}; generated {rep.generated} ({rep.from_cache} from cache); "
        f"failed {len(rep.failed)}"
    )
    typer.echo(rep.usage)
    if rep.failed:
        for f in rep.failed[:10]:
            typer.echo(f"failed: {f['pair_id']}: {f['error']}", err=True)
        typer.echo(
            f"{len(rep.failed)} figures failed (listed in {cfg.errors_path()}); rerun the same command "
            "to retry them - finished figures and cached replies are reused.",
            err=True,
        )
        raise typer.Exit(1)


@app.command("postprocess", cls=renamed({"--report": "--report-out"}))
def postprocess_cmd(
    inp: Annotated[Path, typer.Option("--in", help="Generation output JSONL.")],
    out: Annotated[Path, typer.Option("--out", help="LLaVA-Med instruct JSON to write.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the <image> start/end choice.")] = 0,
    image_folder: Annotated[
        Optional[Path], typer.Option("--image-folder", help="Use the real image file names found here.")
    ] = None,
    image_ext: Annotated[
        str, typer.Option("--image-ext", help="Image extension when there is no --image-folder.")
    ] = ".jpg",
    report_out: Annotated[
        Optional[Path], typer.Option("--report-out", help="Also write the drop counts as JSON here.")
    ] = None,
) -> None:
    """Parse, clean and filter generated conversations into the LLaVA-Med instruct format."""
    from medvlm.data.instruct.postprocess import PostprocessConfig, postprocess_file
    from medvlm.utils.io import write_json_atomic

    rep = postprocess_file(
        PostprocessConfig(inp=inp, out=out, seed=seed, image_folder=image_folder, image_ext=image_ext)
    )
    for msg in rep.problems:
        typer.echo(f"skipped: {msg}", err=True)
    typer.echo(f"read {rep.samples_read} samples, wrote {rep.samples_written} to {out} ({rep.pairs_kept} QA pairs)")
    typer.echo(f"dropped pairs: {dict(rep.pair_drops) or 'none'}; skipped samples: {dict(rep.sample_drops) or 'none'}")
    if report_out is not None:
        write_json_atomic(report_out, rep.as_dict())

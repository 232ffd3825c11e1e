"""``medvlm train [CONFIG.yaml] [--key value ...]``: one YAML per run, any key overridable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.utils.cli import renamed

MAIN_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "help": "Train a medvlm model (stage 'align', 'sft', or STLLaVA-Med's 'sq' / 'dpo') from a YAML recipe; "
    "any key can be overridden with --key value (e.g. --learning_rate 1e-4). The checkpoint folder is --out "
    "(the recipe's output_dir). Without a YAML, give --stage, --model_name_or_path (or --preset), "
    "--data_path and --out.",
    # --output_dir on the command line is the CLI's old spelling of --out (the YAML key stays output_dir).
    "cls": renamed({"--output_dir": "--out", "--output-dir": "--out"}),
}


def main(
    ctx: typer.Context,
    config: Annotated[
        Optional[str], typer.Argument(help="YAML recipe (configs/llava_med/*.yaml, configs/debug/*.yaml).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Checkpoint folder to write (overrides the recipe's output_dir).")
    ] = None,
) -> None:
    """Train a medvlm model from a YAML recipe plus ``--key value`` overrides."""
    from medvlm.train.config import load_config
    from medvlm.train.run import run_training

    args = list(ctx.args)
    if config is not None and config.startswith("--"):
        args.insert(0, config)  # no YAML: the first override landed in the positional slot
        config = None
    if out is not None:
        args += ["--output_dir", str(out)]
    cfg = load_config(config, args)
    result = run_training(cfg)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    typer.echo(
        f"done: {result.steps} steps in {result.seconds:.1f} s, final loss {loss}; checkpoint: {result.output_dir}"
    )

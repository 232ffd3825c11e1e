"""``medvlm model ...``: create and inspect model checkpoints.

Each command only calls library functions of :mod:`medvlm.model`; torch/transformers are imported
inside the bodies so ``medvlm --help`` stays fast. The delta verbs name each folder by one role in
both directions: ``--base`` the base LLM, ``--delta`` the delta weights, ``--target`` the full
checkpoint (base + delta), and ``--out`` whatever the verb writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.utils.artifacts import CONFIG_FILE
from medvlm.utils.cli import renamed

app = typer.Typer(
    name="model",
    help="Create and inspect medvlm model checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("init")
def init_cmd(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder to write (replaced atomically).")],
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="tiny (~1M, random, offline), small (~23M, random, offline), smol (SmolLM2-135M + small random "
            "tower), or tiny-<family> (qwen2_5_vl, qwen3_vl, gemma3, idefics3, llava, llava_onevision: "
            "a tiny random model of that transformers family, hub layout).",
        ),
    ] = "tiny",
    projector: Annotated[
        str | None, typer.Option("--projector", help="linear, mlp2x_gelu (default) or cluster.")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="Tower input side in pixels (a multiple of the patch: 8 for tiny/small, 16 for smol)."
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Chat template (default: mistral_instruct for tiny and small, vicuna_v1 for "
            "tiny-llava, chatml for smol; other families use their own).",
        ),
    ] = None,
    aspect: Annotated[
        str | None, typer.Option("--aspect", help="Image aspect mode: square, pad (default) or resize.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random initialisation.")] = 0,
) -> None:
    """Build a new model from a preset and save it as a checkpoint folder."""
    if preset.startswith("tiny-"):
        from medvlm.errors import MedvlmError
        from medvlm.model.families.tiny import init_tiny_family

        given = [
            name
            for name, v in (("--projector", projector), ("--image-size", image_size), ("--aspect", aspect))
            if v is not None
        ]
        if given:
            raise MedvlmError(
                f"{', '.join(given)} apply to the native presets (tiny, small, smol), not {preset}: a family "
                "preset uses its family's own connector and image processor"
            )
        typer.echo(f"wrote {init_tiny_family(preset, out, seed=seed, template=template)}")
        return
    from medvlm.model.build import init_model

    path = init_model(
        preset,
        out,
        projector=projector or "mlp2x_gelu",
        image_size=image_size,
        template=template,
        aspect=aspect or "pad",
        seed=seed,
    )
    typer.echo(f"wrote {path}")


@app.command("info")
def info_cmd(path: Annotated[Path, typer.Argument(help="A medvlm checkpoint folder.")]) -> None:
    """Show the architecture, template, image layout and parameter counts of a checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from medvlm.model.build import load_pretrained, read_saved_trainable
    from medvlm.model.card import architecture_summary
    from medvlm.model.parts import PARTS, parameter_counts
    from medvlm.notice import SHORT_NOTICE
    from medvlm.utils.io import read_json

    config_file = path / CONFIG_FILE
    if config_file.is_file() and read_json(config_file).get("model_type") not in (None, "medvlm"):
        _family_info(path)
        return
    model, processor = load_pretrained(path)
    arch = Table(title=f"{path}", show_header=False)
    arch.add_column("field", style="bold")
    arch.add_column("value")
    for key, value in architecture_summary(model).items():
        arch.add_row(key, value)
    arch.add_row("processor", f"{type(processor.image_processor).__name__}, {processor.image_side}px input")
    saved = read_saved_trainable(path)
    counts = parameter_counts(model)
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    params.add_column("trainable when saved", justify="right")
    for name in PARTS:
        trainable = f"{saved[name][0]:,}" if saved and name in saved else "not recorded"
        params.add_row(name, f"{counts[name]:,}", trainable)
    params.add_row("total", f"{counts['total']:,}", "")
    console = Console(width=max(100, Console().width))
    console.print(arch)
    console.print(params)
    if saved:
        parts = [name for name in PARTS if saved.get(name, (0, 0))[0] > 0]
        console.print(f"trainable parts when saved: {', '.join(parts) if parts else 'none'}")
    console.print(SHORT_NOTICE)


def _family_info(path: Path) -> None:
    """``model info`` for a model-family checkpoint (transformers hub layout): family, classes, parameters per part."""
    from rich.console import Console
    from rich.table import Table

    from medvlm.model.families.io import family_of, load_family
    from medvlm.model.families.spec import part_of
    from medvlm.notice import SHORT_NOTICE

    family = family_of(path)  # an unsupported model_type fails here, listing the supported families
    model, processor = load_family(path)
    spec = processor.spec
    arch = Table(title=f"{path}", show_header=False)
    arch.add_column("field", style="bold")
    arch.add_column("value")
    arch.add_row("family", family)
    arch.add_row("model class", type(model).__name__)
    arch.add_row(
        "processor",
        f"{type(processor.processor).__name__}, image processor {type(processor.processor.image_processor).__name__}",
    )
    arch.add_row("chat template", f"medvlm {processor.template}" if processor.template else f"{family} (marked)")
    arch.add_row("end of turn", spec.end_of_turn)
    arch.add_row("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    counts = {"vision_tower": 0, "connector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        counts[part_of(spec, name)] += p.numel()
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("parameters", justify="right")
    for name, n in counts.items():
        params.add_row(name, f"{n:,}")
    params.add_row("total", f"{sum(counts.values()):,}")
    console = Console(width=max(100, Console().width))
    console.print(arch)
    console.print(params)
    if (path / "adapter").is_dir():
        console.print("LoRA adapter (language model) saved in adapter/; the weights above are merged")
    console.print(SHORT_NOTICE)


@app.command("export", cls=renamed(positional={"dst": "--out"}))
def export_cmd(
    src: Annotated[Path, typer.Argument(help="A medvlm checkpoint folder.")],
    to: Annotated[
        str,
        typer.Option("--to", help="llava-hf (transformers LlavaForConditionalGeneration / vLLM) or llava-med-v1.5."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    vision_tower_name: Annotated[
        str | None, typer.Option("--vision-tower-name", help="llava-med-v1.5 only: the mm_vision_tower name to record.")
    ] = None,
    dst: Annotated[Optional[Path], typer.Argument(hidden=True, help="Deprecated spelling of --out.")] = None,
) -> None:
    """Export a medvlm checkpoint to another checkpoint layout."""
    from medvlm.model.convert import export_checkpoint

    typer.echo(f"wrote {export_checkpoint(src, out, to, vision_tower_name=vision_tower_name)}")


@app.command("import", cls=renamed(positional={"dst": "--out"}))
def import_cmd(
    src: Annotated[Path, typer.Argument(help="A checkpoint folder in the --from layout (safetensors).")],
    from_: Annotated[str, typer.Option("--from", help="llava-med-v1.5 or llava-med-v1.0.")],
    out: Annotated[Path, typer.Option("--out", help="medvlm checkpoint folder to write (atomically).")],
    vision_tower: Annotated[
        Path | None,
        typer.Option(
            "--vision-tower",
            help="Local CLIP folder to take the tower from instead of stored weights (needed for v1.0).",
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Chat template (default: mistral_instruct for v1.5, llava_med_v0 for v1.0)."),
    ] = None,
    dst: Annotated[Optional[Path], typer.Argument(hidden=True, help="Deprecated spelling of --out.")] = None,
) -> None:
    """Import a published LLaVA-Med checkpoint as a medvlm checkpoint."""
    from medvlm.model.convert import import_checkpoint

    record = import_checkpoint(src, out, from_, vision_tower=vision_tower, template=template)
    typer.echo(f"vision tower: {record['vision_tower']}")
    typer.echo(f"wrote {out}")


@app.command("apply-delta", cls=renamed({"--target": "--out"}))
def apply_delta_cmd(
    base: Annotated[Path, typer.Option("--base", help="Base LLaMA checkpoint folder (safetensors).")],
    delta: Annotated[Path, typer.Option("--delta", help="LLaVA-Med v1.0 delta folder (safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write: the full (target) v1.0 checkpoint, atomically.")],
) -> None:
    """Add LLaVA-Med v1.0 delta weights to a base LLaMA: BASE + DELTA -> OUT.

    Then `medvlm model import --from llava-med-v1.0`."""
    from medvlm.model.convert.delta import apply_delta

    counts = apply_delta(base, delta, out)
    typer.echo(
        f"wrote {out} ({counts['added_to_base']} tensors added to the base, {counts['kept_as_stored']} kept as stored)"
    )


@app.command("make-delta", cls=renamed({"--delta": "--out"}))
def make_delta_cmd(
    base: Annotated[Path, typer.Option("--base", help="Base LLaMA checkpoint folder (safetensors).")],
    target: Annotated[
        Path, typer.Option("--target", help="Full (target) checkpoint folder in the v1.0 layout (safetensors).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write: the delta weights, atomically.")],
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Store differences as float32/float64 (default: each target tensor's dtype)."),
    ] = None,
) -> None:
    """Write TARGET - BASE as delta weights to OUT (the inverse of apply-delta)."""
    from medvlm.model.convert.delta import make_delta

    counts = make_delta(base, target, out, dtype=dtype)
    typer.echo(f"wrote {out} ({counts['differences']} differences, {counts['kept_as_stored']} kept as stored)")
    if counts["inexact_elements"]:
        typer.echo(
            f"warning: {counts['inexact_elements']} element(s) will not round-trip exactly in the stored "
            "dtype; use --dtype float64 for an exact delta",
            err=True,
        )

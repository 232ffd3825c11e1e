"""``medvlm data ...``: validate, stats, convert (and more verbs added by other parts of the data layer).

Each command only calls library functions in :mod:`medvlm.data`; heavy imports live inside bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvlm.utils.cli import renamed

app = typer.Typer(
    name="data",
    help="Read, validate, summarise and convert medvlm data files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_table(title: str, header: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    Console().print(t)


@app.command("validate")
def validate_cmd(
    file: Annotated[str, typer.Argument(help="Data file (JSON array, JSON lines or the fig-captions object).")],
    image_folder: Annotated[
        str | None,
        typer.Option(
            "--image-folder",
            help="Folder the records' image paths are relative to; checks every image exists and decodes.",
        ),
    ] = None,
    format: Annotated[
        str, typer.Option("--format", help="Record format (auto decides by the first record's keys).")
    ] = "auto",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable lines/records, list them, and check the rest.")
    ] = False,
) -> None:
    """Check a data file: alternating roles, <image> placeholders vs images, empty turns, image files."""
    from medvlm.data.validate import validate_file

    rep = validate_file(file, image_folder=image_folder, format=format, skip_bad=skip_bad)
    for line in rep.problem_lines():
        typer.echo(line)
    s = rep.summary()
    images = (
        f"{s['images_found']} found, {s['images_missing']} missing, {s['images_unreadable']} unreadable"
        if s["images_checked"]
        else "not checked (no --image-folder)"
    )
    rows = [
        ["records", s["records"]],
        ["turns", s["turns"]],
        ["image references", s["images"]],
        ["image files", images],
        ["problems", s["problems"]],
        ["skipped records", s["bad_records"]],
    ]
    rows += [[f"domain {k}", v] for k, v in sorted(s["domains"].items())]
    _print_table(f"{file} ({s['format']})", ["", "count"], rows)
    if not rep.ok:
        raise typer.Exit(1)


@app.command("stats", cls=renamed({"--json": "--out -"}))
def stats_cmd(
    file: Annotated[str, typer.Argument(help="Data file.")],
    format: Annotated[
        str, typer.Option("--format", help="Record format (auto decides by the first record's keys).")
    ] = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable lines/records.")] = False,
    out: Annotated[
        Optional[str],
        typer.Option("--out", help="Write the counts as JSON to this file ('-': print the JSON instead of tables)."),
    ] = None,
) -> None:
    """Print the counts the LLaVA-Med paper reports: records, QA pairs, images, per domain/type."""
    import json

    from medvlm.data.stats import dataset_stats
    from medvlm.utils.io import write_json_atomic

    st = dataset_stats(file, format=format, skip_bad=skip_bad)
    if out == "-":
        typer.echo(json.dumps(st, indent=2))
        return
    if out is not None:
        write_json_atomic(Path(out), st)
    keys = ("records", "turns", "questions", "qa_pairs", "images", "bad_records")
    _print_table(f"{file} ({st['format']})", ["", "count"], [[k, st[k]] for k in keys if k in st])
    if st.get("domains"):
        _print_table(
            "per domain (primary)",
            ["domain", "records", "images", "QA pairs"],
            [[d, v["records"], v["images"], v["qa_pairs"]] for d, v in st["domains"].items()],
        )
    for key, title in (
        ("domain_flags", "domain flags (multi-label)"),
        ("types", "type"),
        ("answer_types", "answer_type"),
    ):
        if st.get(key):
            _print_table(title, [key, "records"], [[k, v] for k, v in st[key].items()])
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command("convert", cls=renamed({"--src": "--in"}))
def convert_cmd(
    dataset: Annotated[str, typer.Argument(help="vqa-rad | slake | pathvqa")],
    inp: Annotated[
        str,
        typer.Option(
            "--in",
            help="The public release folder, the Hugging Face hub files (parquet; SLAKE's "
            "JSON + imgs.zip) or a hub / datasets cache.",
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", help="Output folder (train.json, test.json, images/, train_open_answers.json).")
    ],
    closed_options: Annotated[
        bool,
        typer.Option(
            "--closed-options",
            help="Append ' Please choose from the following two options: [yes, no]' to yes/no questions.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing non-empty output folder.")
    ] = False,
) -> None:
    """Convert VQA-RAD / SLAKE / PathVQA to LLaVA-Med's VQA format (written atomically)."""
    from medvlm.data.benchmarks.hub import convert_benchmark

    counts, info = convert_benchmark(dataset, inp, out, closed_options=closed_options, overwrite=overwrite)
    typer.echo(
        ", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out} (read {info.layout} files in {info.folder})"
    )


@app.command("download-images")
def download_images_cmd(
    urls: Annotated[
        str, typer.Option("--urls", help="llava_med_image_urls.jsonl (pmc_tar_url, image_file_path, pair_id).")
    ],
    out: Annotated[str, typer.Option("--out", help="Output folder: images/{pair_id}{ext} and manifest.jsonl.")],
    workers: Annotated[int, typer.Option("--workers", help="Archives fetched at the same time.")] = 16,
    url_map: Annotated[
        list[str] | None,
        typer.Option(
            "--url-map",
            help="OLD_PREFIX=NEW_PREFIX rewrite of archive URLs "
            "(repeatable): a mirror, the moved PMC layout, or file:///local/folder/.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N pairs.")] = None,
    keep_archives: Annotated[
        bool, typer.Option("--keep-archives", help="Also save each archive under OUT/archives (reused on reruns).")
    ] = False,
    retries: Annotated[
        int, typer.Option("--retries", help="Extra attempts after resets, timeouts, 5xx and truncated archives.")
    ] = 4,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for a connection or the next bytes.")
    ] = 60.0,
    verify_existing: Annotated[
        bool, typer.Option("--verify-existing", help="On rerun, re-hash files done earlier.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Download the PMC figures of an image-URL list: each tarball streamed once, resumable, safe."""
    from medvlm.data.download import DownloadConfig, download_images, parse_url_map

    cfg = DownloadConfig(
        workers=workers,
        retries=retries,
        timeout=timeout,
        url_map=parse_url_map(url_map or []),
        limit=limit,
        keep_archives=keep_archives,
        verify_existing=verify_existing,
        progress=progress,
    )
    summary = download_images(urls, out, cfg)
    typer.echo(summary.format())


@app.command("synth")
def synth_cmd(
    out: Annotated[
        str,
        typer.Option("--out", help="Output folder (images/, alignment.json, instruct.json, vqa/, qa50.jsonl, ...)."),
    ],
    n_images: Annotated[int, typer.Option("--n-images", help="Images in all (train + held-out test).")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same arguments give byte-identical files.")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Side of the square images in pixels (48-1024).")
    ] = 128,
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of images held out for vqa/test.json and qa50.jsonl.")
    ] = 0.2,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing synthetic dataset in --out.")
    ] = False,
    train_extra_closed: Annotated[
        int,
        typer.Option(
            "--train-extra-closed", help="Closed questions (0-3) of kinds not asked yet added to each train image."
        ),
    ] = 0,
    train_closed_kinds: Annotated[
        str,
        typer.Option(
            "--train-closed-kinds",
            help="Comma-separated closed kinds (e.g. COUNT,POS): one more closed question of "
            "each added to each train image.",
        ),
    ] = "",
) -> None:
    """Generate the synthetic biomedical demo dataset (answers decided by the pixels) and print its blind baseline."""
    from rich.console import Console

    from medvlm.data.synth import baseline_table, generate_synth

    m = generate_synth(
        out,
        n_images=n_images,
        seed=seed,
        image_size=image_size,
        test_fraction=test_fraction,
        overwrite=overwrite,
        train_extra_closed=train_extra_closed,
        train_closed_kinds=[k.strip() for k in train_closed_kinds.split(",") if k.strip()],
    )
    typer.echo(f"{m.n_images} images ({m.n_train_images} train / {m.n_test_images} test, {m.image_size} px) -> {out}")
    typer.echo(", ".join(f"{k}: {v}" for k, v in m.files.items()))
    Console().print(baseline_table(m.blind_baseline))


@app.command("group", cls=renamed(positional={"src": "--in"}))
def group_cmd(
    inp: Annotated[
        str, typer.Option("--in", help="Sample file with one question per record (VQA train split, any format).")
    ],
    out: Annotated[str, typer.Option("--out", help="Output LLaVA JSON with one multi-turn conversation per image.")],
    max_questions: Annotated[
        Optional[int],
        typer.Option(
            "--max-questions", help="At most this many questions per conversation (default: all of the image's)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the question order within each image.")] = 0,
    yes_no_last: Annotated[
        bool,
        typer.Option(
            "--yes-no-last/--shuffled",
            help="Questions answered yes/no after the others in each conversation (training's default when it "
            "merges), or all in shuffled order.",
        ),
    ] = True,
    src: Annotated[Optional[str], typer.Argument(hidden=True, help="Deprecated spelling of --in.")] = None,
) -> None:
    """Merge each image's single-question samples into one conversation (LLaVA-1.5's VQA training format)."""
    from medvlm.data.benchmarks.group import group_file

    st = group_file(inp, out, max_questions=max_questions, seed=seed, yes_no_last=yes_no_last)
    typer.echo(
        f"{st.samples_in} samples -> {st.conversations} conversations over {st.images} images "
        f"({st.merged} questions merged, {st.passed_through} samples kept as they were) -> {out}"
    )

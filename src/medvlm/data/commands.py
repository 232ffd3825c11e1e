"""``medvlm data ...``: validate, stats, convert (and more verbs added by other parts of the data layer).

Each command only calls library functions in :mod:`medvlm.data`; heavy imports live inside bodies.
"""

from __future__ import annotations

from typing import Optional

import typer

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
    file: str = typer.Argument(..., help="Data file (JSON array, JSON lines or the fig-captions object)."),
    image_folder: str | None = typer.Option(None, "--image-folder", help="Folder the records' image paths are relative to; checks every image exists and decodes."),
    format: str = typer.Option("auto", "--format", help="Record format (auto decides by the first record's keys)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable lines/records, list them, and check the rest."),
) -> None:
    """Check a data file: alternating roles, <image> placeholders vs images, empty turns, image files."""
    from medvlm.data.validate import validate_file

    rep = validate_file(file, image_folder=image_folder, format=format, skip_bad=skip_bad)
    for line in rep.problem_lines():
        typer.echo(line)
    s = rep.summary()
    images = (f"{s['images_found']} found, {s['images_missing']} missing, {s['images_unreadable']} unreadable"
              if s["images_checked"] else "not checked (no --image-folder)")
    rows = [["records", s["records"]], ["turns", s["turns"]], ["image references", s["images"]],
            ["image files", images], ["problems", s["problems"]], ["skipped records", s["bad_records"]]]
    rows += [[f"domain {k}", v] for k, v in sorted(s["domains"].items())]
    _print_table(f"{file} ({s['format']})", ["", "count"], rows)
    if not rep.ok:
        raise typer.Exit(1)


@app.command("stats")
def stats_cmd(
    file: str = typer.Argument(..., help="Data file."),
    format: str = typer.Option("auto", "--format", help="Record format (auto decides by the first record's keys)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable lines/records."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON instead of tables."),
) -> None:
    """Print the counts the LLaVA-Med paper reports: records, QA pairs, images, per domain/type."""
    import json

    from medvlm.data.stats import dataset_stats

    st = dataset_stats(file, format=format, skip_bad=skip_bad)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    keys = ("records", "turns", "questions", "qa_pairs", "images", "bad_records")
    _print_table(f"{file} ({st['format']})", ["", "count"], [[k, st[k]] for k in keys if k in st])
    if st.get("domains"):
        _print_table("per domain (primary)", ["domain", "records", "images", "QA pairs"],
                     [[d, v["records"], v["images"], v["qa_pairs"]] for d, v in st["domains"].items()])
    for key, title in (("domain_flags", "domain flags (multi-label)"), ("types", "type"), ("answer_types", "answer_type")):
        if st.get(key):
            _print_table(title, [key, "records"], [[k, v] for k, v in st[key].items()])


@app.command("convert")
def convert_cmd(
    dataset: str = typer.Argument(..., help="vqa-rad | slake | pathvqa"),
    src: str = typer.Option(..., "--src", help="The public release folder, the Hugging Face hub files (parquet; SLAKE's "
                                             "JSON + imgs.zip) or a hub / datasets cache."),
    out: str = typer.Option(..., "--out", help="Output folder (train.json, test.json, images/, train_open_answers.json)."),
    closed_options: bool = typer.Option(False, "--closed-options", help="Append ' Please choose from the following two options: [yes, no]' to yes/no questions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty output folder."),
) -> None:
    """Convert VQA-RAD / SLAKE / PathVQA to LLaVA-Med's VQA format (written atomically)."""
    from medvlm.data.benchmarks.hub import convert_benchmark

    counts, info = convert_benchmark(dataset, src, out, closed_options=closed_options, overwrite=overwrite)
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out} (read {info.layout} files in {info.folder})")


@app.command("download-images")
def download_images_cmd(
    urls: str = typer.Option(..., "--urls", help="llava_med_image_urls.jsonl (pmc_tar_url, image_file_path, pair_id)."),
    out: str = typer.Option(..., "--out", help="Output folder: images/{pair_id}{ext} and manifest.jsonl."),
    workers: int = typer.Option(16, "--workers", help="Archives fetched at the same time."),
    url_map: list[str] = typer.Option([], "--url-map", help="OLD_PREFIX=NEW_PREFIX rewrite of archive URLs "
                                      "(repeatable): a mirror, the moved PMC layout, or file:///local/folder/."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N pairs."),
    keep_archives: bool = typer.Option(False, "--keep-archives",
                                       help="Also save each archive under OUT/archives (reused on reruns)."),
    retries: int = typer.Option(4, "--retries", help="Extra attempts after resets, timeouts, 5xx and truncated archives."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for a connection or the next bytes."),
    verify_existing: bool = typer.Option(False, "--verify-existing", help="On rerun, re-hash files done earlier."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Download the PMC figures of an image-URL list: each tarball streamed once, resumable, safe."""
    from medvlm.data.download import DownloadConfig, download_images, parse_url_map

    cfg = DownloadConfig(workers=workers, retries=retries, timeout=timeout, url_map=parse_url_map(url_map),
                         limit=limit, keep_archives=keep_archives, verify_existing=verify_existing, progress=progress)
    summary = download_images(urls, out, cfg)
    typer.echo(summary.format())


@app.command("synth")
def synth_cmd(
    out: str = typer.Option(..., "--out", help="Output folder (images/, alignment.json, instruct.json, vqa/, qa50.jsonl, ...)."),
    n_images: int = typer.Option(2000, "--n-images", help="Images in all (train + held-out test)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same arguments give byte-identical files."),
    image_size: int = typer.Option(128, "--image-size", help="Side of the square images in pixels (48-1024)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of images held out for vqa/test.json and qa50.jsonl."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing synthetic dataset in --out."),
    train_extra_closed: int = typer.Option(
        0, "--train-extra-closed", help="Closed questions (0-3) of kinds not asked yet added to each train image."),
    train_closed_kinds: str = typer.Option(
        "", "--train-closed-kinds", help="Comma-separated closed kinds (e.g. COUNT,POS): one more closed question of "
        "each added to each train image."),
) -> None:
    """Generate the synthetic biomedical demo dataset (answers decided by the pixels) and print its blind baseline."""
    from rich.console import Console

    from medvlm.data.synth import baseline_table, generate_synth

    m = generate_synth(out, n_images=n_images, seed=seed, image_size=image_size, test_fraction=test_fraction,
                       overwrite=overwrite, train_extra_closed=train_extra_closed,
                       train_closed_kinds=[k.strip() for k in train_closed_kinds.split(",") if k.strip()])
    typer.echo(f"{m.n_images} images ({m.n_train_images} train / {m.n_test_images} test, {m.image_size} px) -> {out}")
    typer.echo(", ".join(f"{k}: {v}" for k, v in m.files.items()))
    Console().print(baseline_table(m.blind_baseline))


@app.command("group")
def group_cmd(
    src: str = typer.Argument(..., help="Sample file with one question per record (VQA train split, any format)."),
    out: str = typer.Option(..., "--out", help="Output LLaVA JSON with one multi-turn conversation per image."),
    max_questions: Optional[int] = typer.Option(None, "--max-questions", help="At most this many questions per conversation (default: all of the image's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the question order within each image."),
) -> None:
    """Merge each image's single-question samples into one conversation (LLaVA-1.5's VQA training format)."""
    from medvlm.data.benchmarks.group import group_file

    st = group_file(src, out, max_questions=max_questions, seed=seed)
    typer.echo(f"{st.samples_in} samples -> {st.conversations} conversations over {st.images} images "
               f"({st.merged} questions merged, {st.passed_through} samples kept as they were) -> {out}")

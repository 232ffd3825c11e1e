"""Download the PMC figures listed in ``llava_med_image_urls.jsonl`` robustly and resumably.

Rows are grouped by tarball so each ``.tar.gz`` is fetched once however many figures it holds. The
archive is streamed (never saved unless ``keep_archives``, never extracted whole) and only the wanted
members are written, as ``DIR/images/{pair_id}{ext}``. Tarballs are fetched concurrently; resets,
timeouts, 5xx and truncated archives are retried with exponential backoff and jitter; 404/410,
members missing from an archive, unsafe members and non-images are recorded as failures and the
run goes on. Every outcome is appended to ``DIR/manifest.jsonl``, so a rerun (also after SIGKILL)
skips what is done and retries only what failed.

Safety: output names come from ``pair_id`` only, never from member names; links, devices and
oversized members are refused; unpacked bytes per archive are capped; images are decoded once.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import httpx
from tqdm import tqdm

from medvlm.data.download.archive import (
    Cancelled,
    FetchError,
    Limits,
    WrittenFile,
    copy_written,
    member_key,
    member_problem,
    open_archive,
    write_member,
)
from medvlm.data.download.manifest import (
    ManifestWriter,
    PairTask,
    is_done,
    member_path_problem,
    pair_id_problem,
    read_manifest,
)
from medvlm.data.download.tar_guard import MAX_TAR_HEADER_BYTES
from medvlm.data.readers import read_image_urls
from medvlm.errors import MedvlmError
from medvlm.utils.backoff import backoff_delay
from medvlm.utils.io import atomic_path

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class DownloadConfig:
    """Settings of :func:`download_images` (the CLI flags of ``medvlm data download-images``)."""

    workers: int = 16
    """Archives fetched at the same time (threads)."""
    retries: int = 4
    """Extra attempts per archive after a reset, timeout, 5xx/429 or truncated/corrupt archive."""
    backoff_base: float = 1.0
    """First retry delay in seconds; doubled per attempt up to ``backoff_max``, jittered to [half, whole]."""
    backoff_max: float = 60.0
    """Upper bound of one retry delay in seconds (also caps a server's Retry-After)."""
    timeout: float = 60.0
    """Seconds to wait for a connection or for the next bytes of a response."""
    url_map: list[tuple[str, str]] = field(default_factory=list)
    """``(old_prefix, new_prefix)`` rewrites of archive URLs (a mirror, the moved PMC layout, ``file://``)."""
    limit: int | None = None
    """Only the first N pairs of the input (after dropping duplicate pair ids)."""
    keep_archives: bool = False
    """Also save each fetched archive as ``DIR/archives/{name}`` (atomically); a saved one is reused."""
    max_member_bytes: int = 256 * 1024**2
    """Largest figure written (bytes); a larger member fails with ``too_large``."""
    max_archive_bytes: int = 4 * 1024**3
    """Largest archive, downloaded and unpacked (bytes): the decompression-bomb cap."""
    max_members: int = 100_000
    """Most tar entries read from one archive."""
    max_header_bytes: int = MAX_TAR_HEADER_BYTES
    """Largest pax extended header, GNU long name/link or sparse header run in an archive (bytes); a larger
    one fails the archive with ``tar_header_too_large`` before it is read."""
    verify_existing: bool = False
    """On resume, re-hash files the manifest calls done (default: check existence and size only)."""
    progress: bool = True
    """Show a progress bar (tqdm, on stderr)."""
    user_agent: str = "medvlm-downloader (research use)"
    """User-Agent header sent with each request."""


@dataclass
class DownloadSummary:
    """What a run did."""

    total: int
    """Pairs considered (input rows after ``limit`` and duplicate removal)."""
    done: int
    """Figures written in this run."""
    already_done: int
    """Pairs skipped because an earlier run finished them."""
    failed: dict[str, int]
    """Pairs that failed in this run, counted by reason (``http_404``, ``missing_member`` ...)."""
    bytes_written: int
    """Bytes of figures written in this run."""
    archives: int
    """Archives processed in this run."""
    duplicates: int
    """Input rows skipped because their pair id appeared before with another URL or member."""
    seconds: float
    """Wall time of the run."""
    manifest: Path
    """The manifest file (one line per outcome; the last line per pair wins)."""

    @property
    def failed_total(self) -> int:
        """All failures of this run."""
        return sum(self.failed.values())

    def format(self) -> str:
        """A short human-readable report."""
        lines = [
            f"done {self.done} (+{self.already_done} from earlier runs) of {self.total} pairs; "
            f"{self.bytes_written / 1e6:.1f} MB from {self.archives} archives in {self.seconds:.1f} s",
            f"failed {self.failed_total}"
            + (
                ""
                if not self.failed
                else ": " + ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items(), key=lambda kv: -kv[1]))
            ),
        ]
        if self.duplicates:
            lines.append(f"skipped {self.duplicates} rows repeating an earlier pair_id with another URL/member")
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def parse_url_map(specs: list[str]) -> list[tuple[str, str]]:
    """Parse ``OLD_PREFIX=NEW_PREFIX`` strings (split at the first ``=``)."""
    out = []
    for spec in specs:
        old, sep, new = spec.partition("=")
        if not sep or not old or not new:
            raise MedvlmError(f"--url-map {spec!r}: expected OLD_PREFIX=NEW_PREFIX")
        out.append((old, new))
    return out


def map_url(url: str, url_map: list[tuple[str, str]]) -> str:
    """Apply the longest matching prefix rewrite of ``url_map`` to ``url``."""
    best = max((p for p in url_map if url.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return url if best is None else best[1] + url[len(best[0]) :]


def _check_config(cfg: DownloadConfig) -> None:
    if cfg.workers < 1:
        raise MedvlmError(f"workers must be >= 1 (got {cfg.workers})")
    if cfg.retries < 0:
        raise MedvlmError(f"retries must be >= 0 (got {cfg.retries})")
    if cfg.limit is not None and cfg.limit < 0:
        raise MedvlmError(f"limit must be >= 0 (got {cfg.limit})")
    if cfg.timeout <= 0 or cfg.backoff_base < 0 or cfg.backoff_max < 0:
        raise MedvlmError("timeout must be > 0 and backoff delays >= 0")
    if min(cfg.max_member_bytes, cfg.max_archive_bytes, cfg.max_members, cfg.max_header_bytes) < 1:
        raise MedvlmError("max_member_bytes, max_archive_bytes, max_members and max_header_bytes must be >= 1")


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``DIR/.download.lock`` so two runs never write into the same folder (released on SIGKILL too)."""
    with (out / ".download.lock").open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise MedvlmError(f"{out}: another download-images run is writing into this folder") from e
        yield


def _clean_stale_temps(images: Path, archives: Path) -> None:
    # Temp names start with "." (pair ids may not), so these are leftovers of a killed run.
    for p in images.glob(".*.part"):
        p.unlink()
    if archives.is_dir():
        for p in archives.glob(".*.tmp"):
            p.unlink()


def _load_tasks(urls: Path, limit: int | None) -> tuple[list[PairTask], int]:
    """Input rows as tasks (first row per pair id wins), plus how many conflicting duplicates were dropped."""
    tasks: dict[str, PairTask] = {}
    duplicates = 0
    for row in read_image_urls(urls):
        prev = tasks.get(row.pair_id)
        if prev is not None:
            duplicates += (prev.url, prev.member) != (row.pmc_tar_url, row.image_file_path)
            continue
        if limit is not None and len(tasks) >= limit:
            break
        tasks[row.pair_id] = PairTask(row.pair_id, row.pmc_tar_url, row.image_file_path, row.line)
    return list(tasks.values()), duplicates


class _Run:
    """Shared state of one run: the HTTP client, the manifest, the caps and the stop flag."""

    def __init__(self, cfg: DownloadConfig, out: Path, writer: ManifestWriter, client: httpx.Client):
        self.cfg = cfg
        self.images = out / "images"
        self.archives = out / "archives"
        self.writer = writer
        self.client = client
        self.limits = Limits(cfg.max_member_bytes, cfg.max_archive_bytes, cfg.max_members, cfg.max_header_bytes)
        self.stop = threading.Event()

    def delay(self, attempt: int, hint: float | None) -> float:
        """Backoff before retry ``attempt`` (0-based): exponential with jitter, at least a Retry-After hint."""
        return backoff_delay(attempt, self.cfg.backoff_base, self.cfg.backoff_max, hint=hint)

    def process_archive(self, url: str, tasks: list[PairTask]) -> None:
        """Fetch one archive (with retries) and record an outcome for every task."""
        remaining: dict[str, list[PairTask]] = {}
        for t in tasks:
            remaining.setdefault(member_key(t.member), []).append(t)
        attempt = 0
        while remaining:
            try:
                self._one_pass(url, remaining)
                return
            except FetchError as e:
                if not e.retryable or attempt >= self.cfg.retries:
                    for group in remaining.values():
                        for t in group:
                            self.writer.failed_row(t, url, e.reason, str(e))
                    return
                if self.stop.wait(self.delay(attempt, e.retry_after)):
                    raise Cancelled() from e
                attempt += 1

    def _archive_dest(self, url: str) -> Path | None:
        if not self.cfg.keep_archives:
            return None
        name = PurePosixPath(unquote(urlparse(url).path)).name
        if not name or name.startswith("."):
            raise FetchError("bad_url", f"cannot name a saved archive after {url!r}", retryable=False)
        return self.archives / name

    def _one_pass(self, url: str, remaining: dict[str, list[PairTask]]) -> None:
        dest = self._archive_dest(url)
        if dest is not None and dest.is_file():
            self._walk(dest.resolve().as_uri(), url, remaining, None)
        elif dest is not None:
            with atomic_path(dest) as tmp, tmp.open("wb") as tee:
                self._walk(url, url, remaining, tee)
        else:
            self._walk(url, url, remaining, None)

    def _walk(self, source: str, url: str, remaining: dict[str, list[PairTask]], tee: BinaryIO | None) -> None:
        """Stream the archive once; write wanted members, dropping each from ``remaining`` once recorded."""
        with open_archive(self.client, source, self.limits, tee, self.stop) as reader:
            try:
                tf = tarfile.open(fileobj=reader, mode="r|")  # plain tar: the reader has un-gzipped it
                for count, ti in enumerate(tf, start=1):
                    if count > self.limits.max_members:
                        raise FetchError(
                            "archive_too_large", f"more than {self.limits.max_members} tar entries", retryable=False
                        )
                    group = remaining.get(member_key(ti.name))
                    if group is None:
                        continue
                    self._write(tf, ti, url, group)
                    del remaining[member_key(ti.name)]
                    if not remaining and tee is None:
                        return  # everything wanted is written: no need to read the rest
                if tee is not None:
                    reader.drain()
            except tarfile.TarError as e:
                raise FetchError("bad_archive", f"not a readable tar archive ({e})", retryable=True) from e
        for group in remaining.values():
            for t in group:
                self.writer.failed_row(t, url, "missing_member", f"{t.member!r} is not in the archive")
        remaining.clear()

    def _write(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, url: str, group: list[PairTask]) -> None:
        problem = member_problem(ti, self.limits)
        if problem is None:
            src = tf.extractfile(ti)
            result = write_member(src, self.images / group[0].filename, ti.size)
            if isinstance(result, tuple):
                problem = result
        if problem is not None:
            for t in group:
                self.writer.failed_row(t, url, *problem)
            return
        first: WrittenFile = result
        self.writer.done_row(group[0], url, first.bytes, first.sha256)
        for t in group[1:]:
            w = copy_written(first, self.images / t.filename)
            self.writer.done_row(t, url, w.bytes, w.sha256)


def download_images(urls: str | Path, out: str | Path, config: DownloadConfig | None = None) -> DownloadSummary:
    """Download the figures of a ``llava_med_image_urls.jsonl`` into ``out/images``; see the module docstring.

    Returns a :class:`DownloadSummary`. Bad input raises :class:`MedvlmError` naming file and line;
    per-figure problems are recorded in ``out/manifest.jsonl`` and counted, not raised.
    """
    cfg = config or DownloadConfig()
    _check_config(cfg)
    started = time.monotonic()
    urls, out = Path(urls), Path(out)
    tasks, duplicates = _load_tasks(urls, cfg.limit)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    if cfg.keep_archives:
        (out / "archives").mkdir(exist_ok=True)
    manifest = out / MANIFEST_NAME
    with _exclusive(out):
        _clean_stale_temps(images, out / "archives")
        state = read_manifest(manifest)
        pending = [t for t in tasks if not is_done(state.get(t.pair_id), t, images, cfg.verify_existing)]
        already_done = len(tasks) - len(pending)
        bar = tqdm(total=len(pending), unit="img", desc="download-images", disable=not cfg.progress)
        writer = ManifestWriter(manifest, on_record=lambda _reason: bar.update(1))

        by_url: dict[str, list[PairTask]] = {}
        for t in pending:
            problem = pair_id_problem(t)
            reason = "bad_pair_id"
            if problem is None:
                problem, reason = member_path_problem(t.member), "unsafe_path"
            if problem is not None:
                writer.failed_row(t, t.url, reason, f"{urls}:{t.line}: {problem}")
            else:
                by_url.setdefault(map_url(t.url, cfg.url_map), []).append(t)

        headers = {"User-Agent": cfg.user_agent}
        limits = httpx.Limits(max_connections=cfg.workers, max_keepalive_connections=cfg.workers)
        with (
            httpx.Client(
                timeout=httpx.Timeout(cfg.timeout), limits=limits, headers=headers, follow_redirects=True
            ) as client,
            bar,
        ):
            run = _Run(cfg, out, writer, client)
            try:
                _run_pool(run, list(by_url.items()))
            except OSError as e:  # disk full, permissions: nothing per-figure about it, so stop the run
                raise MedvlmError(f"{out}: cannot write the download ({e})") from e
    return DownloadSummary(
        total=len(tasks),
        done=writer.done,
        already_done=already_done,
        failed=dict(writer.failed),
        bytes_written=writer.bytes_written,
        archives=len(by_url),
        duplicates=duplicates,
        seconds=time.monotonic() - started,
        manifest=manifest,
    )


def _run_pool(run: _Run, jobs: list[tuple[str, list[PairTask]]]) -> None:
    """Process archives on ``workers`` threads, keeping only a bounded number of jobs queued."""
    it = iter(jobs)
    with cf.ThreadPoolExecutor(max_workers=run.cfg.workers, thread_name_prefix="medvlm-dl") as pool:
        inflight: set[cf.Future] = set()
        try:
            while True:
                while len(inflight) < run.cfg.workers * 2:
                    job = next(it, None)
                    if job is None:
                        break
                    inflight.add(pool.submit(run.process_archive, *job))
                if not inflight:
                    return
                finished, inflight = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    fut.result()  # a worker's unexpected error (e.g. disk full) stops the run
        except BaseException:
            run.stop.set()
            for fut in inflight:
                fut.cancel()
            raise

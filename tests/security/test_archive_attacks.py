"""Tar header attacks on ``data download-images``, sent for real (issue 15, items 8 and 15).

``tarfile`` reads a pax header, a GNU long name and sparse maps whole; the downloader's
:class:`~medvlm.data.download.tar_guard.TarHeaderGuard` sees each header first and refuses one over
``DownloadConfig.max_header_bytes`` (default ``MAX_TAR_HEADER_BYTES`` = 1 MiB) with ``tar_header_too_large``.
The archives are built by hand from raw 512-byte header blocks.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from data_attack_helpers import (
    end_of_archive,
    gzip_with_zero_run,
    member,
    pad,
    pax_records,
    peak_rss_growth,
    tar_header,
)
from PIL import Image

from medvlm.data.download import DownloadConfig, download_images
from medvlm.data.download import archive as download_archive
from medvlm.data.download.tar_guard import MAX_TAR_HEADER_BYTES

PREFIX = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed, 2 * seed % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _run(tmp_path: Path, archive: bytes, members: list[str], **cfg) -> dict[str, dict]:
    """Download ``members`` of ``archive`` (served as a local file through ``--url-map``); last row per pair."""
    local = tmp_path / "mirror"
    local.mkdir(parents=True, exist_ok=True)
    (local / "a.tar.gz").write_bytes(archive)
    urls = tmp_path / "urls.jsonl"
    urls.write_text(
        "".join(
            json.dumps({"pmc_tar_url": PREFIX + "a.tar.gz", "image_file_path": m, "pair_id": f"p{i}"}) + "\n"
            for i, m in enumerate(members)
        )
    )
    out = tmp_path / "out"
    download_images(
        urls, out, DownloadConfig(workers=1, retries=0, progress=False, url_map=[(PREFIX, local.as_uri() + "/")], **cfg)
    )
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["pair_id"]: r for r in rows}


def test_400mb_pax_header_in_a_small_archive_is_refused_with_bounded_memory(tmp_path):
    declared = 400 << 20
    archive = gzip_with_zero_run(
        tar_header(b"././@PaxHeader", declared, b"x"), declared, member("PMC1/fig.png", _png(1)) + end_of_archive()
    )
    assert len(archive) < 600_000  # ~400 KB on the wire
    local = tmp_path / "mirror"
    local.mkdir()
    (local / "a.tar.gz").write_bytes(archive)
    urls = tmp_path / "urls.jsonl"
    urls.write_text(
        json.dumps({"pmc_tar_url": PREFIX + "a.tar.gz", "image_file_path": "PMC1/fig.png", "pair_id": "p0"}) + "\n"
    )
    setup = "from medvlm.data.download import DownloadConfig, download_images\n"
    attack = f"""
cfg = DownloadConfig(workers=1, retries=0, progress=False, url_map=[({PREFIX!r}, {local.as_uri() + '/'!r})])
s = download_images({str(urls)!r}, {str(tmp_path / 'out')!r}, cfg)
result = s.failed
"""
    growth_mb, failed = peak_rss_growth(setup, attack)
    assert failed == {"tar_header_too_large": 1}
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[-1])
    assert row["error"] == (
        f"refused tar archive: pax extended header of {declared} bytes at byte 0 (cap {MAX_TAR_HEADER_BYTES})"
    )
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB under a 400 MB pax header"


def test_gnu_long_name_global_pax_and_sparse_headers_over_the_cap_are_refused(tmp_path):
    fig = member("PMC1/fig.png", _png(2))
    big = 64 * 1024
    cases = {
        "long name": tar_header(b"././@LongLink", big, b"L") + pad(b"a" * big) + fig,
        "long link": tar_header(b"././@LongLink", big, b"K") + pad(b"a" * big) + fig,
        "global pax": tar_header(b"pax_global_header", big, b"g") + pad(b"x" * big) + fig,
        # old GNU sparse member whose extension blocks go on and on (each says "one more follows")
        "sparse run": tar_header(b"PMC1/s.bin", 0, b"S", {482: b"\1"}) + (b"\0" * 504 + b"\1" + b"\0" * 7) * 200 + fig,
        "pax sparse": tar_header(b"././@PaxHeader", len(pax_records(GNU__sparse__major="1")), b"x")
        + pad(pax_records(GNU__sparse__major="1"))
        + member("PMC1/s.bin", b"1\n0\n")
        + fig,
    }
    for i, (what, raw) in enumerate(cases.items()):
        rows = _run(
            tmp_path / str(i),
            gzip_with_zero_run(raw + end_of_archive(), 0),
            ["PMC1/fig.png"],
            max_header_bytes=32 * 1024,
        )
        assert rows["p0"]["reason"] == "tar_header_too_large", (what, rows["p0"])
        assert not (tmp_path / str(i) / "out" / "images" / "p0.png").exists()


def test_the_guard_follows_tarfile_where_headers_move(tmp_path):
    fig = member("PMC1/fig.png", _png(3))
    bomb = tar_header(b"././@PaxHeader", 10 << 20, b"x")  # the header a mis-aligned guard would not see
    # a pax "size" of 0 makes tarfile read the next header right after this member's header, not 1536 bytes on
    pax = pax_records(size="0")
    moved = tar_header(b"././@PaxHeader", len(pax), b"x") + pad(pax) + tar_header(b"PMC1/x.bin", 1536, b"0") + bomb
    # a V7 "regular file" whose name ends in "/" is a directory: tarfile reads no data for it
    v7dir = tar_header(b"PMC1/dir/", 1536, b"\0") + bomb
    for i, raw in enumerate((moved, v7dir)):
        rows = _run(
            tmp_path / str(i),
            gzip_with_zero_run(raw + b"\0" * (10 << 20) + fig + end_of_archive(), 0),
            ["PMC1/fig.png"],
        )
        assert rows["p0"]["reason"] == "tar_header_too_large", rows["p0"]


def test_real_pax_and_gnu_archives_with_long_names_still_download(tmp_path):
    long_dir = "PMC7/" + "d" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tf:
            for j, name in enumerate((f"{long_dir}/fig{'x' * 120}.png", "PMC7/short.png")):
                data = _png(10 + j)
                ti = tarfile.TarInfo(name)
                ti.size, ti.pax_headers = len(data), {"comment": "é" * 2000}
                tf.addfile(ti, io.BytesIO(data))
            d = tarfile.TarInfo(long_dir)
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        rows = _run(tmp_path / str(fmt), buf.getvalue(), [f"{long_dir}/fig{'x' * 120}.png", "PMC7/short.png"])
        assert {r["status"] for r in rows.values()} == {"done"}, rows


def test_image_bytes_are_fsynced_before_the_done_line(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    real_done = download_archive.os.replace

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_done(src, dst)

    monkeypatch.setattr(download_archive.os, "replace", replace)
    archive = gzip_with_zero_run(member("PMC1/fig.png", _png(4)) + end_of_archive(), 0)
    rows = _run(tmp_path, archive, ["PMC1/fig.png", "PMC1/fig.png"])
    assert rows["p0"]["status"] == rows["p1"]["status"] == "done"
    images, manifest = str(tmp_path / "out" / "images"), str(tmp_path / "out" / "manifest.jsonl")
    for pid in ("p0", "p1"):
        final = f"{images}/{pid}.png"
        rename = events.index(("rename", final))
        data_sync = max(
            i for i, (k, p) in enumerate(events[:rename]) if k == "fsync" and p.startswith(f"{images}/.{pid}.png.")
        )
        dir_sync = events.index(("fsync", images), rename)
        done_line = next(i for i, e in enumerate(events) if i > dir_sync and e == ("fsync", manifest))
        assert data_sync < rename < dir_sync < done_line

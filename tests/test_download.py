"""The PMC figure downloader against a real HTTP server on 127.0.0.1 serving generated tarballs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tarserver import Reset, Serve, Status, TarServer, make_image, make_tarball  # noqa: E402
from medvlm.data.download import DownloadConfig, download_images, map_url, parse_url_map  # noqa: E402
from medvlm.errors import MedvlmError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> DownloadConfig:
    kw.setdefault("workers", 4)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("timeout", 10.0)
    kw.setdefault("progress", False)
    return DownloadConfig(**kw)


def _write_urls(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"pmc_tar_url": u, "image_file_path": m, "pair_id": p}) + "\n" for u, m, p in rows)
    )
    return path


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _last(out: Path) -> dict[str, dict]:
    return {r["pair_id"]: r for r in _manifest(out)}


def _article(pmc: str, n: int, seed: int = 0, fmt: str = "PNG") -> tuple[dict[str, bytes], bytes]:
    """Figures of one PMC article and its tarball (figures plus the paper's XML and a PDF)."""
    ext = ".jpg" if fmt == "JPEG" else ".png"
    figs = {f"{pmc}/fig{i}{ext}": make_image(seed * 100 + i, fmt) for i in range(n)}
    return figs, make_tarball({f"{pmc}/{pmc}.nxml": b"<article/>", **figs, f"{pmc}/paper.pdf": b"%PDF-1.4 " * 50})


def test_fetches_each_tarball_once_and_writes_only_the_wanted_figures(tmp_path):
    figs, tar = _article("PMC11", 4, fmt="JPEG")
    with TarServer() as srv:
        url = srv.add("/oa/PMC11.tar.gz", Serve(tar))
        rows = [(url, f"PMC11/fig{i}.jpg", f"1000_F{i}") for i in (0, 2, 3)]
        summary = download_images(_write_urls(tmp_path / "urls.jsonl", rows), tmp_path / "out", _cfg())
        assert srv.hits("/oa/PMC11.tar.gz") == 1
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1000_F0.jpg", "1000_F2.jpg", "1000_F3.jpg"]
    assert sorted(p.name for p in out.iterdir()) == [".download.lock", "images", "manifest.jsonl"]
    for _, member, pid in rows:
        data = (out / "images" / f"{pid}.jpg").read_bytes()
        assert data == figs[member]
        row = _last(out)[pid]
        assert row == {
            **row,
            "status": "done",
            "url": url,
            "member": member,
            "file": f"images/{pid}.jpg",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "reason": None,
        }
    assert (summary.done, summary.failed, summary.archives, summary.total) == (3, {}, 1, 3)
    assert summary.bytes_written == sum(len(figs[m]) for _, m, _ in rows)


def test_server_failures_are_retried_or_recorded_without_stopping(tmp_path):
    figs, tar = _article("PMC1", 2)
    with TarServer() as srv:
        u = {
            "gone404": srv.add("/a/404.tar.gz", Status(404)),
            "gone410": srv.add("/a/410.tar.gz", Status(410)),
            "flaky500": srv.add("/a/flaky.tar.gz", Status(500), Serve(tar)),
            "reset": srv.add("/a/reset.tar.gz", Reset(tar, len(tar) // 3), Serve(tar)),
            "busy": srv.add("/a/busy.tar.gz", Status(503, retry_after=0), Serve(tar)),
            "down": srv.add("/a/down.tar.gz", Status(500)),
            "trunc": srv.add("/a/trunc.tar.gz", Serve(tar[: len(tar) // 2])),  # cut inside fig1's data
            "forbidden": srv.add("/a/403.tar.gz", Status(403)),
        }
        rows = [(u[k], "PMC1/fig1.png" if k == "trunc" else "PMC1/fig0.png", k) for k in u]
        rows += [
            (u["flaky500"], "PMC1/fig1.png", "flaky500_b"),
            (u["flaky500"], "PMC1/absent.png", "missing"),
            (u["flaky500"], "PMC1/PMC1.nxml", "xml"),
        ]
        summary = download_images(_write_urls(tmp_path / "urls.jsonl", rows), tmp_path / "out", _cfg(retries=2))
        hits = {k: srv.hits(v.split(str(srv.port))[1]) for k, v in u.items()}
    # 404/410/403 are final; 5xx, resets and truncated archives are retried (1 + retries attempts at most).
    assert hits == {
        "gone404": 1,
        "gone410": 1,
        "flaky500": 2,
        "reset": 2,
        "busy": 2,
        "down": 3,
        "trunc": 3,
        "forbidden": 1,
    }
    last = _last(tmp_path / "out")
    reasons = {pid: r["reason"] for pid, r in last.items()}
    assert reasons == {
        "gone404": "http_404",
        "gone410": "http_410",
        "flaky500": None,
        "flaky500_b": None,
        "reset": None,
        "busy": None,
        "down": "http_500",
        "trunc": "truncated_archive",
        "forbidden": "http_403",
        "missing": "missing_member",
        "xml": "not_image",
    }
    images = tmp_path / "out" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["busy.png", "flaky500.png", "flaky500_b.png", "reset.png"]
    assert (images / "reset.png").read_bytes() == figs["PMC1/fig0.png"]
    assert (images / "flaky500_b.png").read_bytes() == figs["PMC1/fig1.png"]
    assert summary.done == 4
    assert summary.failed == {
        "http_404": 1,
        "http_410": 1,
        "http_500": 1,
        "truncated_archive": 1,
        "http_403": 1,
        "missing_member": 1,
        "not_image": 1,
    }
    assert "truncated_archive 1" in summary.format() and "done 4" in summary.format()


def test_stalled_server_times_out_and_is_retried(tmp_path):
    _, tar = _article("PMC2", 1)
    with TarServer() as srv:
        url = srv.add("/stall.tar.gz", Serve(tar, chunk=512, chunk_delay=3.0))
        urls = _write_urls(tmp_path / "urls.jsonl", [(url, "PMC2/fig0.png", "slow")])
        summary = download_images(urls, tmp_path / "out", _cfg(timeout=0.3, retries=1))
        assert srv.hits("/stall.tar.gz") == 2
    assert summary.failed == {"timeout": 1}
    assert "timed out" in _last(tmp_path / "out")["slow"]["error"]


def test_hostile_archive_never_writes_outside_the_output_folder(tmp_path):
    good = make_image(7)
    tar = make_tarball(
        {
            "PMC9/fig1.png": good,
            "../escape.png": make_image(8),
            "PMC9/../../up.png": make_image(9),
            "/abs.png": make_image(10),
        },
        symlinks={"PMC9/link.png": "/etc/passwd", "PMC9/rel.png": "../../../../etc/hostname"},
        hardlinks={"PMC9/hard.png": "PMC9/fig1.png"},
        devices=["PMC9/dev.png"],
    )
    before = set(tmp_path.parent.iterdir())
    with TarServer() as srv:
        url = srv.add("/PMC9.tar.gz", Serve(tar))
        rows = [
            (url, "PMC9/fig1.png", "ok"),
            (url, "PMC9/link.png", "sym"),
            (url, "PMC9/rel.png", "relsym"),
            (url, "PMC9/hard.png", "hard"),
            (url, "PMC9/dev.png", "dev"),
            (url, "../escape.png", "dots"),
            (url, "PMC9/../../up.png", "dots2"),
            (url, "/abs.png", "abs"),
            (url, "PMC9/fig1.png", "../evil"),
            (url, "PMC9/fig1.png", "x" * 250),
        ]
        summary = download_images(_write_urls(tmp_path / "urls.jsonl", rows), tmp_path / "out", _cfg())
    reasons = {pid: r["reason"] for pid, r in _last(tmp_path / "out").items()}
    assert reasons == {
        "ok": None,
        "sym": "unsafe_member",
        "relsym": "unsafe_member",
        "hard": "unsafe_member",
        "dev": "unsafe_member",
        "dots": "unsafe_path",
        "dots2": "unsafe_path",
        "abs": "unsafe_path",
        "../evil": "bad_pair_id",
        "x" * 250: "bad_pair_id",
    }
    assert summary.done == 1
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["out/.download.lock", "out/images/ok.png", "out/manifest.jsonl", "urls.jsonl"]
    assert not any((p / "escape.png").exists() or (p / "up.png").exists() for p in (tmp_path, tmp_path.parent))
    assert set(tmp_path.parent.iterdir()) == before
    assert (tmp_path / "out" / "images" / "ok.png").read_bytes() == good


def test_size_caps_stop_oversized_members_and_decompression_bombs(tmp_path):
    big = make_image(1, size=(200, 200))
    bomb = make_tarball({"PMC5/zeros.bin": bytes(6 * 1024 * 1024), "PMC5/fig.png": make_image(2)})
    assert len(bomb) < 64 * 1024  # a small download that unpacks to 6 MB
    with TarServer() as srv:
        u_big = srv.add("/big.tar.gz", Serve(make_tarball({"PMC4/big.png": big, "PMC4/small.png": make_image(3)})))
        u_bomb = srv.add("/bomb.tar.gz", Serve(bomb))
        rows = [(u_big, "PMC4/big.png", "big"), (u_big, "PMC4/small.png", "small"), (u_bomb, "PMC5/fig.png", "bomb")]
        summary = download_images(
            _write_urls(tmp_path / "urls.jsonl", rows),
            tmp_path / "out",
            _cfg(max_member_bytes=len(big) - 1, max_archive_bytes=1024 * 1024),
        )
        assert srv.hits("/bomb.tar.gz") == 1  # a cap is final, not retried
    reasons = {pid: r["reason"] for pid, r in _last(tmp_path / "out").items()}
    assert reasons == {"big": "too_large", "small": None, "bomb": "archive_too_large"}
    assert summary.failed == {"too_large": 1, "archive_too_large": 1}


def test_rerun_skips_done_pairs_retries_failed_ones_and_redoes_lost_files(tmp_path):
    figs_a, tar_a = _article("PMC21", 2, seed=1)
    figs_b, tar_b = _article("PMC22", 1, seed=2)
    with TarServer() as srv:
        ua = srv.add("/PMC21.tar.gz", Serve(tar_a))
        ub = srv.add("/PMC22.tar.gz", Status(404), Serve(tar_b))  # missing on the first run, back later
        urls = _write_urls(
            tmp_path / "urls.jsonl",
            [(ua, "PMC21/fig0.png", "a0"), (ua, "PMC21/fig1.png", "a1"), (ub, "PMC22/fig0.png", "b0")],
        )
        out = tmp_path / "out"
        s1 = download_images(urls, out, _cfg())
        assert (s1.done, s1.failed) == (2, {"http_404": 1})
        s2 = download_images(urls, out, _cfg())
        assert (s2.done, s2.already_done, s2.failed) == (1, 2, {})
        assert (srv.hits("/PMC21.tar.gz"), srv.hits("/PMC22.tar.gz")) == (1, 2)
        s3 = download_images(urls, out, _cfg())
        assert (s3.done, s3.already_done, srv.hits("/PMC21.tar.gz")) == (0, 3, 1)
        # A file the manifest calls done but that is gone or altered is fetched again.
        (out / "images" / "a0.png").unlink()
        (out / "images" / "a1.png").write_bytes(b"x")
        s4 = download_images(urls, out, _cfg())
        assert (s4.done, s4.already_done, srv.hits("/PMC21.tar.gz")) == (2, 1, 2)
        # Same size, different bytes: only noticed when asked to verify hashes.
        data = bytearray((out / "images" / "b0.png").read_bytes())
        data[-20] ^= 0xFF
        (out / "images" / "b0.png").write_bytes(bytes(data))
        assert download_images(urls, out, _cfg()).done == 0
        assert download_images(urls, out, _cfg(verify_existing=True)).done == 1
    assert (out / "images" / "a0.png").read_bytes() == figs_a["PMC21/fig0.png"]
    assert (out / "images" / "a1.png").read_bytes() == figs_a["PMC21/fig1.png"]
    assert (out / "images" / "b0.png").read_bytes() == figs_b["PMC22/fig0.png"]


def test_torn_manifest_line_is_tolerated_and_not_glued_to_new_lines(tmp_path):
    figs, tar = _article("PMC31", 2)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / ".p0.png.abc.part").write_bytes(b"half")  # a killed run's temp file
    (out / "manifest.jsonl").write_text(
        '{"pair_id": "p1", "status": "failed", "reason": "http_500"}\n{"pair_id": "p0", "status": "do'
    )
    with TarServer() as srv:
        url = srv.add("/PMC31.tar.gz", Serve(tar))
        urls = _write_urls(tmp_path / "urls.jsonl", [(url, "PMC31/fig0.png", "p0"), (url, "PMC31/fig1.png", "p1")])
        assert download_images(urls, out, _cfg()).done == 2
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert lines[1] == '{"pair_id": "p0", "status": "do'
    assert {json.loads(x)["pair_id"]: json.loads(x)["status"] for x in lines[2:]} == {"p0": "done", "p1": "done"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["p0.png", "p1.png"]


def test_keep_archives_saves_each_archive_whole_and_reuses_it(tmp_path):
    figs, tar = _article("PMC41", 3)
    out = tmp_path / "out"
    with TarServer() as srv:
        url = srv.add("/oa/PMC41.tar.gz", Serve(tar))
        urls = _write_urls(tmp_path / "urls.jsonl", [(url, "PMC41/fig0.png", "k0")])
        download_images(urls, out, _cfg(keep_archives=True))
        assert (out / "archives" / "PMC41.tar.gz").read_bytes() == tar
        (out / "images" / "k0.png").unlink()
        assert download_images(urls, out, _cfg(keep_archives=True)).done == 1
        assert srv.hits("/oa/PMC41.tar.gz") == 1
    assert (out / "images" / "k0.png").read_bytes() == figs["PMC41/fig0.png"]
    assert sorted(p.name for p in (out / "archives").iterdir()) == ["PMC41.tar.gz"]


def test_url_map_points_the_real_url_list_at_a_mirror_or_a_local_folder(tmp_path, shared_dir):
    sample = shared_dir / "formats" / "image_urls_sample.jsonl"
    rows = [json.loads(x) for x in sample.read_text().splitlines()]
    tars, figs = {}, {}
    for i, r in enumerate(rows):
        figs[r["pair_id"]] = make_image(50 + i, "JPEG")
        pmc = r["image_file_path"].split("/")[0]
        tars[r["pmc_tar_url"]] = make_tarball({f"{pmc}/{pmc}.nxml": b"<a/>", r["image_file_path"]: figs[r["pair_id"]]})
    prefix = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/"
    with TarServer() as srv:
        for u, t in tars.items():
            srv.add("/mirror/" + u[len(prefix) :], Serve(t))
        s = download_images(sample, tmp_path / "http", _cfg(url_map=parse_url_map([f"{prefix}={srv.url('/mirror/')}"])))
    assert s.done == 2
    local = tmp_path / "local"
    for u, t in tars.items():
        (local / u[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
        (local / u[len(prefix) :]).write_bytes(t)
    s = download_images(sample, tmp_path / "file", _cfg(url_map=[(prefix, local.as_uri() + "/")]))
    assert s.done == 2
    for pid, data in figs.items():
        assert (tmp_path / "http" / "images" / f"{pid}.jpg").read_bytes() == data
        assert (tmp_path / "file" / "images" / f"{pid}.jpg").read_bytes() == data
    assert map_url(prefix + "oa_package/x.tar.gz", [(prefix, "A/"), (prefix + "oa_package/", "B/")]) == "B/x.tar.gz"


def test_plain_tar_dot_slash_names_duplicates_and_limit(tmp_path):
    a, b = make_image(61), make_image(62)
    tar = make_tarball({"./PMC51/a.png": a, "./PMC51/b.png": b}, gz=False)
    with TarServer() as srv:
        url = srv.add("/PMC51.tar", Serve(tar))
        rows = [
            (url, "PMC51/a.png", "x"),
            (url, "PMC51/b.png", "x"),
            (url, "PMC51/a.png", "x"),
            (url, "./PMC51/a.png", "twin"),
            (url, "PMC51/b.png", "beyond_limit"),
        ]
        s = download_images(_write_urls(tmp_path / "urls.jsonl", rows), tmp_path / "out", _cfg(limit=2))
    assert (s.total, s.done, s.duplicates) == (2, 2, 1)
    assert (tmp_path / "out" / "images" / "x.png").read_bytes() == a
    assert (tmp_path / "out" / "images" / "twin.png").read_bytes() == a
    assert "beyond_limit" not in _last(tmp_path / "out")


def test_bad_input_and_concurrent_runs_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"pmc_tar_url": "http://x/a.tar.gz", "image_file_path": "A/b.jpg", "pair_id": "p"}\n'
        '{"pmc_tar_url": "http://x/a.tar.gz", "pair_id": "q"}\n'
    )
    with pytest.raises(MedvlmError, match=r"bad\.jsonl: record 1 \(line 2\): field 'image_file_path'"):
        download_images(bad, tmp_path / "out", _cfg())
    with pytest.raises(MedvlmError, match="OLD_PREFIX=NEW_PREFIX"):
        parse_url_map(["no-equals-sign"])
    with pytest.raises(MedvlmError, match="workers"):
        download_images(bad, tmp_path / "out", _cfg(workers=0))
    good = _write_urls(tmp_path / "good.jsonl", [("http://127.0.0.1:9/a.tar.gz", "A/b.jpg", "p")])
    (tmp_path / "busy").mkdir()
    with (tmp_path / "busy" / ".download.lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(MedvlmError, match="another download-images run"):
            download_images(good, tmp_path / "busy", _cfg())


def test_cli_download_images(tmp_path):
    from typer.testing import CliRunner

    from medvlm.cli import app

    figs, tar = _article("PMC61", 1)
    with TarServer() as srv:
        srv.add("/new/PMC61.tar.gz", Serve(tar))
        urls = _write_urls(tmp_path / "urls.jsonl", [("https://old.example/PMC61.tar.gz", "PMC61/fig0.png", "c0")])
        res = CliRunner().invoke(
            app,
            [
                "data",
                "download-images",
                "--urls",
                str(urls),
                "--out",
                str(tmp_path / "o"),
                "--workers",
                "2",
                "--url-map",
                f"https://old.example/={srv.url('/new/')}",
                "--no-progress",
            ],
        )
    assert res.exit_code == 0, res.output
    assert "done 1" in res.output and "failed 0" in res.output
    assert (tmp_path / "o" / "images" / "c0.png").read_bytes() == figs["PMC61/fig0.png"]


_CHILD = """
import sys
from medvlm.data.download import DownloadConfig, download_images
download_images(sys.argv[1], sys.argv[2], DownloadConfig(workers=2, progress=False, backoff_base=0.01))
"""


def test_sigkill_midway_then_rerun_finishes_every_pair_exactly_once(tmp_path):
    n_tars, per_tar = 10, 3
    served: dict[str, bytes] = {}
    with TarServer() as srv:
        rows = []
        for t in range(n_tars):
            figs, tar = _article(f"PMC7{t}", per_tar, seed=10 + t)
            url = srv.add(f"/PMC7{t}.tar.gz", Serve(tar, chunk=1024, chunk_delay=0.01))
            for i, (member, data) in enumerate(figs.items()):
                rows.append((url, member, f"k{t}_{i}"))
                served[f"k{t}_{i}"] = data
        urls = _write_urls(tmp_path / "urls.jsonl", rows)
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(urls), str(out)], env=env)
        manifest = out / "manifest.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and manifest.read_text().count("\n") >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the child finished before it could be killed: slow the server down"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Killed state: whatever sits under a final name is complete; the rest of the work is still to do.
        finals = [p for p in (out / "images").iterdir() if not p.name.startswith(".")]
        assert 4 <= len(finals) < len(rows)
        for p in finals:
            assert p.read_bytes() == served[p.stem]
        summary = download_images(urls, out, _cfg(workers=2))
    assert summary.failed == {}
    assert summary.done + summary.already_done == len(rows) and summary.already_done >= 4
    done_rows = [r for r in _manifest(out) if r["status"] == "done"]
    assert sorted(r["pair_id"] for r in done_rows) == sorted(served)  # each pair done exactly once
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{k}.png" for k in served)
    for pid, data in served.items():
        assert (out / "images" / f"{pid}.png").read_bytes() == data

"""Benchmark ``medvlm data download-images`` against LLaVA-Med's original download algorithm.

Baseline (the original ``download_images.py`` algorithm, reimplemented): for each row of the URL
list, sequentially: download the whole tarball to disk, extract all of it, copy the one figure, delete.
medvlm: rows grouped by tarball, each tarball streamed once, only wanted members written, N workers.

Both run in their own process against the same loopback server (a separate process, adding a fixed
latency per request) serving generated PMC-like tarballs; the outputs are checked to be identical.
Prints wall time and peak RSS of both, side by side with their ratios.

    .venv/bin/python benchmarks/bench_download.py [--tarballs 200] [--latency 0.05] [--workers 16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_corpus(folder: Path, n_tars: int, n_figs: int, wanted: int, seed: int = 0) -> tuple[Path, int]:
    """Write ``n_tars`` PMC-like tarballs (XML, PDF, ``n_figs`` JPEG figures) and a URL list asking for
    ``wanted`` figures of each; returns (url list path, total archive bytes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, total = [], 0
    for t in range(n_tars):
        pmc = f"PMC{9000000 + t}"
        files = {
            f"{pmc}/{pmc}.nxml": (b"<article><p>text</p></article>\n" * 600),
            f"{pmc}/{pmc}.pdf": rng.bytes(150_000),
        }
        for i in range(n_figs):
            buf = io.BytesIO()
            arr = rng.integers(0, 256, size=(160, 200, 3), dtype=np.uint8)
            Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            files[f"{pmc}/fig{i}.jpg"] = buf.getvalue()
        path = folder / "oa_package" / f"{t % 256:02x}" / f"{pmc}.tar.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        total += path.stat().st_size
        for i in range(wanted):
            rows.append(
                {
                    "pmc_tar_url": f"http://pmc.invalid/{path.relative_to(folder)}",
                    "image_file_path": f"{pmc}/fig{i}.jpg",
                    "pair_id": f"{9000000 + t}_F{i + 1}",
                }
            )
    urls = folder / "urls.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return urls, total


def run_baseline(urls: Path, out: Path, url_map: tuple[str, str]) -> int:
    """The original algorithm: per row, fetch the whole tarball, extract everything, copy the figure."""
    import httpx

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    done = 0
    with httpx.Client(timeout=60) as client:
        for line in urls.read_text().splitlines():
            row = json.loads(line)
            url = row["pmc_tar_url"].replace(url_map[0], url_map[1], 1)
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                tar_path = Path(tmp) / Path(url).name
                resp = client.get(url)
                resp.raise_for_status()
                tar_path.write_bytes(resp.content)
                with tarfile.open(tar_path, "r:gz") as tf:
                    tf.extractall(Path(tmp) / "x", filter="data")
                ext = Path(row["image_file_path"]).suffix
                shutil.copy(Path(tmp) / "x" / row["image_file_path"], images / f"{row['pair_id']}{ext}")
                done += 1
    return done


def _child(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.run == "baseline":
        done = run_baseline(args.urls, args.out, (args.map_from, args.map_to))
    else:
        from medvlm.data.download import DownloadConfig, download_images

        cfg = DownloadConfig(workers=args.workers, progress=False, url_map=[(args.map_from, args.map_to)])
        s = download_images(args.urls, args.out, cfg)
        assert not s.failed, s.format()
        done = s.done
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "done": done}))


def _run(which: str, urls: Path, out: Path, map_to: str, workers: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--run",
        which,
        "--urls",
        str(urls),
        "--out",
        str(out),
        "--map-from",
        "http://pmc.invalid/",
        "--map-to",
        map_to,
        "--workers",
        str(workers),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarballs", type=int, default=200)
    ap.add_argument("--figures", type=int, default=5, help="figures per tarball")
    ap.add_argument("--wanted", type=int, default=3, help="figures per tarball listed in the URL file")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the server adds to each request")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--run", choices=["baseline", "medvlm"], help=argparse.SUPPRESS)
    ap.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--map-from", help=argparse.SUPPRESS)
    ap.add_argument("--map-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_download.") as tmp:
        root = Path(tmp)
        urls, total = make_corpus(root / "srv", args.tarballs, args.figures, args.wanted)
        port_file = root / "port"
        server = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "helpers_tarserver.py"),
                "--dir",
                str(root / "srv"),
                "--latency",
                str(args.latency),
                "--port-file",
                str(port_file),
            ]
        )
        try:
            while not port_file.exists():
                time.sleep(0.05)
            base = f"http://127.0.0.1:{port_file.read_text()}/"
            n_rows = args.tarballs * args.wanted
            print(
                f"{args.tarballs} tarballs ({total / 1e6:.1f} MB), {n_rows} rows, {args.latency * 1000:.0f} ms "
                f"latency per request, {os.cpu_count()} CPUs"
            )
            ours = _run("medvlm", urls, root / "ours", base, args.workers)
            base_res = _run("baseline", urls, root / "base", base, 1)
        finally:
            server.terminate()
            server.wait()
        assert ours["done"] == base_res["done"] == n_rows, (ours, base_res)
        for p in (root / "base" / "images").iterdir():
            assert (root / "ours" / "images" / p.name).read_bytes() == p.read_bytes(), p.name
        print(f"{'':22}{'baseline':>12}{'medvlm':>12}{'ratio':>10}   (time: baseline/medvlm; RSS: medvlm/baseline)")
        print(
            f"{'wall time (s)':22}{base_res['seconds']:>12.2f}{ours['seconds']:>12.2f}"
            f"{base_res['seconds'] / ours['seconds']:>9.1f}x"
        )
        print(f"{'figures / s':22}{n_rows / base_res['seconds']:>12.1f}{n_rows / ours['seconds']:>12.1f}")
        print(
            f"{'peak RSS (MB)':22}{base_res['rss_mb']:>12.1f}{ours['rss_mb']:>12.1f}"
            f"{ours['rss_mb'] / base_res['rss_mb']:>9.2f}x"
        )
        print(f"outputs identical: {n_rows} figures (medvlm with {args.workers} workers, baseline sequential)")


if __name__ == "__main__":
    main()

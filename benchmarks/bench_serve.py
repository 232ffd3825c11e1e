"""Benchmark ``medvlm serve api``: dynamic batching vs one request at a time, and a 32-client soak.

Runs the server as a subprocess on 127.0.0.1 (``medvlm serve api``), clients are threads with httpx.
1. 8 concurrent clients against ``--max-batch 8`` and against ``--max-batch 1``: throughput ratio,
   p50 / p99 latency.
2. 32 concurrent clients, a bounded number of requests: errors and the server's RSS over time.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--requests-per-client 6] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil


def tiny_model(folder: Path) -> Path:
    from medvlm.model.build import build_preset, save_checkpoint

    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=7)
    return save_checkpoint(model, processor, folder / "tiny-med")


def start_server(model: Path, max_batch: int, port: int, max_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medvlm", "serve", "api", "--model", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--served-model-name", "m", "--max-queue", "256",
           "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def _image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 80), (120, 40, 60)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_clients(port: int, clients: int, per_client: int, max_tokens: int, sample_rss_of: int | None = None):
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    image = _image_url()
    latencies: list[float] = []
    errors: list[str] = []
    rss: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            for i in range(per_client):
                content = [{"type": "text", "text": f"Question {k}-{i}: describe the findings."}]
                if (k + i) % 2 == 0:
                    content.insert(0, {"type": "image_url", "image_url": {"url": image}})
                body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
                t = time.monotonic()
                try:
                    r = http.post(url, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    ok, r = False, e
                with lock:
                    if ok:
                        latencies.append(time.monotonic() - t)
                    else:
                        errors.append(str(getattr(r, "status_code", r)))

    def sampler() -> None:
        p = psutil.Process(sample_rss_of)
        while not stop.wait(0.5):
            rss.append(p.memory_info().rss / 2**20)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    mon = threading.Thread(target=sampler) if sample_rss_of else None
    t0 = time.monotonic()
    if mon:
        mon.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    stop.set()
    if mon:
        mon.join()
    return wall, latencies, errors, rss


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak-requests-per-client", type=int, default=4)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    args = ap.parse_args()
    from medvlm.serve.server import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        rows = {}
        for max_batch in (8, 1):
            port = free_port()
            proc = start_server(model, max_batch, port, args.max_wait_ms)
            try:
                run_clients(port, 2, 1, 4)  # warm-up
                wall, lat, errs, _ = run_clients(port, 8, args.requests_per_client, args.max_tokens)
                stats = httpx.get(f"http://127.0.0.1:{port}/health").json()
                print(f"max_batch={max_batch}: mean batch {stats['requests_run'] / max(stats['batches_run'], 1):.2f}, "
                      f"largest {stats['largest_batch']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
            n = len(lat)
            rows[max_batch] = (n / wall, pct(lat, 0.5), pct(lat, 0.99), len(errs))
            print(f"max_batch={max_batch}: {n} requests in {wall:.2f} s = {n / wall:.2f} req/s, "
                  f"p50 {rows[max_batch][1]:.2f} s, p99 {rows[max_batch][2]:.2f} s, errors {len(errs)}", flush=True)
        print(f"throughput ratio batched / one-at-a-time: {rows[8][0] / rows[1][0]:.2f}x")
        port = free_port()
        proc = start_server(model, 8, port, args.max_wait_ms)
        try:
            run_clients(port, 2, 1, 4)
            wall, lat, errs, rss = run_clients(port, 32, args.soak_requests_per_client, args.max_tokens, proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        q = max(1, len(rss) // 4)
        print(f"32 clients: {len(lat)} ok, {len(errs)} errors in {wall:.2f} s; p50 {pct(lat, 0.5):.2f} s, "
              f"p99 {pct(lat, 0.99):.2f} s; server RSS first quarter {statistics.mean(rss[:q]):.0f} MiB, "
              f"last quarter {statistics.mean(rss[-q:]):.0f} MiB, peak {max(rss):.0f} MiB")


if __name__ == "__main__":
    main()

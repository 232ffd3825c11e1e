"""Benchmark ``medvlm serve api``: continuous batching + prefix cache vs the same server one request at a time.

Two servers run at once as subprocesses on 127.0.0.1 (``medvlm serve api``): ``--max-batch 8`` (or 32)
and ``--max-batch 1``. Load phases alternate between them (8 clients on the batched server, 8 on the
one-at-a-time server, then 32 clients on each), ``--rounds`` times in alternating order (continuous first,
then one-at-a-time first, ...), so other jobs on a shared machine load both; throughput is all requests of a
server over the sum of its phases' wall time. Clients
are threads with httpx, each sending ``--requests-per-client`` streamed requests one after another:
a question about an image from the model's test set, base64 in the request. Measured per phase:
throughput, p50 / p99 latency (request to ``[DONE]``), p50 / p99 time to first token, answer lengths,
and each server's peak RSS.

Model: a trained checkpoint whose answers end at different lengths (``--model``): what the numbers in
``benchmarks/README.md`` used is ``medvlm demo --fast --out DEMO`` (the demo's curriculum at 1000 images)
then one epoch more on the demo's own instruction conversations (``DEMO/data/instruct.json``, sentence answers)
mixed with its VQA train split (one-word answers), so the model answers VQA questions in a word and chat
questions in a sentence; clients interleave ``--questions DEMO/data/vqa/test.json --questions DEMO/data/qa50.jsonl``
(``--image-folder DEMO/data/images``).

    .venv/bin/python benchmarks/bench_serve.py --model DIR --questions test.json --image-folder DIR
        [--requests-per-client 4] [--max-tokens 48] [--threads 1] [--rounds 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


def tiny_model(folder: Path) -> Path:
    """A random tiny ``mlp2x_gelu`` checkpoint (answers run to their token limit: use ``--max-tokens-range``)."""
    from medvlm.model.build import build_preset, save_checkpoint

    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=7)
    return save_checkpoint(model, processor, folder / "tiny-med")


def start_server(model: Path, max_batch: int, port: int, threads: int) -> subprocess.Popen:
    # One torch thread per server by default: on a shared 2-core machine, OpenMP threads spin-wait for
    # descheduled partners and a decoding step of the tiny model took ~90 ms instead of ~7 ms.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "medvlm",
        "serve",
        "api",
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--served-model-name",
        "m",
        "--max-queue",
        "256",
        "--max-wait-ms",
        "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def question_files(paths: list[Path]) -> list[tuple[str, str]]:
    """(question, image file name) pairs of converted VQA test files (JSON) or qa50-style files (JSONL), interleaved
    across the files (one from each in turn), so that a client's consecutive requests mix both kinds."""
    sources = []
    for path in paths:
        text = path.read_text()
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
        sources.append(
            [
                (
                    (r["conversations"][0]["value"] if "conversations" in r else r["text"])
                    .replace("<image>", "")
                    .strip(),
                    r["image"],
                )
                for r in records
            ]
        )
    return [p for group in zip(*sources) for p in group]


def load_questions(paths: list[Path], image_folder: Path) -> list[tuple[str, str]]:
    """(question, image data URL) pairs of :func:`question_files`, each image encoded once."""
    urls: dict[str, str] = {}
    pairs = []
    for q, img in question_files(paths):
        if img not in urls:
            urls[img] = "data:image/png;base64," + base64.b64encode((image_folder / img).read_bytes()).decode()
        pairs.append((q, urls[img]))
    return pairs


def run_clients(port: int, clients: int, per_client: int, max_tokens, questions, offset: int):
    """``max_tokens``: an int, or (low, high) for a per-request limit drawn from that range (the same draws on
    every server)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    lat: list[float] = []
    ttft: list[float] = []
    lengths: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                q, image = questions[(offset + k * per_client + i) % len(questions)]
                limit = (
                    max_tokens
                    if isinstance(max_tokens, int)
                    else random.Random(offset + k * 1000 + i).randint(*max_tokens)
                )
                body = {
                    "model": "m",
                    "max_tokens": limit,
                    "stream": True,
                    "temperature": 0,
                    "stream_options": {"include_usage": True},
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": image}},
                                {"type": "text", "text": q},
                            ],
                        }
                    ],
                }
                t0 = time.monotonic()
                first = None
                tokens = 0
                try:
                    with http.stream("POST", url, json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}")
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                                first = time.monotonic() - t0
                    with lock:
                        lat.append(time.monotonic() - t0)
                        ttft.append(first if first is not None else time.monotonic() - t0)
                        lengths.append(tokens)
                except (httpx.HTTPError, RuntimeError) as e:
                    with lock:
                        errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, lat, ttft, lengths, errors


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


class PeakRss:
    """Samples a process's RSS every 0.2 s."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            except psutil.Error:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="A checkpoint (default: a random tiny model, built on the spot).")
    ap.add_argument(
        "--questions",
        type=Path,
        action="append",
        required=True,
        help="Converted VQA JSON or qa50 JSONL; repeat to interleave several (short and long answers).",
    )
    ap.add_argument("--image-folder", type=Path, required=True)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--max-tokens-range",
        default=None,
        help="LOW,HIGH: each request's max_tokens drawn from this range (same draws for both servers); "
        "for a model whose answers do not end on their own (random weights).",
    )
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server (both servers alike).")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Load phases per server, alternating which server goes first (averages a shared machine's load).",
    )
    args = ap.parse_args()
    import tempfile

    from medvlm.serve.server import free_port

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    model = args.model or tiny_model(Path(tmp.name))
    questions = load_questions(args.questions, args.image_folder)
    limits = tuple(int(x) for x in args.max_tokens_range.split(",")) if args.max_tokens_range else args.max_tokens
    print(
        f"{len(questions)} questions; {args.requests_per_client} streamed requests per client, "
        f"max_tokens {limits}, greedy",
        flush=True,
    )
    for clients in [int(c) for c in args.clients.split(",")]:
        servers = {}
        for name, max_batch in (("continuous", clients), ("one at a time", 1)):
            port = free_port()
            servers[name] = (start_server(model, max_batch, port, args.threads), port)
        rows = {}
        try:
            for _proc, port in servers.values():
                run_clients(port, 2, 1, 4, questions, 10_000)  # warm-up
            acc = {name: {"lat": [], "ttft": [], "lengths": [], "errors": [], "wall": 0.0} for name in servers}
            rss = {name: PeakRss(servers[name][0].pid) for name in servers}
            for r in range(args.rounds):
                order = ("continuous", "one at a time") if r % 2 == 0 else ("one at a time", "continuous")
                for name in order:
                    _, port = servers[name]
                    # Both servers get the same questions in every round (different ones from round to round).
                    wall, lat, ttft, lengths, errs = run_clients(
                        port,
                        clients,
                        args.requests_per_client,
                        limits,
                        questions,
                        r * clients * args.requests_per_client,
                    )
                    a = acc[name]
                    a["lat"] += lat
                    a["ttft"] += ttft
                    a["lengths"] += lengths
                    a["errors"] += errs
                    a["wall"] += wall
                    print(f"  round {r + 1} {name}: {len(lat) / wall:.2f} req/s", flush=True)
            for name, (_, port) in servers.items():
                health = httpx.get(f"http://127.0.0.1:{port}/health").json()
                a = acc[name]
                rows[name] = (
                    len(a["lat"]) / a["wall"],
                    a["lat"],
                    a["ttft"],
                    a["lengths"],
                    a["errors"],
                    rss[name].stop(),
                    health,
                    a["wall"],
                )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        print(
            f"\n{clients} concurrent clients ({clients * args.requests_per_client * args.rounds} requests per server, "
            f"{args.rounds} round(s))"
        )
        print(
            f"{'server':<24}{'req/s':>7}{'p50 s':>8}{'p99 s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'tokens':>12}"
            f"{'peak RSS MiB':>14}{'errors':>8}"
        )
        for name, (tput, lat, ttft, lengths, errs, peak, _health, _wall) in rows.items():
            label = f"{name} (max-batch {clients if name == 'continuous' else 1})"
            print(
                f"{label:<24}{tput:>7.2f}{pct(lat, 0.5):>8.2f}{pct(lat, 0.99):>8.2f}{pct(ttft, 0.5):>10.2f}"
                f"{pct(ttft, 0.99):>10.2f}{f'{min(lengths)}-{max(lengths)}' if lengths else '-':>12}"
                f"{peak:>14.0f}{len(errs):>8}"
            )
        h = rows["continuous"][6]
        pc = h.get("prefix_cache") or {}
        print(
            f"continuous server: largest batch {h['largest_batch']}, {h['decode_steps']} decode steps, prefix cache "
            f"{pc.get('hits')} hits / {pc.get('misses')} misses ({pc.get('hit_tokens')} prompt tokens reused)"
        )
        print(
            f"throughput ratio continuous / one at a time: {rows['continuous'][0] / rows['one at a time'][0]:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()

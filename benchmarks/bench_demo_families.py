"""``medvlm demo`` per model family: accuracy, wall time and CPU seconds of each full run, one after another.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_demo_families.py [--families qwen2_5_vl,idefics3,native] \
        [--seeds 0] [--n-images N] [--work /tmp/medvlm_bench_demo_families] [--out results.json]

Each run is ``medvlm demo --family F --seed S`` (``native``: no ``--family``) in its own subprocess, so its CPU
seconds (user + sys, ``getrusage`` of the waited-for child) are its own. The torch thread count is the
environment's ``OMP_NUM_THREADS`` (recorded; a different count is a different run). The load average before
and after each run is recorded too: on a shared machine the wall time measures the neighbours as much as the
run, the CPU seconds much less (unless threads spin-wait for descheduled partners, which is why 1 thread is the
recommended setting on a loaded machine). Prints one markdown row per run for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _children_cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def run_one(family: str, seed: int, work: Path, n_images: int | None) -> dict:
    """One demo run in a subprocess -> its final numbers, wall time, CPU seconds and the load around it."""
    out, json_out = work / f"{family}-s{seed}", work / f"{family}-s{seed}.json"
    cmd = [
        sys.executable,
        "-m",
        "medvlm",
        "demo",
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--summary-out",
        str(json_out),
    ]
    if family != "native":
        cmd += ["--family", family]
    if n_images is not None:
        cmd += ["--n-images", str(n_images)]
    load_before, cpu0, t0 = os.getloadavg(), _children_cpu(), time.time()
    with open(work / f"{family}-s{seed}.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.time() - t0, _children_cpu() - cpu0
    res = json.loads(json_out.read_text(encoding="utf-8"))
    return {
        "family": family,
        "seed": seed,
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "closed": res["scores"]["closed"]["accuracy"],
        "open": res["scores"]["open"]["recall"],
        "strict_closed": res["strict"]["closed"]["accuracy"],
        "strict_open": res["strict"]["open"]["recall"],
        "blind_closed": res["blind"]["closed"]["accuracy"],
        "blind_open": res["blind"]["open"]["recall"],
        "untrained": res["untrained"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "final_losses": {k: v[-1] for k, v in res["losses"].items()},
    }


def row(r: dict) -> str:
    """A markdown row of the README's "Demo per family" table."""
    return (
        f"| {r['family']} | {r['seed']} | {r['threads']} | **{r['closed']:.1f}** | **{r['open']:.1f}** | "
        f"{r['strict_closed']:.1f} / {r['strict_open']:.1f} | {r['blind_closed']:.1f} / {r['blind_open']:.1f} | "
        f"{r['wall_s']:.0f} s | {r['cpu_s']:.0f} | {r['load_before'][0]} -> {r['load_after'][0]} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="qwen2_5_vl,idefics3", help="comma-separated; 'native' = no --family")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--n-images", type=int, default=None, help="default: the demo's (8400)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvlm_bench_demo_families"))
    ap.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(run_one(family, seed, args.work, args.n_images))
            print(row(results[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Learnability check for the synthetic demo dataset (a script, not a test).

Trains a tiny randomly initialised CLIP vision tower (the size `medvlm demo` uses: 2 layers, 64-dim,
patch 8 on 64 px) with one linear head per factor on the train images of a synthetic dataset and
prints the held-out accuracy per factor next to the majority-class (blind) accuracy. If the tower
reaches ~1.0 here, the pixels carry every answer in a form a tiny from-scratch ViT can read.

    .venv/bin/python scripts/synth_probe.py --data /tmp/synth64 [--epochs 15] [--threads 2]

``--data`` is made with ``medvlm data synth --out DIR --image-size 64`` if it does not exist.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from medvlm.data.synth import generate_synth

FACTORS = ("modality", "count", "side", "size", "intensity")


def load(data: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list]]:
    rows = [json.loads(line) for line in (data / "factors.jsonl").read_text().splitlines()]
    values = {f: sorted({str(r[f]) for r in rows}) for f in FACTORS}
    x, y = {"train": [], "test": []}, {"train": [], "test": []}
    for r in rows:
        img = np.asarray(Image.open(data / "images" / r["image"]).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        x[r["split"]].append(img.transpose(2, 0, 1))  # [3, H, W]
        y[r["split"]].append([values[f].index(str(r[f])) for f in FACTORS])
    return ({s: torch.tensor(np.stack(v)) for s, v in x.items()}, {s: torch.tensor(v) for s, v in y.items()}, values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not (args.data / "factors.jsonl").is_file():
        generate_synth(args.data, n_images=args.n_images, seed=args.seed, image_size=64)
    x, y, values = load(args.data)
    size = x["train"].shape[-1]
    cfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=size, patch_size=8
    )
    tower = CLIPVisionModel(cfg)
    heads = torch.nn.ModuleList(torch.nn.Linear(64, len(values[f])) for f in FACTORS)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)

    def logits(px: torch.Tensor) -> list[torch.Tensor]:
        h = tower(pixel_values=px).last_hidden_state[:, 1:].mean(1)  # [B, 64] mean over patch tokens
        return [head(h) for head in heads]  # per factor [B, n_values]

    t0 = time.time()
    n = len(x["train"])
    for epoch in range(args.epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            idx = perm[i : i + 32]
            out = logits(x["train"][idx])
            loss = sum(torch.nn.functional.cross_entropy(o, y["train"][idx, k]) for k, o in enumerate(out))
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        out = logits(x["test"])
    print(f"{'factor':<10} {'probe acc':>9} {'blind acc':>9}")
    for k, f in enumerate(FACTORS):
        acc = (out[k].argmax(-1) == y["test"][:, k]).float().mean().item()
        major = Counter(y["train"][:, k].tolist()).most_common(1)[0][0]
        blind = (y["test"][:, k] == major).float().mean().item()
        print(f"{f:<10} {acc:>9.3f} {blind:>9.3f}")


if __name__ == "__main__":
    main()

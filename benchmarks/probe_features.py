"""Linear probes on a checkpoint's image tokens: is a factor in the features, and where?

For a ``medvlm data synth`` folder (``factors.jsonl`` names every image's modality / count / side / size /
intensity and its split), the projector's output for every image (``[n, tokens, hidden]``) is read three ways and a
logistic regression (L2, the best of four strengths on the test split) learns each factor on the train images:

- ``flat``: all tokens side by side. The token index is known to the probe, so where a lesion sits is free.
- ``mean`` / ``max``: tokens pooled. Position is gone unless the token *contents* carry it, which is what the LM's
  attention reads (it pools tokens too).

A factor high under ``flat`` and low under ``mean`` is in the features only through the token order. Usage::

    .venv/bin/python benchmarks/probe_features.py DATA_DIR CHECKPOINT [CHECKPOINT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from medvlm.model.build import load_pretrained

FACTORS = ("side", "count", "size", "intensity", "modality")


def image_tokens(checkpoint: str, data: Path, factors: list[dict]) -> torch.Tensor:
    """Projected image features of every image, ``[n, tokens, hidden]``."""
    model, processor = load_pretrained(checkpoint)
    out = []
    with torch.no_grad():
        for i in range(0, len(factors), 50):
            images = [Image.open(data / "images" / f["image"]) for f in factors[i : i + 50]]
            out.append(model.get_image_features(processor.preprocess_images(images)).float())
    return torch.cat(out)


def fit(z: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, wd: float) -> float:
    """Test accuracy (%) of a logistic regression with L2 strength ``wd`` fitted on the (standardised) train rows."""
    w = torch.zeros(z.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[train] @ w + b, y[train]) + wd * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100 * ((z[~train] @ w + b).argmax(1) == y[~train]).float().mean().item()


def probe(z: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int) -> float:
    """Test accuracy (%) of the best of four L2 strengths."""
    z = (z - z[train].mean(0)) / (z[train].std(0) + 1e-5)
    return max(fit(z, y, train, classes, wd) for wd in (1e-3, 1e-2, 1e-1, 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `medvlm data synth` output folder")
    ap.add_argument("checkpoints", nargs="+")
    a = ap.parse_args()
    torch.manual_seed(0)
    factors = [json.loads(line) for line in (a.data / "factors.jsonl").read_text(encoding="utf-8").splitlines()]
    train = torch.tensor([f["split"] == "train" for f in factors])
    print("| checkpoint | " + " | ".join(f"{k} flat / mean / max" for k in FACTORS) + " |")
    print("|---|" + "---|" * len(FACTORS))
    for ck in a.checkpoints:
        x = image_tokens(ck, a.data, factors)
        cells = []
        for key in FACTORS:
            values = sorted({str(f[key]) for f in factors})
            y = torch.tensor([values.index(str(f[key])) for f in factors])
            accs = [probe(z, y, train, len(values)) for z in (x.flatten(1), x.mean(1), x.amax(1))]
            cells.append(" / ".join(f"{v:.0f}" for v in accs))
        print(f"| {ck} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Frozen-tower feature cache: each image's vision features are computed once, then memory-mapped.

With the vision tower frozen and no image augmentation (LLaVA-Med stage 1, and any run that keeps
the tower frozen), the tower's output for an image never changes, yet an uncached run recomputes it
every epoch - for a CLIP ViT-L that is most of the step time when only the projector learns. The
cache stores the pre-projector features ``[L, D]`` of every image as one ``.npy`` file, read back
with ``mmap_mode="r"``; later epochs skip image decoding and the tower altogether.

Entries are keyed by the image bytes' SHA-256 under a folder keyed by everything that determines
the features: the tower weights' fingerprint, the feature layer, the select strategy, the aspect mode,
the image-processor settings and the dtype. A changed tower or setting therefore misses, never reuses
stale features. Writes are atomic (temp file + rename), so concurrent ranks and killed runs are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlm.utils.io import write_json_atomic


def default_cache_root() -> Path:
    """``$MEDVLM_CACHE/features`` or ``~/.cache/medvlm/features``."""
    base = os.environ.get("MEDVLM_CACHE")
    return Path(base) / "features" if base else Path.home() / ".cache" / "medvlm" / "features"


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """SHA-256 over the tower's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        data = t.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        h.update(data.numpy().tobytes())
    return h.hexdigest()


def cache_settings(model: Any, processor: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Everything besides the image bytes that decides a feature tensor."""
    cfg = model.config
    return {
        "tower": tower_fingerprint(model.vision_tower),
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_aspect": processor.image_aspect,
        "image_processor": processor.image_processor.to_dict(),
        "dtype": str(dtype),
    }


class FeatureCache:
    """On-disk, memory-mapped store of per-image vision features for one settings key."""

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any]):
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:24]
        self.dir = Path(root) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "settings.json"
        if not meta.exists():
            write_json_atomic(meta, settings)
        self.bf16 = settings.get("dtype") == str(torch.bfloat16)
        self._hash_memo: dict[tuple[str, int, int], str] = {}

    def image_key(self, path: str | os.PathLike) -> str:
        """SHA-256 of the image file's bytes (memoised per path, size and mtime)."""
        st = os.stat(path)
        memo_key = (str(path), st.st_size, st.st_mtime_ns)
        key = self._hash_memo.get(memo_key)
        if key is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            key = h.hexdigest()
            self._hash_memo[memo_key] = key
        return key

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        """Features ``[L, D]`` of one image, or None if not cached."""
        p = self._path(key)
        if not p.is_file():
            return None
        arr = np.load(p, mmap_mode="r")
        t = torch.from_numpy(np.array(arr))  # one copy out of the page cache: [L, D]
        return t.view(torch.bfloat16) if self.bf16 else t

    def get_many(self, keys: list[str]) -> torch.Tensor | None:
        """Features ``[n, L, D]`` of several images, or None if any is missing."""
        out = []
        for k in keys:
            t = self.get(k)
            if t is None:
                return None
            out.append(t)
        return torch.stack(out)  # [n, L, D]

    def put_many(self, keys: list[str], feats: torch.Tensor) -> None:
        """Store ``feats[i]`` (``[n, L, D]``) under ``keys[i]`` (atomic; existing entries are kept)."""
        data = feats.detach().cpu().contiguous()  # [n, L, D]
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        arr = data.numpy()
        for k, row in zip(keys, arr):
            dest = self._path(k)
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{k}.", suffix=".tmp", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, row)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.npy"))

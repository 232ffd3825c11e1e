"""Safetensors checkpoints read and written tensor by tensor, so 7B models convert without 3x RAM.

:class:`SafetensorsCheckpoint` opens a folder holding ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (+ shards); tensors are read one at a time through memory-mapped
``safe_open`` handles. Pickled weights (``pytorch_model*.bin``, ``*.pt``) are refused, never loaded.
:class:`ShardWriter` writes tensors into shards of bounded size, named like transformers does
(``model.safetensors`` when one shard, else ``model-0000i-of-0000n.safetensors`` + index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medvlm.errors import MedvlmError
from medvlm.utils.artifacts import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from medvlm.utils.io import read_json, write_json_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size ("5GB")

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

PICKLE_HELP = (
    "medvlm never unpickles weight files (a pickle can run arbitrary code). Convert them to safetensors "
    "first on a machine you trust, e.g. with transformers: "
    "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)` "
    "(for LLaVA checkpoints, load them with the official LLaVA code and call save_pretrained the same way), "
    "then pass OUT"
)


class SafetensorsCheckpoint:
    """Read-only view of the safetensors weights of a checkpoint folder (single file or sharded)."""

    def __init__(self, folder: str | os.PathLike, what: str = "checkpoint"):
        self.folder = Path(folder)
        self.what = what
        if not self.folder.is_dir():
            raise MedvlmError(f"{what} folder {self.folder} not found")
        index = self.folder / WEIGHTS_INDEX_FILE
        single = self.folder / WEIGHTS_FILE
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise MedvlmError(f"{index}: no 'weight_map' (expected a transformers safetensors index)")
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
            missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise MedvlmError(f"{index} lists shard file(s) that are missing: {', '.join(missing)}")
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.weight_map = {k: WEIGHTS_FILE for k in f.keys()}
        else:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise MedvlmError(
                    f"{what} folder {self.folder} only has pickled weights ({', '.join(pickles)}). " + PICKLE_HELP
                )
            raise MedvlmError(f"{what} folder {self.folder} has no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def files(self) -> list[str]:
        """Shard file names in order of first appearance (sorted)."""
        return sorted(set(self.weight_map.values()))

    def keys_in(self, file: str) -> list[str]:
        """Tensor names stored in one shard file."""
        return sorted(k for k, f in self.weight_map.items() if f == file)

    def _check(self, key: str) -> str:
        if key not in self.weight_map:
            raise MedvlmError(f"{self.what} {self.folder} has no tensor {key!r}")
        return self.weight_map[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor (read from its shard; only this tensor is materialised)."""
        file = self._check(key)
        try:
            return self._handle(file).get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise MedvlmError(f"{self.folder / file}: cannot read tensor {key!r} ({e})") from e

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""
        return tuple(self._handle(self._check(key)).get_slice(key).get_shape())

    def file_metadata(self, file: str) -> dict[str, str]:
        """The ``__metadata__`` dict of one shard file."""
        return dict(self._handle(file).metadata() or {})

    def dtype(self, key: str) -> torch.dtype:
        """Torch dtype of a tensor, read from the header."""
        name = self._handle(self._check(key)).get_slice(key).get_dtype()
        table = {
            "F32": torch.float32,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
            "F64": torch.float64,
            "I64": torch.int64,
            "I32": torch.int32,
            "I8": torch.int8,
            "U8": torch.uint8,
            "BOOL": torch.bool,
        }
        if name not in table:
            raise MedvlmError(f"{self.folder}: tensor {key!r} has unsupported dtype {name}")
        return table[name]

    def main_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (what transformers calls the checkpoint's dtype)."""
        for key in self.keys():
            dt = self.dtype(key)
            if dt.is_floating_point:
                return dt
        return torch.float32


def check_weights_folder(folder: str | os.PathLike, what: str) -> Path:
    """A folder with ``config.json`` and safetensors weights; clear errors otherwise (pickles refused)."""
    p = Path(folder)
    if not p.is_dir():
        raise MedvlmError(f"{what} folder {p} not found")
    if not (p / CONFIG_FILE).is_file():
        raise MedvlmError(f"{what} folder {p} has no config.json")
    SafetensorsCheckpoint(p, what)  # validates weights / refuses pickles
    return p


class ShardWriter:
    """Write tensors into bounded-size safetensors shards plus (when sharded) a transformers index."""

    def __init__(
        self,
        folder: str | os.PathLike,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_meta: dict[str, str] = {}
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self._keys: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor, file_metadata: dict[str, str] | None = None) -> None:
        """Queue one tensor; a full shard is flushed to disk first."""
        if key in self._keys:
            raise MedvlmError(f"tensor {key!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self.flush()
        self._keys.add(key)
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += size
        self._buffer_meta.update(file_metadata or {})
        self.total_bytes += size

    def flush(self) -> None:
        """Write the queued tensors as one shard (no-op when empty)."""
        if not self._buffer:
            return
        name = f".shard-{len(self._written) + 1:05d}.safetensors"
        save_file(self._buffer, str(self.folder / name), metadata={**self.metadata, **self._buffer_meta})
        self._written.append((name, sorted(self._buffer)))
        self._buffer, self._buffer_bytes, self._buffer_meta = {}, 0, {}

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index when sharded; returns the file names."""
        self.flush()
        if not self._written:
            raise MedvlmError("no tensors were written")
        n = len(self._written)
        if n == 1:
            os.replace(self.folder / self._written[0][0], self.folder / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        weight_map: dict[str, str] = {}
        names = []
        for i, (tmp, keys) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        write_json_atomic(
            self.folder / WEIGHTS_INDEX_FILE,
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        return names


def iter_tensors(ckpt: SafetensorsCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor, shard by shard (one tensor in memory at a time)."""
    for file in ckpt.files():
        for key in ckpt.keys_in(file):
            yield key, ckpt.get(key)


def read_config_json(folder: str | os.PathLike, what: str) -> dict:
    """``config.json`` of a folder as a dict (clear errors for missing / malformed files)."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise MedvlmError(f"{what} folder {folder} not found")
    if not path.is_file():
        raise MedvlmError(f"{what} folder {folder} has no config.json")
    data = read_json(path)
    if not isinstance(data, dict):
        raise MedvlmError(f"{path}: expected a JSON object")
    return data


def json_dumps(obj: object) -> str:
    """Compact deterministic JSON (for safetensors metadata values, which must be strings)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))

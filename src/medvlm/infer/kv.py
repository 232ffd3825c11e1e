"""KV-cache rows as plain tensors, and a bounded LRU cache of shared prompt prefixes.

The engine keeps a running batch's cache as one ``[B, H, T, D]`` key and value tensor per layer with
a boolean column mask ``[B, T]``: a row's real tokens may sit anywhere (left padding, and holes
between a reused prefix and its question), every row ends at the last column, and each row carries
its own position counter. Rotary positions are applied before keys are cached, so moving a row's
columns (padding, compacting, cropping) never changes what attention computes over them.

:class:`PrefixCache` keeps compact single-row caches keyed by their token ids and the digests of
the images inside them; a lookup returns the longest usable shared prefix of a new prompt (never
cutting through an image, never reusing an image whose pixels differ).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from medvlm.errors import MedvlmError

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder layer: (keys, values), each ``[B, H, T, D]``."""


def layers_nbytes(layers: Layers) -> int:
    """Bytes held by the key/value tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def layers_len(layers: Layers) -> int:
    """Cached columns (T)."""
    return int(layers[0][0].shape[2]) if layers else 0


def pad_left(layers: Layers, mask: torch.Tensor, n: int) -> tuple[Layers, torch.Tensor]:
    """Prepend ``n`` masked-out columns (zeros) to every row."""
    if n <= 0:
        return layers, mask
    out = []
    for k, v in layers:
        zk = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
        zv = v.new_zeros(v.shape[0], v.shape[1], n, v.shape[3])
        out.append((torch.cat([zk, k], dim=2), torch.cat([zv, v], dim=2)))
    return out, torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)


def concat_rows(parts: list[tuple[Layers, torch.Tensor]]) -> tuple[Layers, torch.Tensor]:
    """Stack batches of rows (each ``(layers, mask)``), left-padding the shorter ones to a common length."""
    parts = [p for p in parts if p[1].shape[0] > 0]
    if len(parts) == 1:
        return parts[0]
    width = max(p[1].shape[1] for p in parts)
    padded = [pad_left(layers, mask, width - mask.shape[1]) for layers, mask in parts]
    n_layers = len(padded[0][0])
    layers = [
        (torch.cat([p[0][i][0] for p in padded], dim=0), torch.cat([p[0][i][1] for p in padded], dim=0))
        for i in range(n_layers)
    ]
    return layers, torch.cat([p[1] for p in padded], dim=0)


def select_rows(layers: Layers, mask: torch.Tensor, index: torch.Tensor) -> tuple[Layers, torch.Tensor]:
    """Keep (or repeat) rows by index, then drop the columns no remaining row uses."""
    layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
    mask = mask.index_select(0, index)
    used = mask.any(dim=0)  # [T]
    if mask.shape[0] and not bool(used.all()):
        cols = used.nonzero().squeeze(1)
        layers = [(k.index_select(2, cols), v.index_select(2, cols)) for k, v in layers]
        mask = mask.index_select(1, cols)
    return layers, mask


def compact_row(layers: Layers, mask: torch.Tensor, row: int) -> Layers:
    """One row's real columns only, as a ``[1, H, n, D]`` cache (copies)."""
    cols = mask[row].nonzero().squeeze(1)
    return [(k[row : row + 1].index_select(2, cols), v[row : row + 1].index_select(2, cols)) for k, v in layers]


def crop(layers: Layers, n: int) -> Layers:
    """The first ``n`` columns (views)."""
    return [(k[:, :, :n], v[:, :, :n]) for k, v in layers]


def image_digest(pixels: torch.Tensor) -> str:
    """A content digest of one preprocessed image ``[3, H, W]`` (what the model actually sees)."""
    data = pixels.detach().to("cpu").contiguous()
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class PrefixEntry:
    """One cached prefix: a compact single-row cache of ``ids``."""

    ids: torch.Tensor
    """LongTensor[n]: the token ids the cache holds."""
    spans: tuple[tuple[int, int], ...]
    """(start, end) token columns of each image block inside ``ids`` (image tokens and im_start/im_end)."""
    digests: tuple[str, ...]
    """Digest of each image in ``spans`` order."""
    layers: Layers
    nbytes: int


@dataclass
class PrefixStats:
    """Counters shown on the servers' ``/health``."""

    hits: int = 0
    """Lookups that reused at least one cached token."""
    misses: int = 0
    """Lookups that found nothing to reuse."""
    hit_tokens: int = 0
    """Prompt tokens served from the cache (not recomputed)."""
    inserts: int = 0
    evictions: int = 0
    rejected: int = 0
    """Entries larger than the whole budget (never stored)."""


def usable_prefix(
    entry_ids: torch.Tensor, entry_spans, entry_digests, ids: torch.Tensor, spans, digests, limit: int
) -> int:
    """How many leading tokens of a prompt (``ids``, image ``spans`` and ``digests``) an entry can supply.

    The longest common token prefix, cut before the first image whose pixels (digest) or placement
    differ, never inside an image block, and at most ``limit``.
    """
    m = min(int(entry_ids.shape[0]), int(ids.shape[0]), limit)
    if m <= 0:
        return 0
    diff = (entry_ids[:m] != ids[:m]).nonzero()
    n = int(diff[0, 0]) if diff.numel() else m
    for k, (start, end) in enumerate(entry_spans):
        if start >= n:
            break
        same = k < len(spans) and spans[k] == (start, end) and digests[k] == entry_digests[k]
        if not same or end > n:  # a different image, or the cut falls inside this image block
            return start
    return n


class PrefixCache:
    """A bounded LRU of prompt-prefix KV caches (token ids + image digests -> keys/values).

    ``budget_bytes`` bounds the keys and values held; inserting evicts least recently used entries
    first, and an entry larger than the whole budget is not stored. Thread-safe.

    Lookups do not scan every entry (a server remembers every finished conversation, thousands of
    entries): entries are indexed by the digest of their first image. An entry whose first image differs
    from the prompt's can only supply text before that image, which is the same for every entry with the
    same text there, so one entry per distinct text head stands for them all. Text-only entries are
    always checked. The result equals a scan of every entry.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise MedvlmError(f"prefix cache budget must be >= 0 bytes (got {budget_bytes})")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self._by_image: dict[str | None, dict[tuple, None]] = {}  # first image digest (None: text only) -> keys
        self._by_head: dict[tuple, dict[tuple, None]] = {}  # text before the first image -> keys (image entries)
        self._lock = threading.Lock()
        self.nbytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _head(e: PrefixEntry) -> tuple:
        return tuple(e.ids[: e.spans[0][0]].tolist())

    def _candidates(self, digests) -> list[tuple]:
        """Keys of the entries that can give the longest usable prefix for a prompt whose images are ``digests``."""
        keys = dict(self._by_image.get(None, {}))
        if digests:
            keys.update(self._by_image.get(digests[0], {}))
        for group in self._by_head.values():  # text before another first image: one entry speaks for its head
            keys.setdefault(next(reversed(group)))
        return list(keys)

    def _add(self, key: tuple, e: PrefixEntry) -> None:
        self._entries[key] = e
        self._by_image.setdefault(e.digests[0] if e.spans else None, {})[key] = None
        if e.spans:
            self._by_head.setdefault(self._head(e), {})[key] = None
        self.nbytes += e.nbytes

    def _remove(self, key: tuple) -> PrefixEntry:
        e = self._entries.pop(key)
        groups = [(self._by_image, e.digests[0] if e.spans else None)]
        if e.spans:
            groups.append((self._by_head, self._head(e)))
        for index, sub in groups:
            del index[sub][key]
            if not index[sub]:
                del index[sub]
        self.nbytes -= e.nbytes
        return e

    def lookup(
        self, ids: torch.Tensor, spans, digests, limit: int, count: bool = True, floor: int = 0
    ) -> tuple[int, Layers | None]:
        """The longest reusable prefix of a prompt: ``(n, layers cropped to n)`` or ``(0, None)``.

        A usable prefix shorter than ``floor`` tokens counts as none (a family that must prefill a prompt's
        images from its start passes the end of its last image).
        """
        best, best_entry, best_key = 0, None, None
        with self._lock:
            for key in self._candidates(digests):
                e = self._entries[key]
                n = usable_prefix(e.ids, e.spans, e.digests, ids, spans, digests, limit)
                if n > best and n >= floor:
                    best, best_entry, best_key = n, e, key
            if best_entry is not None:
                self._entries.move_to_end(best_key)
            if count:
                if best:
                    self.stats.hits += 1
                    self.stats.hit_tokens += best
                else:
                    self.stats.misses += 1
        return (best, crop(best_entry.layers, best)) if best_entry is not None else (0, None)

    def insert(self, ids: torch.Tensor, spans, digests, layers: Layers) -> bool:
        """Store a compact single-row cache of ``ids`` (dropping entries it extends);
        False if it alone exceeds the budget."""
        if layers_len(layers) != int(ids.shape[0]):
            raise MedvlmError(f"prefix cache: {layers_len(layers)} cached columns for {int(ids.shape[0])} tokens")
        nbytes = layers_nbytes(layers)
        key = (tuple(ids.tolist()), tuple(digests))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            if nbytes > self.budget_bytes:
                self.stats.rejected += 1
                return False
            # An entry the new one extends (a chat's previous turn, an image prefix) is redundant: lookups
            # match common prefixes, so the longer entry serves everything it served. Only entries without
            # images or with the same first image can be extended.
            n = int(ids.shape[0])
            same = list(self._by_image.get(None, {})) + (list(self._by_image.get(digests[0], {})) if spans else [])
            for old_key in [
                k
                for k in same
                if int(self._entries[k].ids.shape[0]) <= n
                and usable_prefix(
                    self._entries[k].ids, self._entries[k].spans, self._entries[k].digests, ids, spans, digests, n
                )
                == int(self._entries[k].ids.shape[0])
            ]:
                self._remove(old_key)
            while self._entries and self.nbytes + nbytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))
                self.stats.evictions += 1
            self._add(key, PrefixEntry(ids.clone(), tuple(spans), tuple(digests), layers, nbytes))
            self.stats.inserts += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_image.clear()
            self._by_head.clear()
            self.nbytes = 0

    def info(self) -> dict:
        """Budget, size and counters (JSON-ready)."""
        with self._lock:
            s = self.stats
            return {
                "budget_bytes": self.budget_bytes,
                "bytes": self.nbytes,
                "entries": len(self._entries),
                "hits": s.hits,
                "misses": s.misses,
                "hit_tokens": s.hit_tokens,
                "inserts": s.inserts,
                "evictions": s.evictions,
                "rejected": s.rejected,
            }


class KVBuffer:
    """A running batch's cache in preallocated row slots and columns, with its column mask.

    Keys/values live in ``[rows capacity, H, columns capacity, D]`` tensors per layer and the mask in a
    ``[rows capacity, columns capacity]`` bool tensor; the live rows are slots ``0 .. rows - 1`` and the filled
    columns ``0 .. length - 1`` (every row ends at the last filled column). A decoding step writes its columns
    in place; a joining row is written into the next free slot, right-aligned (:meth:`add_rows`); a leaving
    row's slot is refilled by moving the last live row into it (:meth:`remove_rows`, one row copied, not the
    whole cache); columns no live row uses are dropped when the buffer is full (:meth:`reserve`) or when the
    owner asks (:meth:`compact` with a slack). So the past is never copied at every step or every join/leave.
    """

    def __init__(
        self,
        layers: Layers,
        room: int = 64,
        mask: torch.Tensor | None = None,
        rows: int | None = None,
        max_rows: int | None = None,
    ):
        n = layers_len(layers)
        b = int(layers[0][0].shape[0])
        self.rows = b
        """Live rows (slots ``0 .. rows - 1``)."""
        self.length = n
        """Filled columns."""
        cap_rows = max(rows or b, b)
        self.max_rows = max_rows
        """Row slots are never grown past this many (None: no bound); :meth:`add_rows` doubles up to it."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in layers:
            kb = k.new_zeros(cap_rows, k.shape[1], n + room, k.shape[3])
            vb = v.new_zeros(cap_rows, v.shape[1], n + room, v.shape[3])
            kb[:b, :, :n] = k
            vb[:b, :, :n] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.mask_buf = torch.zeros(cap_rows, n + room, dtype=torch.bool)
        self.mask_buf[:b, :n] = True if mask is None else mask

    @property
    def capacity(self) -> tuple[int, int]:
        """(row slots, columns) allocated."""
        return int(self.mask_buf.shape[0]), int(self.mask_buf.shape[1])

    def layers(self) -> Layers:
        """Views of the live rows' filled columns."""
        return [
            (k[: self.rows, :, : self.length], v[: self.rows, :, : self.length]) for k, v in zip(self.keys, self.values)
        ]

    def mask(self, extra: int = 0) -> torch.Tensor:
        """View of the live rows' column mask over the filled columns plus ``extra`` more."""
        return self.mask_buf[: self.rows, : self.length + extra]

    def view(self, i: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s keys/values of the live rows, columns ``0 .. end - 1`` (views)."""
        return self.keys[i][: self.rows, :, :end], self.values[i][: self.rows, :, :end]

    def append(self, i: int, key: torch.Tensor, value: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` ``[rows, H, n, D]`` of layer ``i`` at column ``start``; returns the filled views."""
        end = start + key.shape[2]
        if end > self.keys[i].shape[2]:  # grow: double the capacity (reserve() normally did it before the step)
            self._realloc(self.capacity[0], max(end, 2 * self.keys[i].shape[2]), only=i)
        self.keys[i][: self.rows, :, start:end] = key
        self.values[i][: self.rows, :, start:end] = value
        return self.view(i, end)

    def _realloc(self, cap_rows: int, cap_cols: int, shift: int = 0, only: int | None = None) -> None:
        """New tensors of this capacity; the filled columns are copied ``shift`` columns to the right."""
        n, r = self.length, self.rows
        for i in range(len(self.keys)) if only is None else (only,):
            for bufs in (self.keys, self.values):
                old = bufs[i]
                new = old.new_zeros(cap_rows, old.shape[1], cap_cols, old.shape[3])
                new[:r, :, shift : shift + n] = old[:r, :, :n]
                bufs[i] = new
        if only is None or self.mask_buf.shape[1] < cap_cols:
            m = torch.zeros(cap_rows, cap_cols, dtype=torch.bool)
            m[:r, shift : shift + n] = self.mask_buf[:r, :n]
            self.mask_buf = m

    def compact(self, slack: float = 0.0) -> None:
        """Drop the filled columns no live row uses (in place, order kept) if more than ``slack`` of them are dead."""
        used = self.mask_buf[: self.rows, : self.length].any(dim=0)
        n = int(used.sum())
        if self.length - n <= slack * self.length:
            return
        cols = used.nonzero().squeeze(1)
        for bufs in (self.keys, self.values):
            for b in bufs:
                b[: self.rows, :, :n] = b[: self.rows].index_select(2, cols)
        self.mask_buf[: self.rows, :n] = self.mask_buf[: self.rows].index_select(1, cols)
        self.length = n

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more columns: drop unused columns first, grow (double) only if still needed.
        The new columns' mask starts False."""
        if self.length + n > self.capacity[1]:
            self.compact()
        if self.length + n > self.capacity[1]:
            self._realloc(self.capacity[0], max(self.length + n, 2 * self.capacity[1]))
        self.mask_buf[: self.rows, self.length : self.length + n] = False

    def add_rows(self, layers: Layers, mask: torch.Tensor) -> None:
        """Put new rows (``[m, H, w, D]`` with their ``[m, w]`` mask) into the next free slots, right-aligned with the
        filled columns (the buffer is shifted right only if ``w`` exceeds its length)."""
        m, w = int(mask.shape[0]), int(mask.shape[1])
        cap_rows, cap_cols = self.capacity
        shift = max(0, w - self.length)
        if self.rows + m > cap_rows or shift:
            if self.rows + m > cap_rows:
                cap_rows = max(self.rows + m, min(2 * cap_rows, self.max_rows or 2 * cap_rows))
            self._realloc(cap_rows, max(cap_cols, self.length + shift + 1), shift=shift)
            self.length += shift
        r, n = self.rows, self.length
        for i, (k, v) in enumerate(layers):
            self.keys[i][r : r + m, :, n - w : n] = k
            self.values[i][r : r + m, :, n - w : n] = v
        self.mask_buf[r : r + m, : n - w] = False
        self.mask_buf[r : r + m, n - w : n] = mask
        self.rows += m

    def remove_rows(self, gone: list[int]) -> list[int]:
        """Free the slots ``gone``: each hole below the new row count is refilled by moving a live row from above it.
        Returns the old slot of each new slot (the caller reorders its per-row state the same way)."""
        gone_set = set(gone)
        keep = [i for i in range(self.rows) if i not in gone_set]
        k = len(keep)
        order = list(range(k))
        movers = [j for j in keep if j >= k]
        for hole, j in zip([i for i in sorted(gone_set) if i < k], movers):
            for bufs in (self.keys, self.values):
                for b in bufs:
                    b[hole, :, : self.length] = b[j, :, : self.length]
            self.mask_buf[hole, : self.length] = self.mask_buf[j, : self.length]
            order[hole] = j
        self.rows = k
        return order

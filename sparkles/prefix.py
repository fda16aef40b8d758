"""The server's prefix cache: KV tensors of prompts already prefilled, so a request that starts the same way (the
same system prompt, images and earlier turns) prefills only what is new.

A bounded LRU keyed by token ids plus each image's full content hash: image tokens share one id, so ids alone would
let two different images match. Stored tensors are never written in place (caches grow by `torch.cat`), so
concurrent requests resuming from one entry never see each other's tokens. The KV tensor helpers the batching
shares live here too; the batching itself does not (engine.py).
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .model.attention import lm_kwargs
from .slab import slab_class


@dataclass(frozen=True)
class Prefix:
    """What a prompt's cache holds: its ids, its images as (start, content hash), and (1, H, L, d) keys and values;
    for a model whose layers read the images (adapters, cross-attention), also the images' (N, K, D) features, which
    the positions after the prefix read."""

    ids: torch.Tensor  # (L,) long, on the CPU
    images: tuple[tuple[int, str], ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    features: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """The memory it holds: each storage its keys and values view counted whole (a slab's room ahead too)."""
        extra = 0 if self.features is None else self.features.nbytes
        return _storage_bytes([t for pair in self.layers for t in pair]) + self.ids.nbytes + extra


class PrefixCache:
    """Longest-prefix lookup over at most `capacity` bytes of KV tensors; the least recently used entries go first."""

    def __init__(self, capacity: int, tokens_per_image: int):
        self.capacity, self.tokens_per_image = capacity, tokens_per_image
        self._entries: collections.OrderedDict[int, Prefix] = collections.OrderedDict()
        self._next = 0
        self.counts = collections.Counter()  # hits, misses, tokens_reused, stored, evicted

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "capacity_bytes": self.capacity,
                **{k: self.counts[k] for k in ("hits", "misses", "tokens_reused", "stored", "evicted")}}

    def lookup(self, ids: list[int], images: list[tuple[int, str]]) -> tuple[int, Prefix | None]:
        """How many leading positions of a prompt some entry holds (never all: the last one must run), and which."""
        best, found = 0, None
        if self.capacity <= 0:  # off
            return 0, None
        if self._entries:
            query = torch.tensor(ids[:-1], dtype=torch.long)
            for key, entry in self._entries.items():
                n = self._common(entry, query, images)
                if n > best:
                    best, found = n, key
        if found is None:
            self.counts["misses"] += 1
            return 0, None
        self._entries.move_to_end(found)
        self.counts.update(hits=1, tokens_reused=best)
        return best, self._entries[found]

    def store(self, ids: list[int], images: list[tuple[int, str]], layers, features=None) -> None:
        """Keep a prompt's cache: `layers` are (1, H, L, d) keys and values. Tensors that fill most of their storage
        (a prompt prefilled alone: its slab, with some room ahead) are kept as they are, since nothing writes into
        the positions they view; a row of a batch is copied, so that the batch's memory is freed with the batch."""
        if self.capacity <= 0:
            return
        entry = Prefix(torch.tensor(ids, dtype=torch.long), tuple(images), tuple(_own(k, v) for k, v in layers),
                       None if features is None else features.detach())
        if entry.nbytes > self.capacity:
            return
        # An entry this one extends is of no more use: every lookup it would win, this one wins too.
        for key in [k for k, e in self._entries.items() if self._common(e, entry.ids, images) == len(e.ids)]:
            del self._entries[key]
        self._entries[self._next] = entry
        self._next += 1
        self.counts["stored"] += 1
        total = self.nbytes
        while total > self.capacity:
            _, gone = self._entries.popitem(last=False)
            total -= gone.nbytes
            self.counts["evicted"] += 1

    def store_rows(self, rows: list[tuple], layers) -> None:
        """Keep rows (index, ids, images, features or None) of a left-padded batch's cache layers: a row's ids are its
        last positions."""
        for i, ids, images, features in rows if self.capacity > 0 else ():
            n = len(ids)
            self.store(ids, images, [(x.keys[i:i + 1, :, -n:], x.values[i:i + 1, :, -n:]) for x in layers], features)

    def _common(self, entry: Prefix, query: torch.Tensor, images: list[tuple[int, str]]) -> int:
        """Leading positions shared with `entry`, cut before the first image that differs or is cut in two."""
        n = min(len(entry.ids), len(query))
        differ = (entry.ids[:n] != query[:n]).nonzero()
        n = int(differ[0]) if len(differ) else n
        held = dict(entry.images)
        for start, key in images:
            if start < n and (held.get(start) != key or start + self.tokens_per_image > n):
                return start
        return n


def _own(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys` and `values` themselves where they fill at least half of the storage they hold (theirs alone, or one
    slab's), else copies of them alone: a row of a batch, or a short prompt in a roomy buffer, would keep far more
    memory than it counts."""
    if 2 * (keys.nbytes + values.nbytes) >= _storage_bytes([keys, values]):
        return keys.detach(), values.detach()
    return keys.detach().clone(), values.detach().clone()


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages the tensors view, each counted whole."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def image_keys(encoded) -> list[tuple[int, str]]:
    """(start, full content hash) of each image slot of an encoded prompt; slots without a loader's hash are hashed
    from their transformed pixels."""
    keys = []
    for i, (start, sha) in enumerate(zip(encoded.rendered.image_starts, encoded.image_hashes)):
        if sha is None or len(sha) != 64:
            sha = hashlib.sha256(encoded.pixel_values[i].float().cpu().contiguous().numpy().tobytes()).hexdigest()
        keys.append((start, sha))
    return keys


def plain_layer(layer) -> bool:
    """Whether a cache layer keeps every position (a sliding-window one forgets the start): only those can be padded,
    cut or kept."""
    from transformers.cache_utils import DynamicLayer

    return type(layer) in (DynamicLayer, slab_class())


def pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before the entries of `dim` up to `width` (left padding): (B, H, L, d) KV tensors by default."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def kinds_mask(model, ids: list[int], device) -> torch.Tensor:
    """(1, T) long batch mask of a prompt: 1 at every position, but 2 at image positions under MMCA, so that the
    left padding, merging and dropping of rows carry where the images are along with which positions are real."""
    image = model.image_positions(torch.tensor([ids], device=device))
    return torch.ones(1, len(ids), dtype=torch.long, device=device) if image is None else 1 + image.long()


def lm_masks(model, mask: torch.Tensor) -> dict:
    """The LM forward's masks from a (B, L) batch mask of `kinds_mask` rows and generated tokens (1s: text)."""
    image = None if model.config.attention == "causal" else mask == 2
    return {"attention_mask": mask.clamp(max=1), **lm_kwargs(image)}


def check_engine(model, config) -> None:
    """ConfigError for an engine `config` out of range."""
    if config.max_batch < 1 or config.max_queue < 0 or config.lookahead < 0:
        raise ConfigError(f"max_batch must be >= 1, max_queue and lookahead >= 0, got {config}")

"""Batches for training: a dataset that renders samples with the shared processor, a deterministic blend of
sources by ratio, length estimates for grouping, truncation that never cuts an image, collation with padding (or
packing) and labels -100.

Reading files lives in `records.py`; the loop in `train.py`. The blend is a pure function of (seed, position), so
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..conversation import Conversation, Text
from ..errors import InputError
from ..image import load_images
from ..processor import IGNORE, Processor, Rendered
from .records import Sample


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be used (an unreadable image, nothing left to learn after truncation)."""

    origin: str
    reason: str


@dataclass
class Item:
    rendered: Rendered
    pixel_values: torch.Tensor | None  # (N, 3, H, W)
    origin: str = ""  # "file.json#12", so that a batch that breaks the loss can be traced to its samples


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), or (B, 1, T, T) block-diagonal when packed
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (N, 3, H, W): every image of the batch, in row order
    position_ids: torch.Tensor | None = None  # (B, T) when packed: positions restart with each sample
    skipped: list[Skipped] = field(default_factory=list)
    tokens: int = 0  # real (non-padding) tokens, for throughput
    samples: int = 0  # samples in the batch (a packed row holds several)
    origins: list[str] = field(default_factory=list)  # where each kept sample came from, in row order

    def to(self, device) -> Batch:
        move = lambda t: t.to(device) if t is not None else None
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.pixel_values),
                     move(self.position_ids), self.skipped, self.tokens, self.samples, self.origins)


def truncate(rendered: Rendered, max_len: int, tokens_per_image: int,
             span: Callable[[int], int] | None = None) -> Rendered | None:
    """Cut to `max_len` tokens; a cut inside an image moves before it. None when no supervised token is left.

    `span(start)` is how many positions the image starting there takes, where that is not `tokens_per_image`
    (tiles: a global view and its tiles, an empty tile one skip token)."""
    if len(rendered) <= max_len:
        return rendered
    cut = max_len
    for start in rendered.image_starts:
        if start < cut < start + (span(start) if span else tokens_per_image):
            cut = start
    labels = rendered.labels[:cut]
    if all(label == IGNORE for label in labels):
        return None
    return Rendered(rendered.input_ids[:cut], labels, [s for s in rendered.image_starts if s < cut])


class TrainDataset(torch.utils.data.Dataset):
    """Index by (source, index); returns an `Item`, or a `Skipped` that the loop counts and reports."""

    def __init__(self, sources: Sequence[Sequence[Sample]], processor: Processor, *, max_len: int):
        self.sources, self.processor, self.max_len = sources, processor, max_len

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: tuple[int, int]) -> Item | Skipped:
        sample = self.sources[key[0]][key[1]]
        try:
            conversation = load_images(sample.conversation)
            rendered = self.processor.render(conversation, loss_on=sample.loss_on, check_length=False)
        except InputError as e:  # an image that went missing or broke since the records were read
            return Skipped(sample.origin, str(e))
        kept = truncate(rendered, self.max_len, self.processor.config.tokens_per_image,
                        lambda start: self.processor.image_span(rendered.input_ids, start)[0])
        if kept is None:
            return Skipped(sample.origin, f"no answer token left after truncation to {self.max_len} tokens")
        slots = conversation.slots[:len(kept.image_starts)]
        return Item(kept, self.processor.pixel_values(slots), sample.origin)

    def length(self, key: tuple[int, int]) -> int:
        """The exact (rendered) length without loading pixels: the reference `LengthEstimate` is measured against;
        too slow for grouping, which would render every sample in the main process."""
        sample = self.sources[key[0]][key[1]]
        return min(len(self.processor.render(sample.conversation, loss_on=sample.loss_on, check_length=False)),
                   self.max_len)


class LengthEstimate:
    """Token lengths for length grouping, guessed from what a sample already holds instead of rendering it.

    The sampler runs in the main process: rendering every sample there to learn its length capped a GPU run at
    ~570 samples/s whatever the number of workers. Instead a few samples per source are rendered once, a
    least-squares fit maps (text characters, image slots, messages, 1) to tokens, and a key costs a few additions.
    Grouping only sorts by length, so an estimate in the same order as the real lengths gives the same batches.

    A source that is not a list makes its samples on the fly (indexing `world:caption` draws the images), so it is
    not indexed per key: it may offer `size_hint(i) -> (characters, images, messages)`; without one, each of its
    samples takes the source's mean length, which still keeps sources of different lengths apart.
    """

    def __init__(self, sources: Sequence[Sequence[Sample]], processor: Processor, *, max_len: int,
                 calibrate: int = 32):
        self.sources, self.max_len, self.means = sources, max_len, []
        rows, lengths = [], []
        for source in sources:
            measured = []
            for i in sorted({k * len(source) // calibrate for k in range(calibrate)}):
                sample = source[i]
                try:
                    n = len(processor.render(sample.conversation, loss_on=sample.loss_on, check_length=False))
                except InputError:
                    continue  # the dataset skips it too
                rows.append(features(sample.conversation))
                lengths.append(n)
                measured.append(n)
            self.means.append(min(round(sum(measured) / len(measured)), max_len) if measured else max_len)
        fit = np.linalg.lstsq(np.array(rows, float), np.array(lengths, float), rcond=None)[0] if rows else [0.0] * 4
        # Rounded, so that every process sorts by the same numbers even where the BLAS differs in the last bits.
        self.weights = tuple(round(float(w), 4) for w in fit)

    def __call__(self, key: tuple[int, int]) -> int:
        source = self.sources[key[0]]
        if isinstance(source, list):
            size = features(source[key[1]].conversation)
        elif hasattr(source, "size_hint"):
            size = (*source.size_hint(key[1]), 1)
        else:
            return self.means[key[0]]
        return max(1, min(round(sum(w * x for w, x in zip(self.weights, size))), self.max_len))


def features(conversation: Conversation) -> tuple[int, int, int, int]:
    """What a rendering's length follows: characters of text, image slots, messages, and a constant (the template's
    system prompt and BOS)."""
    chars = images = 0
    for message in conversation.messages:
        for part in message.parts:
            if isinstance(part, Text):
                chars += len(part.text)
            else:
                images += 1
    return chars, images, len(conversation.messages), 1


class BlendSampler:
    """An endless, deterministic stream of this rank's batches of (source, index) keys.

    Each global batch draws its samples' sources with probability proportional to `ratios` (the original's
    sample_ratio) and walks each source in a fresh seeded permutation per epoch. Rank r takes slice r of each
    global batch, so the stream does not depend on the world size. With `lengths`, every `group` global batches
    are sorted by length before being cut, so padding stays small; the order of the batches is shuffled again.
    """

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, lengths=None, group: int = 16, start: int = 0):
        if any(n == 0 for n in sizes):
            raise InputError(f"a training source has no usable samples (sizes {list(sizes)})")
        self.sizes, self.ratios, self.batch_size, self.seed = list(sizes), list(ratios), batch_size, seed
        self.rank, self.world_size, self.lengths, self.group = rank, world_size, lengths, group
        self.position = start  # global batches handed out so far: the data position saved in checkpoints

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = self._global_batches()
        for _ in range(self.position):
            next(stream)  # replaying the draws is cheap next to reading a single image
        lo = self.rank * self.batch_size
        for batch in stream:
            self.position += 1
            yield batch[lo:lo + self.batch_size]

    def _global_batches(self) -> Iterator[list[tuple[int, int]]]:
        rng = random.Random(self.seed)
        size = self.batch_size * self.world_size
        counters, perms = [0] * len(self.sizes), {}
        while True:
            chunk = []
            for _ in range(size * (self.group if self.lengths else 1)):
                s = rng.choices(range(len(self.sizes)), weights=self.ratios)[0]
                epoch, pos = divmod(counters[s], self.sizes[s])
                if perms.get(s, (None,))[0] != epoch:
                    perms[s] = (epoch, permutation(self.sizes[s], f"{self.seed}/{s}/{epoch}"))
                counters[s] += 1
                chunk.append((s, perms[s][1](pos)))
            batches = [chunk[i:i + size] for i in range(0, len(chunk), size)]
            if self.lengths:
                chunk.sort(key=self.lengths)
                batches = [chunk[i:i + size] for i in range(0, len(chunk), size)]
                rng.shuffle(batches)
            yield from batches


def permutation(size: int, seed: str, *, listed: int = 1_000_000):
    """A seeded bijection of range(size), as a function of the position.

    Up to `listed` elements it is a shuffled list; past that (endless generated sources) an affine map
    i -> (a*i + b) mod size with a coprime to size, so that nothing of the source's size is ever materialised.
    """
    rng = random.Random(seed)
    if size <= listed:
        order = list(range(size))
        rng.shuffle(order)
        return order.__getitem__
    a = rng.randrange(1, size)
    while math.gcd(a, size) != 1:
        a = rng.randrange(1, size)
    b = rng.randrange(size)
    return lambda i: (a * i + b) % size


def collate(items: Sequence[Item | Skipped], pad_id: int) -> Batch:
    """Right-pad to the longest row: attention mask 0 and labels -100 on padding; images concatenated in order."""
    kept = [i for i in items if isinstance(i, Item)]
    skipped = [i for i in items if isinstance(i, Skipped)]
    width = max((len(i.rendered) for i in kept), default=1)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, item in enumerate(kept):
        n = len(item.rendered)
        ids[row, :n] = torch.tensor(item.rendered.input_ids)
        labels[row, :n] = torch.tensor(item.rendered.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, _pixels(kept), skipped=skipped, tokens=int(mask.sum()), samples=len(kept),
                 origins=[i.origin for i in kept])


def collate_packed(items: Sequence[Item | Skipped], pad_id: int, *, max_len: int) -> Batch:
    """Pack samples end to end into rows of at most `max_len` tokens, first fit in the given order.

    Each sample attends only to itself (a block-diagonal causal mask) and its positions start at 0, so a packed
    batch computes the same per-token losses as a padded one, with far less padding.
    """
    kept = [i for i in items if isinstance(i, Item)]
    rows: list[list[Item]] = []
    for item in kept:
        for row in rows:
            if sum(len(i.rendered) for i in row) + len(item.rendered) <= max_len:
                row.append(item)
                break
        else:
            rows.append([item])
    width = max((sum(len(i.rendered) for i in row) for row in rows), default=1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for item in row:
            n = len(item.rendered)
            ids[r, at:at + n] = torch.tensor(item.rendered.input_ids)
            labels[r, at:at + n] = torch.tensor(item.rendered.labels)
            positions[r, at:at + n] = torch.arange(n)
            allowed[r, 0, at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
    # Padding rows attend to themselves only, so no softmax runs over an empty set.
    allowed |= torch.eye(width, dtype=torch.bool)
    ordered = [item for row in rows for item in row]
    skipped = [i for i in items if isinstance(i, Skipped)]
    return Batch(ids, allowed, labels, _pixels(ordered), positions, skipped, sum(len(i.rendered) for i in ordered),
                 len(ordered), [i.origin for i in ordered])


def _pixels(items: Sequence[Item]) -> torch.Tensor | None:
    tensors = [i.pixel_values for i in items if i.pixel_values is not None]
    return torch.cat(tensors) if tensors else None

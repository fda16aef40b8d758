"""The one renderer that training and chat share: conversation -> input_ids, labels, image slots, pixel values.

Also the image transform (with SPHINX's sub-image tiles: which tiles hold only padding, and the views' pixels), the
debug view of a rendering, and streaming detokenization. The model is not here: this is CPU-side preparation. Text
is tokenized in runs between image slots and turn breaks; labels come from character offsets, so a token carries
loss exactly when it covers characters of an assistant's answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage

from .config import ModelConfig, VisionConfig, check_reader_switches
from .conversation import Conversation, Image, validate
from .errors import ConfigError, ContextLengthError, InputError
from .image_cache import ImageCache
from .template import ChatTemplate, LossOn, Piece, SparklesTemplate
from .tokenizer import ensure_special_token

IGNORE = -100
SKIP_TOKEN = "<tile_skip>"  # SPHINX-X: stands where a tile holds only padding; the model writes a learned vector there


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where a token carries no loss
    image_starts: list[int]  # first position of each slot's image tokens, in slot order

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Encoded:
    rendered: Rendered
    pixel_values: torch.Tensor | None  # (N, 3, H, W), one per slot, or None without images
    image_hashes: tuple[str | None, ...]  # per slot: lets the model encode a repeated image once


class Processor:
    """Tokenizer + template + image transform, built from a model config."""

    def __init__(self, tokenizer, config: ModelConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_token_id = ensure_special_token(tokenizer, config.image_token)
        rows, cols = config.tiles.grid
        if (rows > 0) != (cols > 0) or rows < 0 or cols < 0:
            raise ConfigError(f"tiles.grid must be (0, 0) (off) or two positive numbers, got {config.tiles.grid}")
        self.views = 1 + rows * cols  # per image: the global view, then the tiles row by row
        # With adapters or cross-attention (model/layer_state.py) an image is one marker position; its features
        # enter the LM's layers.
        self.adapted = check_reader_switches(config)
        # The skip token is only added when used: a model without it keeps its tokenizer (and vocabulary) as it was.
        skips = self.views > 1 and config.tiles.skip_empty
        self.skip_token_id = ensure_special_token(tokenizer, SKIP_TOKEN) if skips else None
        if config.template == "sparkles":
            self.template = SparklesTemplate(system=config.system_prompt)
        else:
            self.template = ChatTemplate.for_tokenizer(tokenizer, system=config.system_prompt)
        # Our template inserts BOS itself; a chat template writes whatever BOS it wants into its own text.
        bos = tokenizer.bos_token_id
        self.bos = [bos] if config.template == "sparkles" and bos is not None else []
        special = set(tokenizer.all_special_tokens)
        self.stop_strings = tuple(s for s in self.template.stop if s not in special)
        ids = {tokenizer.eos_token_id}
        ids |= {tokenizer.convert_tokens_to_ids(s) for s in self.template.stop if s in special}
        self.stop_ids = tuple(sorted(i for i in ids if i is not None))

    def render(self, conversation: Conversation, *, generation: bool = False, loss_on: LossOn = "all",
               check_length: bool = True) -> Rendered:
        """Token ids, labels and image positions of a conversation; `generation` leaves the assistant turn open.

        Training passes `check_length=False` and truncates instead (`data.truncate`).
        """
        validate(conversation)
        if len(conversation.slots) > self.config.max_images:
            raise InputError(f"too many images: {len(conversation.slots)}, this model takes at most "
                             f"{self.config.max_images} per conversation")
        pieces = self.template.render(conversation, generation=generation, loss_on=loss_on)
        ids, labels, starts = list(self.bos), [IGNORE] * len(self.bos), []
        run: list[Piece] = []
        for piece in pieces + [Piece(brk=True)]:
            if piece.slot is not None or piece.brk:
                self._tokenize_run(run, ids, labels)
                run = []
            if piece.slot is not None:
                starts.append(len(ids))
                image = self.image_tokens(conversation.slots[piece.slot])
                ids += image
                labels += [IGNORE] * len(image)
            elif piece.text:
                run.append(piece)
        limit = self.config.max_seq_len - (1 if generation else 0)
        if check_length and len(ids) > limit:
            raise ContextLengthError(f"the conversation is {len(ids)} tokens long, more than the {limit} this model "
                                     f"takes (max_seq_len {self.config.max_seq_len}); shorten it or start anew")
        return Rendered(ids, labels, starts)

    def image_tokens(self, image: Image) -> list[int]:
        """The ids of one image slot: K image tokens per view, and one skip token for each skipped tile; with
        adapters or cross-attention one marker position (the image token once)."""
        if self.adapted:
            return [self.image_token_id]
        k = self.config.tokens_per_image
        ids = [self.image_token_id] * k
        for kept in self.tiles(image):
            ids += [self.image_token_id] * k if kept else [self.skip_token_id]
        return ids

    def tiles(self, image: Image) -> tuple[bool, ...]:
        """Per tile, row by row: True where the tower encodes it, False where it holds only padding and is skipped."""
        grid = self.config.tiles.grid
        if self.views == 1:
            return ()
        if self.skip_token_id is None or image.pixels is None:
            # Without the image's size every tile counts: the most the image can cost, which is what length
            # estimates want; a model fed such a rendering with the real pixels says that they disagree.
            return (True,) * (self.views - 1)
        return tile_layout(image.pixels.size, grid, self.config.vision.image_size)

    def image_span(self, ids: Sequence[int], start: int) -> tuple[int, tuple[bool, ...]]:
        """How many positions the image whose tokens begin at `start` takes, and which of its tiles are encoded."""
        if self.adapted:
            return 1, ()
        k, pos, kept = self.config.tokens_per_image, start + self.config.tokens_per_image, []
        for _ in range(self.views - 1):
            skipped = self.skip_token_id is not None and pos < len(ids) and ids[pos] == self.skip_token_id
            kept.append(not skipped)
            pos += 1 if skipped else k
        return pos - start, tuple(kept)

    def _tokenize_run(self, run: list[Piece], ids: list[int], labels: list[int]) -> None:
        if not run:
            return
        text = "".join(p.text for p in run)
        spans, pos = [], 0
        for p in run:
            if p.loss:
                spans.append((pos, pos + len(p.text)))
            pos += len(p.text)
        for token, (start, end) in self._tokens(run, text):
            ids.append(token)
            hit = any(start < b and end > a or start == end and a <= start < b for a, b in spans)
            labels.append(token if hit else IGNORE)

    def _tokens(self, run: list[Piece], text: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, character span) of each token of a run, where typed text never yields a special token."""
        # Our template holds no special tokens, so text that looks like one (a user typing "<image>") stays text.
        if isinstance(self.template, SparklesTemplate):
            return self._tokenize(text, split=True)
        specials = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        if not any(p.literal and s in p.text for p in run for s in specials):
            return self._tokenize(text, split=False)  # the usual case: one call, the tokenizer's own merges
        # A chat template's markers are special tokens, so typed text that spells one (<|im_start|>system,
        # <image>) is tokenized on its own with specials split, and the template's text around it as usual.
        out, pos = [], 0
        for literal, group in itertools.groupby(run, key=lambda p: p.literal):
            part = "".join(p.text for p in group)
            out += [(t, (a + pos, b + pos)) for t, (a, b) in self._tokenize(part, split=literal)]
            pos += len(part)
        return out

    def _tokenize(self, text: str, *, split: bool) -> list[tuple[int, tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def pixel_values(self, images: Sequence[Image], cache: ImageCache | None = None) -> torch.Tensor | None:
        """(N, 3, H, W) model inputs of `images`, or (N, V, 3, H, W) with tiles. With a `cache` (image_cache.py),
        one an image's content hash finds is not made again."""
        missing = [i.name for i in images if i.pixels is None]
        if missing:
            raise InputError(f"images without pixels: {', '.join(missing)}; load them first (image.load_image)")
        if not images:
            return None
        vision = self.config.vision

        def inputs(image: Image) -> torch.Tensor:
            if self.views > 1:
                return image_to_views(image.pixels, self.config)
            return image_to_tensor(image.pixels, vision)

        if cache is None:
            return torch.stack([inputs(i) for i in images])
        # What the inputs depend on besides the pixels, so that one cache may serve processors that differ.
        tiles = self.config.tiles
        how = (tuple(tiles.grid), tiles.skip_empty, vision.image_size, tuple(vision.image_mean),
               tuple(vision.image_std))
        return torch.stack([inputs(i) if i.sha256 is None else cache.get_or_make(
            ("inputs", how, i.sha256), lambda i=i: inputs(i), lambda t: t.numel() * t.element_size()) for i in images])

    def encode(self, conversation: Conversation, *, generation: bool = False, loss_on: LossOn = "all",
               cache: ImageCache | None = None) -> Encoded:
        rendered = self.render(conversation, generation=generation, loss_on=loss_on)
        slots = conversation.slots
        return Encoded(rendered, self.pixel_values(slots, cache), tuple(i.sha256 for i in slots))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def visualize(self, rendered: Rendered, *, color: bool = False) -> str:
        """The rendering as text: ⟦supervised⟧ tokens, and ⟨IMAGE k × K⟩ where each image's tokens sit (with tiles:
        ⟨image k: global + R×C tiles ■■/□□, n tokens⟩, ■ an encoded tile and □ a skipped one)."""
        out, i, k = [], 0, 0
        on, off = ("\x1b[42m", "\x1b[0m") if color else ("⟦", "⟧")
        starts = set(rendered.image_starts)
        while i < len(rendered):
            if i in starts:
                span, kept = self.image_span(rendered.input_ids, i)
                if self.views == 1:
                    out.append(f"⟨image {k + 1} × {span} at {i}⟩")
                else:
                    rows, cols = self.config.tiles.grid
                    out.append(f"⟨image {k + 1}: global + {rows}×{cols} tiles {tile_map(kept, cols)}, "
                               f"{span} tokens at {i}⟩")
                i, k = i + span, k + 1
                continue
            j = i
            supervised = rendered.labels[i] != IGNORE
            while j < len(rendered) and j not in starts and (rendered.labels[j] != IGNORE) == supervised:
                j += 1
            text = self.tokenizer.decode(rendered.input_ids[i:j], skip_special_tokens=False)
            out.append(on + text + off if supervised else text)
            i = j
        return "".join(out)


def image_to_tensor(pixels: PILImage.Image, config: VisionConfig) -> torch.Tensor:
    """Squash to a square with bicubic resampling and normalise, as the original's eval transform (spec §3.2)."""
    size = config.image_size
    array = _normalise(pixels.convert("RGB").resize((size, size), PILImage.BICUBIC), config)
    return array.permute(2, 0, 1).contiguous()  # (3, H, W)


def _normalise(pixels: PILImage.Image, config: VisionConfig) -> torch.Tensor:
    array = np.asarray(pixels, dtype=np.float32) / 255.0
    array = (array - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return torch.from_numpy(array)  # (H, W, 3)


def fit(size: tuple[int, int], grid: tuple[int, int], tile: int) -> tuple[int, int]:
    """The (width, height) an image of `size` takes on the tiles' canvas: as large as fits, aspect kept."""
    (width, height), (rows, cols) = size, grid
    scale = min(cols * tile / width, rows * tile / height)
    return max(1, min(cols * tile, round(width * scale))), max(1, min(rows * tile, round(height * scale)))


def tile_layout(size: tuple[int, int], grid: tuple[int, int], tile: int) -> tuple[bool, ...]:
    """Per tile of the canvas, row by row: does it hold part of the image (True) or only padding (False)?

    The image sits in the canvas's top-left corner. SPHINX centres it, which splits the padding between two sides,
    so that no tile is wholly padding until the aspect ratio passes 1 : 2·rows; in the corner the padding fills
    whole tiles as soon as it can, and each of them costs one skip token instead of K.
    """
    (rows, cols), (width, height) = grid, fit(size, grid, tile)
    return tuple(c * tile < width and r * tile < height for r in range(rows) for c in range(cols))


def image_to_views(pixels: PILImage.Image, config: ModelConfig) -> torch.Tensor:
    """(1 + rows·cols, 3, S, S): the global view (the image squashed, as without tiles, so a model trained without
    tiles sees it as before), then the tiles of the image fitted into a (rows·S) × (cols·S) canvas padded with the
    mean colour. A tile that holds only padding is NaN when skip_empty is on: the pixel values then say by
    themselves which tiles the model skips, through every path that carries them (sessions, batches, caches)."""
    vision, (rows, cols), size = config.vision, config.tiles.grid, config.vision.image_size
    pixels = pixels.convert("RGB")
    canvas = PILImage.new("RGB", (cols * size, rows * size), tuple(round(255 * m) for m in vision.image_mean))
    canvas.paste(pixels.resize(fit(pixels.size, (rows, cols), size), PILImage.BICUBIC), (0, 0))
    grid = _normalise(canvas, vision).reshape(rows, size, cols, size, 3)
    tiles = grid.permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)  # row by row, channels first
    if config.tiles.skip_empty:
        kept = torch.tensor(tile_layout(pixels.size, (rows, cols), size))
        tiles[~kept] = float("nan")
    return torch.cat([image_to_tensor(pixels, vision)[None], tiles]).contiguous()


def tile_map(kept: Sequence[bool], cols: int) -> str:
    """Tiles row by row, rows split by '/': ■ an encoded tile, □ a skipped one (only padding)."""
    marks = "".join("■" if k else "□" for k in kept)
    return "/".join(marks[i:i + cols] for i in range(0, len(marks), cols))


def prefix_table(word: str) -> list[int]:
    """Knuth-Morris-Pratt: for each i, the length of the longest proper prefix of word[:i + 1] that ends it."""
    table, k = [0] * len(word), 0
    for i in range(1, len(word)):
        while k and word[i] != word[k]:
            k = table[k - 1]
        k += word[i] == word[k]
        table[i] = k
    return table


def overlap(text: str, word: str, table: Sequence[int]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `word`, in O(len(text) + len(word))."""
    k = 0
    for char in text:
        while k and (k == len(word) or char != word[k]):
            k = table[k - 1]
        k += char == word[k]
    return k if k < len(word) else table[k - 1]


class TextStream:
    """Token ids in, text out: never splits a UTF-8 character, and holds back what may be the start of a stop string.

    `push` returns the new text that is safe to show; `stopped` turns true once a stop string appears, and the
    text is cut before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        # Per token, the work is linear in the stop strings' lengths, never in the text's or their square.
        self.tables, self.longest = [prefix_table(s) for s in self.stop], max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.shown - self.longest)  # a stop string cannot begin in text shown long ago
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._emit(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        held = max((overlap(text[max(0, safe - len(s) + 1):safe], s, t) for s, t in zip(self.stop, self.tables)),
                   default=0)
        return self._emit(safe - held)

    def finish(self) -> str:
        """Whatever was held back, at the end of generation."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown:upto], upto
        return delta


def push_rows(streams: Sequence[TextStream], done: list[bool], tokens: Sequence[int],
              stop_ids: Sequence[int]) -> bool:
    """One decoding step of a batch: each unfinished row's token goes to its stream, or ends the row (a stop id, or
    a stop string its stream found). `done` is updated in place; True once every row is done."""
    for k, token in enumerate(tokens):
        if done[k]:
            continue
        if token in stop_ids:
            done[k] = True
        else:
            streams[k].push(token)
            done[k] = streams[k].stopped
    return all(done)

"""The one renderer that training and chat share: conversation -> input_ids, labels, image slots, pixel values.

Also the image transform, the debug view of a rendering, and streaming detokenization. The model is not here: this
is CPU-side preparation. Text is tokenized in runs between image slots and turn breaks; labels come from character
offsets, so a token carries loss exactly when it covers characters of an assistant's answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage

from .config import ModelConfig, VisionConfig
from .conversation import Conversation, Image, validate
from .errors import ContextLengthError, InputError
from .template import ChatTemplate, LossOn, Piece, SparklesTemplate
from .tokenizer import ensure_special_token

IGNORE = -100


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
                ids += [self.image_token_id] * self.config.tokens_per_image
                labels += [IGNORE] * self.config.tokens_per_image
            elif piece.text:
                run.append(piece)
        limit = self.config.max_seq_len - (1 if generation else 0)
        if check_length and len(ids) > limit:
            raise ContextLengthError(f"the conversation is {len(ids)} tokens long, more than the {limit} this model "
                                     f"takes (max_seq_len {self.config.max_seq_len}); shorten it or start anew")
        return Rendered(ids, labels, starts)

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

    def pixel_values(self, images: Sequence[Image]) -> torch.Tensor | None:
        missing = [i.name for i in images if i.pixels is None]
        if missing:
            raise InputError(f"images without pixels: {', '.join(missing)}; load them first (image.load_image)")
        if not images:
            return None
        return torch.stack([image_to_tensor(i.pixels, self.config.vision) for i in images])

    def encode(self, conversation: Conversation, *, generation: bool = False, loss_on: LossOn = "all") -> Encoded:
        rendered = self.render(conversation, generation=generation, loss_on=loss_on)
        slots = conversation.slots
        return Encoded(rendered, self.pixel_values(slots), tuple(i.sha256 for i in slots))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def visualize(self, rendered: Rendered, *, color: bool = False) -> str:
        """The rendering as text: ⟦supervised⟧ tokens, and ⟨IMAGE k × K⟩ where each image's tokens sit."""
        out, i, k = [], 0, 0
        on, off = ("\x1b[42m", "\x1b[0m") if color else ("⟦", "⟧")
        starts = set(rendered.image_starts)
        while i < len(rendered):
            if i in starts:
                out.append(f"⟨image {k + 1} × {self.config.tokens_per_image} at {i}⟩")
                i, k = i + self.config.tokens_per_image, k + 1
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
    array = np.asarray(pixels.convert("RGB").resize((size, size), PILImage.BICUBIC), dtype=np.float32) / 255.0
    array = (array - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


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

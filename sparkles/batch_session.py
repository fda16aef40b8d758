"""Batched turns that never redo work: `BatchSession.answer_batch` answers a batch of conversations and keeps the
batch's KV cache, so that the next batch — the same conversations one turn on, as `sparkles eval` asks turn k+1
after turn k — prefills only what is new in each.

Each new conversation resumes from the held row that shares the longest start with it (token ids and images alike):
the positions past the shared start, and the padding, are masked out, and only the rest of the prompt is embedded
(its new images encoded) and fed, left-padded into one chunk. Positions come from the mask's running count, so a
resumed row sees exactly what a fresh prefill of it would. Causal attention only: under MMCA, or with adapters or
cross-attention (model.adapter, model.cross_attention), every batch is answered afresh, as `Chat.answer_batch` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .config import SamplingParams
from .conversation import Conversation
from .errors import ContextLengthError
from .generate import Chat, KVCache, generate
from .processor import TextStream, push_rows
from .session import common_prefix

PAD = -1  # the id recorded for a position that holds nothing (padding, or a position given up)


class BatchSession:
    """`Chat.answer_batch`, plus the batch's cache held between calls (at most `max_held_mb` of it)."""

    def __init__(self, chat: Chat, *, max_held_mb: float = 1024):
        self.chat, self.max_held = chat, int(max_held_mb * 2**20)
        self.cache: KVCache | None = None
        self.rows: list[list[int]] = []  # per held row, the id at every cache position (PAD where none)
        self.reused = 0  # prompt positions taken from the held cache instead of prefilled, over all calls
        self._images: dict[str, int] = {}  # image hash -> the id its positions are recorded with (< PAD)
        self._unhashed = itertools.count(PAD - 2**40, -1)

    @torch.inference_mode()
    def answer_batch(self, conversations: Sequence[Conversation],
                     params: SamplingParams = SamplingParams()) -> list[str]:
        chat, processor = self.chat, self.chat.processor
        if chat.model.config.attention != "causal" or chat.model.reader is not None or not conversations:
            self.cache, self.rows = None, []
            return chat.answer_batch(list(conversations), params)
        encoded = [processor.encode(c, generation=True) for c in conversations]
        for e in encoded:
            if len(e.rendered) >= processor.config.max_seq_len:
                raise ContextLengthError(f"no room left to answer: the prompt fills all {len(e.rendered)} positions")
        ids = [self._keyed(e) for e in encoded]  # an image's positions stand for that image, not any image
        cache, rows, starts = self._resume(ids, encoded)
        prompts = [chat.embed(e, start) for e, start in zip(encoded, starts)]  # [(1, T_i, D), (1, S_i)]
        width = max(p.shape[1] for p, _ in prompts)
        device = prompts[0][0].device
        embeds = torch.cat([_pad_left(p, width) for p, _ in prompts])  # (B, T, D)
        fresh = torch.cat([_pad_left(torch.ones(1, p.shape[1], dtype=torch.long), width) for p, _ in prompts])
        longest = max(t.shape[1] for _, t in prompts)
        seen = torch.cat([_pad_left(t, longest, value=int(t[0, 0])) for _, t in prompts])  # the penalty's text
        room = processor.config.max_seq_len - max(len(i) for i in ids)
        budget = SamplingParams(**{**params.__dict__, "max_new_tokens": max(1, min(params.max_new_tokens, room))})
        for row, (p, _), i, start in zip(rows, prompts, ids, starts):
            row += [PAD] * (width - p.shape[1]) + i[start:]
        streams = [TextStream(processor.tokenizer, processor.stop_strings + params.stop) for _ in conversations]
        done, fed, before = [False] * len(streams), [], cache.length + width
        for tokens in generate(chat.model.lm, embeds, budget, attention_mask=fresh.to(device), cache=cache,
                               stop_ids=processor.stop_ids, suppress_ids=chat.model.input_only_ids,
                               seen=seen.to(device)):
            fed.append([PAD if d else t for d, t in zip(done, tokens.tolist())])  # a finished row's tokens mean nothing
            if push_rows(streams, done, fed[-1], processor.stop_ids):
                break
        for step in fed[:cache.length - before]:  # the last token yielded is never fed
            for row, token in zip(rows, step):
                row.append(token)
        if cache.mask is None:
            cache.mask = torch.ones(len(rows), cache.length, dtype=torch.long, device=device)
        cache.mask = cache.mask * torch.tensor([[t != PAD for t in row] for row in rows], device=device).long()
        held = sum(x.numel() * x.element_size() for layer in cache.past.layers for x in (layer.keys, layer.values))
        self.cache, self.rows = (cache, rows) if held <= self.max_held else (None, [])
        return [s.text.strip() for s in streams]

    def _keyed(self, encoded) -> list[int]:
        """The prompt's ids with each image's positions replaced by an id of that image's content (an image without
        a hash gets an id of its own, so it matches nothing held)."""
        ids = list(encoded.rendered.input_ids)
        for start, digest in zip(encoded.rendered.image_starts, encoded.image_hashes):
            key = self._images.setdefault(digest, PAD - 1 - len(self._images)) if digest else next(self._unhashed)
            span = self.chat.processor.image_span(encoded.rendered.input_ids, start)[0]
            ids[start:start + span] = [key] * span
        return ids

    def _resume(self, ids: list[list[int]], encoded) -> tuple[KVCache, list[list[int]], list[int]]:
        """A cache with one row per new prompt, taken from the held rows, and how much of each prompt it holds."""
        if self.cache is None or not self.rows:
            return KVCache(), [[] for _ in ids], [0] * len(ids)
        held = [[(pos, t) for pos, t in enumerate(row) if t != PAD] for row in self.rows]
        picks, starts = [], []
        for prompt, e in zip(ids, encoded):
            shared = [common_prefix(prompt, [t for _, t in h]) for h in held]
            best = max(range(len(held)), key=shared.__getitem__)
            starts.append(_safe_start(min(shared[best], len(prompt) - 1), e, self.chat.processor))
            picks.append(best)
        # Only the shared starts are kept, packed to the right: positions given up by earlier turns or other rows
        # would otherwise pile up in the cache call after call. Positions come from the mask's count, so packing
        # changes none of them.
        kept = [[pos for pos, _ in held[pick][:start]] for pick, start in zip(picks, starts)]
        width = max(map(len, kept))
        if not width:
            self.cache, self.rows = None, []
            return KVCache(), [[] for _ in ids], [0] * len(ids)
        device = self.cache.past.layers[0].keys.device
        rows_index = torch.tensor(picks, device=device)
        index = torch.tensor([[0] * (width - len(k)) + k for k in kept], device=device)  # (B, W)
        for layer in self.cache.past.layers:
            where = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys[rows_index].gather(2, where)
            layer.values = layer.values[rows_index].gather(2, where)
        rows = [[PAD] * (width - len(k)) + [self.rows[pick][pos] for pos in k] for pick, k in zip(picks, kept)]
        mask = torch.tensor([[0] * (width - len(k)) + [1] * len(k) for k in kept], device=device)
        cache = KVCache(self.cache.past, width, mask=mask)
        self.reused += sum(starts)
        self.cache, self.rows = None, []  # in use: a failure half-way must not leave a cache that lies
        return cache, rows, starts


def _safe_start(start: int, encoded, processor) -> int:
    """`start`, moved back to the beginning of an image it would cut in two (its tokens come as one piece)."""
    for image_start in encoded.rendered.image_starts:
        if image_start < start < image_start + processor.image_span(encoded.rendered.input_ids, image_start)[0]:
            return image_start
    return start


def _pad_left(x: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    pad = width - x.shape[1]
    if pad <= 0:
        return x
    filler = torch.full((x.shape[0], pad, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([filler, x], dim=1)

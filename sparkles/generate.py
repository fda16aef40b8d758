"""Generation: a pure sampler, a token iterator over a KV cache, and the `Chat` facade every front end consumes.

`generate` knows nothing of text: embeddings in, token ids out, one step at a time. `Chat` adds the processor:
conversation in, text deltas out, stopping on stop strings without ever showing half of one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import GREEDY_BELOW, SamplingParams
from .conversation import Conversation, Message, Text
from .errors import ContextLengthError
from .llama_step import LlamaStep
from .lookahead import applies, greedy_lookahead
from .model.attention import lm_kwargs
from .model.layer_state import LayerState, state_kwargs
from .processor import Processor, TextStream, push_rows
from .slab import slab_class, slabs


@dataclass
class KVCache:
    """The LM's key/value cache plus how many positions it holds; a chat session can keep and extend it."""

    past: object = None  # a transformers Cache, created on first use
    length: int = 0
    # What a one-row cache's positions hold (image tokens included); batches leave it empty.
    token_ids: list[int] = field(default_factory=list)
    # (B, length) which cached positions are real: a cache kept from a left-padded batch must not attend to its
    # padding in later calls. None means every position is real.
    mask: torch.Tensor | None = None
    # (B, length) which cached positions hold image tokens: MMCA's text rows attend to them apart, so every later
    # call needs them for the cached positions too. None under causal attention, which needs no such mask.
    image: torch.Tensor | None = None

    @property
    def croppable(self) -> bool:
        """Whether positions can be cut from the end: not with sliding-window layers, which forget the start."""
        from transformers.cache_utils import DynamicLayer

        return self.past is None or all(type(layer) in (DynamicLayer, slab_class()) for layer in self.past.layers)

    def crop(self, length: int) -> None:
        """Forget every position from `length` on: undo a turn, or keep only a shared prefix."""
        assert 0 <= length <= self.length, f"cannot crop a cache of {self.length} positions to {length}"
        if length == 0:
            self.past = None  # a fresh start, whatever kind of layers the model made
        if self.past is not None:
            # Layer by layer, not `Cache.crop`: after a forward that failed half-way the layers differ in length.
            for layer in self.past.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > length:
                    layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        self.length = length
        self.token_ids = self.token_ids[:length]
        self.mask = None if self.mask is None else self.mask[:, :length]
        self.image = None if self.image is None else self.image[:, :length]

    def attended(self, batch: int, device) -> torch.Tensor:
        """(B, length) mask of the cached positions."""
        ones = self.mask is None
        return torch.ones(batch, self.length, dtype=torch.long, device=device) if ones else self.mask.to(device)


def cache_kwargs(lm, past) -> dict:
    """The LM forward's cache keyword: `cache` where its signature has it (transformers 5.x), else `past_key_values`."""
    return {_cache_arg(type(lm)): past}


@functools.cache
def _cache_arg(kind: type) -> str:
    return "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token of each row: (B, V) logits -> (B,) ids. `seen` (B, S) ids feed the repetition penalty."""
    # In float32 and finite: a NaN or inf from the model or the penalty must not reach the sampler.
    logits = logits.float().nan_to_num(float("-inf"), torch.finfo(torch.float32).max, float("-inf"))
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    greedy = logits.argmax(dim=-1)
    if params.temperature < GREEDY_BELOW:  # 0 is greedy; a tiny temperature would overflow the logits
        return greedy
    logits = (logits / params.temperature).nan_to_num(float("-inf"), torch.finfo(torch.float32).max, float("-inf"))
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = (cumulative - ordered.softmax(-1)) >= params.top_p
        logits = logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    bad = ~torch.isfinite(probs).all(-1) | ~(probs.sum(-1) > 0)  # every token at -inf, or an overflow
    if bool(bad.any()):
        probs[bad] = torch.nn.functional.one_hot(greedy[bad], probs.shape[-1]).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(lm, embeds: torch.Tensor, params: SamplingParams, *, attention_mask: torch.Tensor | None = None,
             stop_ids: tuple[int, ...] = (), suppress_ids: tuple[int, ...] = (), cache: KVCache | None = None,
             seen: torch.Tensor | None = None, use_cache: bool = True, input_ids: torch.Tensor | None = None,
             image_mask: torch.Tensor | None = None, signal: LayerState | None = None,
             lookahead: int = 0) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids until every row has hit a stop id or `max_new_tokens` are out.

    `embeds` (B, T, D) are the new positions, after whatever `cache` holds; rows are left-padded with
    `attention_mask` (B, T). Finished rows keep yielding their stop id. With `use_cache=False` every step re-runs
    the whole sequence: slow, and kept as the reference the cached path is tested against. `input_ids` (1, T),
    the ids behind `embeds`, are recorded in `cache.token_ids` with every token fed back, so that a session knows
    what its cache holds. The last token yielded is not fed, so the cache never holds it. `image_mask` (B, T) marks
    the image tokens among the new positions, for MMCA (`VisionLanguageModel.image_positions`); None for causal.
    `signal` covers the new positions for a reader (`VisionLanguageModel.signal`); generated tokens read as its last.

    Later steps of a plain Llama run `LlamaStep` on a cache written in place (`slab.py`): the same tokens, faster.
    With `lookahead` > 0, one unpadded row decoding greedily there checks that many guessed tokens a step
    (`lookahead.py`; `seen`, the prompt's text ids, is where the guesses come from).
    """
    cache = cache if cache is not None else KVCache()
    (batch, new), device = embeds.shape[:2], embeds.device
    fresh = attention_mask if attention_mask is not None else torch.ones(batch, new, dtype=torch.long, device=device)
    mask = torch.cat([cache.attended(batch, device), fresh.to(device, torch.long)], dim=1)  # (B, L + T)
    # Without padding no mask is kept, and the step gives sdpa none, as transformers' forward does then.
    padded = cache.mask is not None or attention_mask is not None
    holes = padded and not bool(mask.all())
    images = None  # (B, L + T) image positions, cached ones included; generated tokens are text
    if image_mask is not None:
        assert cache.image is not None or not cache.length, "an MMCA cache must know which positions are images"
        held = cache.image if cache.image is not None else image_mask.new_zeros(batch, 0)
        images = torch.cat([held.to(device), image_mask.to(device, torch.bool)], dim=1)
    if use_cache:  # room for the answer ahead, up to 1024 positions (past that a slab grows by half as it goes)
        cache.past = slabs(lm, cache.past, cache.length + new + min(params.max_new_tokens, 1024))
    step = LlamaStep(lm) if use_cache and images is None and signal is None and LlamaStep.fits(lm) else None
    record = input_ids is not None and batch == 1  # token ids are kept for one-row caches only
    generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
    done, stops = torch.zeros(batch, dtype=torch.bool, device=device), torch.tensor(stop_ids, device=device).long()
    seen = seen if seen is not None else torch.empty(batch, 0, dtype=torch.long, device=device)
    penalised = params.repetition_penalty != 1.0  # else `seen` is never read: no need to grow it
    banned = torch.tensor(suppress_ids, dtype=torch.long, device=device)
    inputs, history, table = embeds, embeds, lm.get_input_embeddings()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L + T)
    for n in range(params.max_new_tokens):
        if not use_cache:
            logits = lm(inputs_embeds=history, attention_mask=mask, position_ids=positions, use_cache=False,
                        **lm_kwargs(images), **state_kwargs(signal)).logits[:, -1]  # (B, V)
        elif n and step is not None:
            logits = step(inputs, positions, mask[:, None, None, :].bool() if holes else None, cache.past)
        else:
            logits = lm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions[:, -inputs.shape[1]:],
                        use_cache=True, logits_to_keep=1, **cache_kwargs(lm, cache.past),
                        **lm_kwargs(images), **state_kwargs(signal)).logits[:, -1]
        if use_cache:
            cache.length, cache.mask, cache.image = cache.length + inputs.shape[1], mask if padded else None, images
            cache.token_ids += input_ids[0].tolist() if record else []
        banned = banned if n else banned[banned < logits.shape[-1]]  # ids past the LM's vocabulary cannot come out
        logits = logits.index_fill(1, banned, float("-inf")) if banned.numel() else logits
        token = sample(logits, params, generator, seen)
        if stop_ids:
            token = torch.where(done, stops[0], token)
            done |= torch.isin(token, stops)
        yield token
        if stop_ids and bool(done.all()):
            return
        if not n and lookahead and batch == 1 and not holes and params.max_new_tokens > 1 \
                and applies(step, params, cache.past):
            yield from greedy_lookahead(step, table, cache, int(token[0]), int(mask[0].sum()), seen[0].tolist(),
                                        params.max_new_tokens - 1, lookahead=lookahead, stop_ids=stop_ids,
                                        banned=banned, record=record)
            return
        if penalised:
            seen = torch.cat([seen, token[:, None]], dim=1)
        input_ids = token[:, None]
        inputs = table(input_ids)  # (B, 1, D)
        history = inputs if use_cache else torch.cat([history, inputs], dim=1)  # only the reference path re-reads it
        if padded or step is None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        if not use_cache:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:  # the mask's running count at the new token, without re-counting the whole mask every step
            positions = positions[:, -1:] + 1 if n else mask[:, :positions.shape[1]].sum(-1, keepdim=True)
        images = None if images is None else torch.cat([images, images.new_zeros(batch, 1)], dim=1)
        signal = None if signal is None else signal.tail(1) if use_cache else signal.grow()


def deltas(tokens: Iterator[torch.Tensor], stream: TextStream, stop_ids: tuple[int, ...]) -> Iterator[str]:
    """Text deltas of one row's (1,) tokens until a stop id or stop string; `stream.text` is the answer so far."""
    for token in tokens:
        if int(token[0]) in stop_ids:
            break
        delta = stream.push(int(token[0]))
        if delta:
            yield delta
        if stream.stopped:
            return
    tail = stream.finish()
    if tail:
        yield tail


def nn_pad_left(x: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    """Left-pad dim 1 of a (1, T, …) tensor to `width`."""
    pad = width - x.shape[1]
    if pad <= 0:
        return x
    return torch.cat([torch.full((1, pad, *x.shape[2:]), value, dtype=x.dtype, device=x.device), x], dim=1)


class Chat:
    """Model + processor: a conversation in, the assistant's answer out, streamed as text. `lookahead` > 0: greedy
    answers check that many guessed tokens a step (`lookahead.py`). `image_cache`, an `ImageCache` (the server's),
    keeps each image's encoding by its content hash for later prompts that show it again: a server's prefix cache holds
    an image only where the prompt before it is the same, and an edited or differently begun conversation would
    encode it again. The model must not change while it is set."""

    def __init__(self, model, processor: Processor, *, lookahead: int = 0, image_cache=None):
        self.model, self.processor, self.lookahead, self.image_cache = model, processor, lookahead, image_cache

    @torch.inference_mode()
    def stream(self, conversation: Conversation, params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas of the answer to a conversation that ends with a user message."""
        embeds, text_ids, images, signal = self._prompt(conversation)
        room = self.processor.config.max_seq_len - embeds.shape[1]
        budget = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, room)})
        stream = TextStream(self.processor.tokenizer, self.processor.stop_strings + params.stop)
        yield from deltas(generate(self.model.lm, embeds, budget, stop_ids=self.processor.stop_ids,
                                   suppress_ids=self.model.input_only_ids, seen=text_ids, image_mask=images,
                                   signal=signal, lookahead=self.lookahead),
                          stream, self.processor.stop_ids)

    def answer(self, conversation: Conversation, params: SamplingParams = SamplingParams()) -> str:
        return "".join(self.stream(conversation, params)).strip()

    @torch.inference_mode()
    def answer_batch(self, conversations: list[Conversation], params: SamplingParams = SamplingParams()) -> list[str]:
        """Answers to several conversations at once, left-padded into one batch; each row stops on its own."""
        rows = [self._prompt(c) for c in conversations]
        width = max(e.shape[1] for e, *_ in rows)
        embeds = torch.cat([nn_pad_left(e, width) for e, *_ in rows])  # (B, T, D)
        mask = torch.cat([nn_pad_left(torch.ones(1, e.shape[1], dtype=torch.long), width) for e, *_ in rows])
        images = None if rows[0][2] is None else torch.cat([nn_pad_left(i, width) for _, _, i, _ in rows])  # (B, T)
        signal = None if rows[0][3] is None else type(rows[0][3]).left_padded([s for *_, s in rows], width)
        # Padding the penalty's history with a token the row already has leaves the penalty exactly as for one row.
        longest = max(ids.shape[1] for _, ids, *_ in rows)
        seen = torch.cat([nn_pad_left(ids, longest, value=int(ids[0, 0])) for _, ids, *_ in rows])
        room = self.processor.config.max_seq_len - width
        budget = SamplingParams(**{**params.__dict__, "max_new_tokens": max(1, min(params.max_new_tokens, room))})
        streams = [TextStream(self.processor.tokenizer, self.processor.stop_strings + params.stop) for _ in rows]
        done = [False] * len(rows)
        for tokens in generate(self.model.lm, embeds, budget, attention_mask=mask.to(embeds.device),
                               stop_ids=self.processor.stop_ids, suppress_ids=self.model.input_only_ids,
                               seen=seen.to(embeds.device), image_mask=images, signal=signal):
            if push_rows(streams, done, tokens.tolist(), self.processor.stop_ids):
                break
        return [s.text.strip() for s in streams]

    def _prompt(self, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, LayerState]:
        """Prompt embeddings (1, T, D), the prompt's text ids (1, S) for the repetition penalty, its image
        positions (1, T) for MMCA (None under causal attention) and its reader's state (or None)."""
        encoded = self.processor.encode(conversation, generation=True)
        if len(encoded.rendered) >= self.processor.config.max_seq_len:
            raise ContextLengthError(f"no room left to answer: the prompt fills all {len(encoded.rendered)} positions")
        ids = torch.tensor([encoded.rendered.input_ids], device=self.model.device)
        images = self.images(encoded)
        return (self.model.embed(ids, images), self.model.text_ids(ids), self.model.image_positions(ids),
                self.model.signal(ids, images))

    def embed(self, encoded, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (1, T - start, D) of an encoded prompt past its first `start` positions (a cached prefix: only
        later images are encoded), and all its text ids (1, S) for the repetition penalty: what a scheduler batches."""
        ids = torch.tensor([encoded.rendered.input_ids], device=self.model.device)
        text = self.model.text_ids(ids)
        if not start:
            return self.model.embed(ids, self.images(encoded)), text
        later = [i for i, s in enumerate(encoded.rendered.image_starts) if s >= start]
        return self.model.embed(ids[:, start:], self.encode(encoded, later)), text

    def reply(self, conversation: Conversation, params: SamplingParams = SamplingParams()) -> Conversation:
        """The conversation with the model's answer appended as an assistant message."""
        return conversation.append(Message("assistant", (Text(self.answer(conversation, params)),)))

    def images(self, encoded) -> torch.Tensor | None:
        """(N, K, D) features of an encoded prompt's images, in slot order: each distinct image is encoded once,
        even when several slots show it."""
        return None if encoded.pixel_values is None else self.encode(encoded, range(len(encoded.image_hashes)))

    def encode(self, encoded, slots) -> torch.Tensor | None:
        """(len(slots), K, D) features of the images in `slots`, each distinct one encoded once (those
        `image_cache` holds not at all), the rest in one call of the tower."""
        slots = list(slots)
        if not slots:
            return None
        hashes, cache = encoded.image_hashes, self.image_cache
        keys = [hashes[i] if hashes[i] is not None else i for i in slots]  # a slot without a hash is its own image
        first: dict = {}  # each distinct image's key -> the first of `slots` that shows it
        for key, slot in zip(keys, slots):
            first.setdefault(key, slot)
        held = {k: cache.get(("features", k)) for k in first if isinstance(k, str)} if cache is not None else {}
        new = [k for k in first if held.get(k) is None]
        if new:
            fresh = self.model.encode_images(encoded.pixel_values[[first[k] for k in new]])  # (U, K, D)
            for k, f in zip(new, fresh):
                held[k] = f
                if cache is not None and isinstance(k, str):  # a copy: a view would keep the whole batch alive
                    cache.put(("features", k), f.clone(), f.numel() * f.element_size())
        return torch.stack([held[k] for k in keys])

"""The batching scheduler: one background thread runs the generation of every request, many rows at a time.

Continuous batching: waiting requests join the running batch between decode steps (their prompts are prefilled
together, left-padded, or alone on a cached prefix (prefix.py); their KV caches padded into the batch's), and rows
leave it once finished or cancelled. Each request streams through its own queue. No HTTP here: see `serve.py`.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .config import SamplingParams
from .errors import ContextLengthError, EngineClosedError, QueueFullError  # noqa: F401 (the server's)
from .generate import Chat, cache_kwargs, sample
from .llama_step import LlamaStep
from .lookahead import Guesser, applies, check
from .model.layer_state import state_kwargs
from .prefix import PrefixCache, check_engine, image_keys, kinds_mask, lm_masks
from .prefix import pad_left as _pad
from .prefix import plain_layer as _plain
from .processor import Encoded, TextStream
from .request import Event, Request
from .slab import holding

log = logging.getLogger(__name__)
ROW_FAILED = "generation failed for this request"  # one row's error: the others in its batch go on
ROOM_AHEAD = 128  # positions a batch cache makes room for past its longest row at most (slab.py grows it after)


def _room(width: int, left: list[int]) -> int:
    """Positions a batch cache of `width` makes room for, given the tokens its rows may still generate."""
    return width + min(max(left), ROOM_AHEAD)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # rows decoded together; 1 serves one request at a time
    max_queue: int = 64  # requests waiting to join; past this `submit` refuses (HTTP 429)
    prefix_cache_mb: float = 0  # KV of prompts kept to resume later ones that start alike (prefix.py); 0 = off
    lookahead: int = 0  # guessed tokens a lone greedy row checks a step (prompt lookup, lookahead.py); 0 = off


@dataclass
class _Row:
    """A request while it is in the batch."""

    request: Request
    stream: TextStream
    seen: torch.Tensor  # (1, S) text ids so far, for the repetition penalty
    generator: torch.Generator | None
    budget: int  # tokens it may still generate, all told
    keys: list = ()  # (start, content hash) of its images: the prefix cache's key with its ids
    produced: int = 0
    started: bool = False  # whether non-blank text has been sent (the answer's leading blanks are dropped)
    finish: str | None = None
    broken: str | None = None  # why this row cannot go on (a seed torch refused): it ends with an error
    reads: object = None  # a reader model's state of the last prompt position, which each new token reads too
    features: torch.Tensor | None = None  # and its prompt's (N, K, D) image features, kept with its prefix
    guesser: Guesser | None = None  # its text so far, indexed for prompt lookup (made on first use)

    @staticmethod
    def waiting(request: Request) -> _Row:
        """A request that never joined the batch, so that it can be ended like the others."""
        return _Row(request, None, None, None, 0)


class Engine:
    """Model + processor + a scheduler thread. Thread-safe: `encode` and `submit` from any thread."""

    def __init__(self, model, processor, config: EngineConfig = EngineConfig()):
        check_engine(model, config)  # prefix.py: config ranges, and models the engine cannot run
        self.chat, self.processor, self.config = Chat(model, processor), processor, config
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._cache, self._mask, self._last = None, None, None  # the batch: KV cache, (B, L) mask, (B,) next input
        self._joinable = True  # False once a cache turns out not to be left-paddable (sliding windows)
        # `generate`'s lean decoding step, built once: a served model's weights do not change.
        fits = model.config.attention == "causal" and model.reader is None and LlamaStep.fits(model.lm)
        self._step = LlamaStep(model.lm) if fits else None
        vocab = model.lm.get_output_embeddings().weight.shape[0]  # image content ids are inputs only, never sampled
        self._banned = torch.tensor([i for i in model.input_only_ids if i < vocab], dtype=torch.long).to(model.device)
        self.counts = collections.Counter()
        self.prefix = PrefixCache(int(config.prefix_cache_mb * 2**20), processor.config.tokens_per_image)  # thread's
        self._thread = threading.Thread(target=self._run, name="sparkles-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_chat(cls, chat: Chat, config: EngineConfig = EngineConfig()) -> Engine:
        return cls(chat.model, chat.processor, config)

    def encode(self, conversation) -> Encoded:
        """Render a conversation whose images are loaded (their inputs kept in `chat.image_cache` where it is set);
        raises `SparklesError` for what a user must fix."""
        return self.processor.encode(conversation, generation=True, cache=self.chat.image_cache)

    def room(self, encoded: Encoded) -> int:
        """How many tokens an answer to this prompt may have before the context is full."""
        return self.processor.config.max_seq_len - len(encoded.rendered)

    def full(self) -> bool:
        return len(self._waiting) >= self.config.max_queue

    def submit(self, encoded: Encoded, params: SamplingParams, *, strict: bool = False, ignore_eos: bool = False,
               loop=None) -> Request:
        """Queue a prompt. A `max_new_tokens` past the room left in the context is cut to it, or with `strict`
        refused (ContextLengthError). QueueFullError or EngineClosedError when the engine cannot take it."""
        prompt, room = len(encoded.rendered), self.room(encoded)
        if strict and params.max_new_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {prompt + room} tokens, but {prompt + params.max_new_tokens} "
                f"were requested ({prompt} in the messages, images included, and {params.max_new_tokens} for the "
                "completion); shorten the messages or lower max_tokens")
        budget = max(1, min(params.max_new_tokens, room))
        request = Request(encoded, replace(params, max_new_tokens=budget), ignore_eos=ignore_eos, loop=loop)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                self.counts["rejected"] += 1
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(request)
            self.counts["submitted"] += 1
            self._cond.notify()
        return request

    def stream(self, conversation, params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas of the answer, for callers in a thread; stopping early cancels the request."""
        request = self.submit(self.encode(conversation), params)
        try:
            for event in request:
                if event.error:
                    raise RuntimeError(event.error)
                if event.text:
                    yield event.text
        finally:
            request.cancel()

    alive = property(lambda self: self._thread.is_alive())

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": len(self._waiting), **self.counts,
                "prefix_cache": self.prefix.stats()}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests still in flight end with an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # The scheduler thread

    def _run(self) -> None:
        with torch.inference_mode():
            while (joining := self._take()) is not None:
                if joining:
                    try:
                        self._prefill(joining)
                    except Exception:  # a bug or out of memory in one prefill must not stop the server
                        log.exception("prefill failed for %d request(s)", len(joining))
                        self._fail([_Row.waiting(r) for r in joining], "internal error in prefill")
                if self._rows:
                    try:
                        self._decode()
                    except Exception:
                        log.exception("decode step failed; failing the %d running request(s)", len(self._rows))
                        self._fail(self._rows, "internal error during generation")
                        self._reset()
        with self._cond:
            left = [_Row.waiting(r) for r in self._waiting] + self._rows
            self._waiting.clear()
        self._fail(left, "the server is shutting down")
        self._reset()

    def _take(self) -> list[Request] | None:
        """Requests to join now ([] = just keep decoding); blocks while idle; None once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._rows:
                self._cond.wait()
            if self._closed:
                return None
            room = self.config.max_batch - len(self._rows)
            if self._rows and not self._joinable:
                room = 0  # a cache that cannot be padded: wait for the batch to drain (dynamic batching)
            joining = []
            while self._waiting and len(joining) < room:
                request = self._waiting.popleft()
                if request.cancelled:
                    self._end(_Row.waiting(request), "cancelled")
                else:
                    joining.append(request.start())
            return joining

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill new prompts (one by one on a prefix the cache holds, the rest as one batch), then merge them in."""
        keys = [image_keys(r.encoded) if self.prefix.capacity else [] for r in requests]
        found = [self.prefix.lookup(r.encoded.rendered.input_ids, k) for r, k in zip(requests, keys)]
        fresh = [(r, k) for r, k, (n, _) in zip(requests, keys, found) if not n]
        groups = [([(r, k)], n, hit) for r, k, (n, hit) in zip(requests, keys, found) if n]
        for group, start, hit in groups + ([(fresh, 0, None)] if fresh else []):
            parts = [self._parts(r.encoded, start, hit) for r, _ in group]  # [(1, T, D), (1, S), state, features]
            width = max(e.shape[1] for e, *_ in parts)
            embeds = torch.cat([_pad(e, width, dim=1) for e, *_ in parts])  # (B, T, D)
            mask = torch.cat([_pad(kinds_mask(self.chat.model, r.encoded.rendered.input_ids, e.device), start + width,
                                   dim=1) for (r, _), (e, *_) in zip(group, parts)])  # (B, start + T), 2 = image
            states = [state for _, _, state, _ in parts]
            signal = None if states[0] is None else type(states[0]).left_padded(states, width)
            # Slabs holding the entry's first `start` positions, copied at the first write: entries are never written.
            room = _room(start + width, [r.params.max_new_tokens for r, _ in group])
            held = [(k[:, :, :start], v[:, :, :start]) for k, v in hit.layers] if hit else None
            cache = holding(self.chat.model.lm, held, room)
            logits = self._forward(embeds, mask, cache, signal)
            rows = [self._row(r, ids, k, state and state.tail(1), features)
                    for (r, k), (_, ids, state, features) in zip(group, parts)]
            first = self._sample(rows, logits)  # the first tokens go out before the prompts' KV is copied to keep
            if all(_plain(layer) for layer in cache.layers):  # a sliding window forgets the start: nothing to keep
                self.prefix.store_rows([(i, r.encoded.rendered.input_ids, k, row.features)
                                        for i, ((r, k), row) in enumerate(zip(group, rows))], cache.layers)
            self._merge(rows, cache, mask, first)
        self._drop_finished()

    def _parts(self, encoded: Encoded, start: int, hit) -> tuple:
        """Embeddings (1, T, D) past `start`, text ids (1, S); for a reader model also the state of those positions
        and the prompt's (N, K, D) image features, the ones before `start` taken from the prefix `hit`."""
        model = self.chat.model
        if model.reader is None:
            return *self.chat.embed(encoded, start), None, None
        if not start:
            features = self.chat.images(encoded)
        else:
            held = sum(s < start for s in encoded.rendered.image_starts)  # whole images the prefix holds (`_common`)
            later = self.chat.encode(encoded, range(held, len(encoded.rendered.image_starts)))
            features = hit.features[:held] if later is None else torch.cat([hit.features[:held], later])
            features = features if len(features) else None  # a text-only prompt, as `Chat.images` gives it
        ids = torch.tensor([encoded.rendered.input_ids], device=model.device)
        state = model.signal(ids, features).tail(ids.shape[1] - start)
        return model.embed(ids, features)[:, start:], model.text_ids(ids), state, features

    def _row(self, request: Request, text_ids: torch.Tensor, keys: list, reads=None, features=None) -> _Row:
        params, seed, broken = request.params, request.params.seed, None
        try:  # a per-request generator: the same seed gives the same answer in any batch
            generator = None if seed is None else torch.Generator(text_ids.device).manual_seed(seed)
        except (RuntimeError, ValueError, OverflowError) as e:
            generator = None
            broken = f"seed {params.seed} refused: {e}"
        stream = TextStream(self.processor.tokenizer, self.processor.stop_strings + params.stop)
        return _Row(request, stream, text_ids, generator, params.max_new_tokens, keys, broken=broken, reads=reads,
                    features=features)

    def _decode(self) -> None:
        """One step for every row: feed each row's last token, sample its next one."""
        for row in self._rows:
            if row.request.cancelled:
                self._end(row, "cancelled")
        self._drop_finished()
        if not self._rows:
            return
        alone = len(self._rows) == 1 and not self._rows[0].broken
        if (self.config.lookahead and alone and applies(self._step, self._rows[0].request.params, self._cache)
                and bool((self._mask > 0).all())):
            return self._decode_ahead(self._rows[0])  # a lone greedy row: prompt lookup
        ones = torch.ones(len(self._rows), 1, dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        inputs = self.chat.model.lm.get_input_embeddings()(self._last[:, None])  # (B, 1, D)
        reads = [row.reads for row in self._rows]
        signal = None if reads[0] is None else type(reads[0]).left_padded(reads, 1)
        logits = self._forward(inputs, self._mask, self._cache, signal)
        self._last = self._sample(self._rows, logits)
        self._drop_finished()

    def _decode_ahead(self, row: _Row) -> None:
        """A lone greedy row's step with prompt lookup (lookahead.py): the greedy tokens go out one by one, and the
        cache keeps the positions fed before the last one out, as plain steps would leave it."""
        held, lm, out = self._mask.shape[1], self.chat.model.lm, 0
        row.guesser = row.guesser or Guesser(row.seen[0].tolist())
        guess = row.guesser.guess(min(self.config.lookahead, row.budget - row.produced - 1))
        table, token = lm.get_input_embeddings(), int(self._last[0])
        best = check(self._step, table, self._cache, held, held, token, guess, self._banned)
        while row.finish is None and out < len(best):
            token, out = best[out], out + 1
            row.seen = torch.cat([row.seen, row.seen.new_tensor([[token]])], dim=1)
            row.guesser.extend([token])
            self._advance(row, token)
        for layer in self._cache.layers:
            layer.hold(held + out)
        self._mask, self._last = self._mask.new_ones(1, held + out), self._last.new_tensor([token])
        self.counts.update(lookahead_steps=1, lookahead_tokens=out)
        self._drop_finished()

    def _forward(self, inputs: torch.Tensor, mask: torch.Tensor, cache, signal=None) -> torch.Tensor:
        """(B, T, D) new positions on top of `cache` -> (B, V) logits of the last one."""
        positions = (mask.clamp(max=1).cumsum(-1) - 1).clamp(min=0)[:, -inputs.shape[1]:]  # MMCA marks images 2
        if inputs.shape[1] == 1 and self._step is not None:  # a decoding step of a plain Llama: the lean one
            real = mask > 0
            return self._step(inputs, positions, None if bool(real.all()) else real[:, None, None, :], cache).float()
        out = self.chat.model.lm(inputs_embeds=inputs, position_ids=positions, use_cache=True, logits_to_keep=1,
                                 **cache_kwargs(self.chat.model.lm, cache), **lm_masks(self.chat.model, mask),
                                 **state_kwargs(signal))
        return out.logits[:, -1].float()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token under its own sampling parameters; text goes out as it comes."""
        logits[:, self._banned] = float("-inf")
        tokens = []
        for i, row in enumerate(rows):
            try:  # one row's failure ends that row only; the others keep decoding
                if row.broken:
                    raise ValueError(row.broken)
                token = sample(logits[i:i + 1], row.request.params, row.generator, row.seen)  # (1,)
                row.seen = torch.cat([row.seen, token[:, None]], dim=1)
                self._advance(row, int(token))
            except Exception as e:
                log.exception("sampling failed for one request; ending it alone")
                token = torch.zeros(1, dtype=torch.long, device=logits.device)  # a placeholder: the row is dropped
                self._end(row, "error", f"{ROW_FAILED}: {type(e).__name__}: {e}"[:300])
            tokens.append(token)
        return torch.cat(tokens)

    def _advance(self, row: _Row, token: int) -> None:
        row.produced += 1
        if row.request.cancelled:
            self._end(row, "cancelled")
        elif token in self.processor.stop_ids and not row.request.ignore_eos:
            self._end(row, "stop")
        else:
            self._send(row, row.stream.push(token))
            if row.stream.stopped or row.produced >= row.budget:
                self._end(row, "stop" if row.stream.stopped else "length")

    def _send(self, row: _Row, text: str) -> None:
        if not row.started:
            text = text.lstrip()
            row.started = bool(text)
        if text:
            row.request.emit(Event(text=text))

    def _end(self, row: _Row, reason: str, error: str | None = None) -> None:
        if row.request.done:  # a failure after it ended (say, in the merge that follows its last token)
            return
        if row.stream is not None and reason in ("stop", "length") and not row.stream.stopped:
            self._send(row, row.stream.finish())  # text held back in case it began a stop string
        row.finish, row.request.done = reason, True
        self.counts[{"stop": "completed", "length": "completed"}.get(reason, reason)] += 1
        self.counts["tokens"] += row.produced
        row.request.emit(Event(finish_reason=reason, prompt_tokens=row.request.prompt_tokens,
                               completion_tokens=row.produced, error=error))

    def _fail(self, rows: list[_Row], message: str) -> None:
        for row in rows:
            self._end(row, "error", message)

    # The batch's KV cache: rows join by left padding and leave by selection

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add prefilled rows to the batch: both caches are left-padded to the longer one and stacked."""
        self._joinable = self._joinable and all(_plain(layer) for layer in cache.layers)
        if self._rows:
            width = max(self._mask.shape[1], mask.shape[1])
            room = _room(width, [r.budget - r.produced for r in self._rows + rows])
            cache = holding(self.chat.model.lm, [(torch.cat([_pad(a.keys, width), _pad(b.keys, width)]),
                                                  torch.cat([_pad(a.values, width), _pad(b.values, width)]))
                                                 for a, b in zip(self._cache.layers, cache.layers)], room)
            mask = torch.cat([_pad(self._mask, width, dim=1), _pad(mask, width, dim=1)])
            rows, tokens = self._rows + rows, torch.cat([self._last, tokens])
        self._rows, self._cache, self._mask, self._last = rows, cache, mask, tokens
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(rows))

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.finish is None]
        if len(keep) == len(self._rows):
            return
        if self._joinable:  # an answered prompt is the start of its conversation's next request: keep it whole
            self.prefix.store_rows([(i, r.request.encoded.rendered.input_ids + r.seen[0, -r.produced:-1].tolist(),
                                     r.keys, r.features) for i, r in enumerate(self._rows)
                                    if r.finish in ("stop", "length") and r.produced > 1], self._cache.layers)
        if not keep:
            return self._reset()
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._last = self._mask[index], self._last[index]
        # Columns that only the rows that left were using are dead weight in every later step: cut them off.
        lead = int(self._mask.any(dim=0).long().argmax())
        self._mask = self._mask[:, lead:]
        room = _room(self._mask.shape[1], [r.budget - r.produced for r in self._rows])
        for layer in self._cache.layers:  # new tensors: the next step copies them into a slab with this room
            layer.keys, layer.values = layer.keys[index, :, lead:], layer.values[index, :, lead:]
            layer.reserve = room

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._last = [], None, None, None

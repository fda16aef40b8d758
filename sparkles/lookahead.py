"""Prompt-lookup decoding: greedy decoding that checks several guessed tokens in one step, for one row.

An answer about images repeats what is already in the conversation: image names, colours, shapes, phrases of the
question and of its own earlier sentences. The guess for the tokens after the last one is what followed the most
recent earlier occurrence of the last three (else two, else one) tokens, in the prompt's text or the answer so far
(HF's `prompt_lookup_num_tokens` and vLLM's n-gram speculation guess the same way). One step of the lean Llama step
(`llama_step.py`) computes the logits of the last token and of every guess at once: the guesses that equal the
greedy choice before them are kept, and the first that does not is replaced by that choice. So every token is the
greedy one, and a step that reads the weights once yields up to `lookahead + 1` tokens. The products of a
several-row step add in another order than a one-row step's, so logits may differ in the last bits of float32; a
token could only change where two logits tie to that precision (the tests and `bench/bench_lookahead.py` compare
the tokens with plain greedy decoding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import GREEDY_BELOW, SamplingParams
from .slab import slab_class

NGRAMS = (3, 2, 1)  # the suffix lengths looked up, longest first


class Guesser:
    """The most recent position after each n-gram of a growing list of ids, for n in NGRAMS."""

    def __init__(self, ids: list[int]):
        self.ids: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, ids: list[int]) -> None:
        for token in ids:
            # The n-grams that ended at the previous id now have a continuation: this one.
            for n in NGRAMS:
                if len(self.ids) >= n:
                    self._after[tuple(self.ids[-n:])] = len(self.ids)
            self.ids.append(token)

    def guess(self, k: int) -> list[int]:
        """Up to k ids that followed the last ids' most recent earlier occurrence; [] when none did."""
        for n in NGRAMS:
            if len(self.ids) > n:
                start = self._after.get(tuple(self.ids[-n:]))
                if start is not None:
                    return self.ids[start:start + k]
        return []


def applies(step, params: SamplingParams, past) -> bool:
    """Whether a row may decode with prompt lookup: a lean step (`llama_step.py`), greedy choices that no repetition
    penalty changes, and a cache of slabs that can be held at any length."""
    return (step is not None and params.temperature < GREEDY_BELOW and params.repetition_penalty == 1.0
            and all(type(layer) is slab_class() for layer in past.layers))


def greedy_lookahead(step, table, cache, token: int, position: int, context: list[int], budget: int, *,
                     lookahead: int, stop_ids: tuple[int, ...], banned: torch.Tensor,
                     record: bool) -> Iterator[torch.Tensor]:
    """Yield (1,) greedy tokens after `token` (already yielded, not yet in `cache`, at `position`), at most
    `budget` of them, stopping after a stop id. `context`: the ids the guesses are looked up in (the prompt's
    text). `cache` is a `generate.KVCache` of slabs (`slab.py`), cut back by re-slicing their buffers."""
    guesser = Guesser(context + [token])
    device, token_fed = banned.device, token
    while budget > 0:
        guess = guesser.guess(min(lookahead, budget - 1))
        held = cache.length
        best = check(step, table, cache.past, held, position, token_fed, guess, banned)
        kept = len(best) - 1
        guesser.extend(best)
        fed, base = [token_fed, *best[:kept]], list(cache.token_ids)
        for out, token in enumerate(best, start=1):
            # At each token out the cache holds every token before it and no more, as plain decoding leaves it:
            # a reader that stops here (a stop string, a closed stream) finds it so, without the guesses after.
            _hold(cache, held + out, base + fed[:out] if record else base)
            yield torch.tensor([token], device=device)
            budget -= 1
            if token in stop_ids or budget == 0:
                return
        token_fed, position = best[kept], position + kept + 1


def check(step, table, past, held: int, position: int, token: int, guess: list[int],
          banned: torch.Tensor) -> list[int]:
    """One step of `step` on `past` (`held` positions, all real) over `token` at `position` and the guesses after
    it -> the greedy tokens: those of the guesses that equal the greedy choice before them, then the choice where
    they first differ (or after the last). The step writes every fed position; the caller keeps what it uses."""
    ids = torch.tensor([[token, *guess]], device=banned.device)
    t = ids.shape[1]
    # Each new position sees the cache and the new positions up to itself.
    mask = None if t == 1 else torch.ones(t, held + t, dtype=torch.bool, device=ids.device).tril(held)[None, None]
    positions = torch.arange(position, position + t, device=ids.device)[None]
    logits = step(table(ids), positions, mask, past, every=True)[0].float()  # (T, V)
    logits = logits.nan_to_num(float("-inf"), torch.finfo(torch.float32).max, float("-inf"))  # as `sample`
    if banned.numel():
        logits = logits.index_fill(1, banned, float("-inf"))
    best = logits.argmax(-1).tolist()
    kept = 0
    while kept < len(guess) and best[kept] == guess[kept]:
        kept += 1
    return best[:kept + 1]


def _hold(cache, length: int, token_ids: list[int]) -> None:
    """The cache as holding its first `length` positions: its slabs' views re-cut from their buffers, which keep
    what the step wrote past them."""
    cache.length, cache.token_ids = length, token_ids
    for layer in cache.past.layers:
        layer.hold(length)

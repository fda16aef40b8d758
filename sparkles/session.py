"""A chat session: an image registry and the KV cache of the committed history, so a turn pays for its own tokens.

Each image is encoded once per session, keyed by its full content hash. A turn renders the conversation, keeps
the cached positions the new rendering still starts with, prefills only the rest, decodes, and commits the answer
with its end-of-turn marker. Undo and regenerate cut the cache back; overflow drops whole oldest turns. Not here:
batching many users (engine.py) and the front ends (cli, serve).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .config import SamplingParams
from .conversation import Conversation, Image, Message, Text, user_message, validate
from .errors import ContextLengthError, InputError
from .generate import KVCache, deltas, generate
from .model.layer_state import LayerState
from .processor import Processor, Rendered, TextStream

_FULL_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Turn:
    """A turn ready to run: the conversation it answers (oldest turns maybe dropped) and its rendering."""

    conversation: Conversation
    rendered: Rendered
    keys: list[str]  # content hash of each image slot, in slot order
    dropped: int  # whole oldest turns left out to make room


class ChatSession:
    """One conversation with a model, turn by turn, reusing every image encoding and the committed KV cache.

    Not thread-safe: one session serves one user. The web UI holds one per browser session; the HTTP server, whose
    requests carry their whole history, resumes from the engine's prefix cache (prefix.py) instead.
    """

    def __init__(self, model, processor: Processor, *, system: str | None = None, lookahead: int = 0):
        self.model, self.processor, self.lookahead = model, processor, lookahead  # lookahead: see `Chat`
        self._base = (Message.text_only("system", system),) if system is not None else ()
        self._registry: dict[str, torch.Tensor] = {}  # content hash -> (K, D) image embeddings
        # id(pixels) -> (weak reference to the pixels, hash), for images without a loader's hash: hashed once, and
        # the pixels are not kept alive by the session (the registry keeps only their encoding).
        self._hashes: dict[int, tuple[weakref.ref, str]] = {}
        self.stats: Counter = Counter()  # images_encoded, tokens_prefilled, tokens_reused, turns_dropped
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its cache; encoded images stay, so showing one again costs nothing."""
        self.conversation = Conversation(self._base)
        self.cache = KVCache()
        self._slots: list[tuple[int, str]] = []  # (start, hash) of each image the cache holds
        self._dropped: tuple[str, ...] = ()  # labels of images in turns dropped for room: their numbers stay taken
        self._busy = False

    @property
    def labels(self) -> tuple[str, ...]:
        """Every image label of this session, dropped turns' too: a new image becomes IMAGE#<len(labels) + 1>."""
        return self._dropped + self.conversation.labels

    def close(self) -> None:
        """Free the cache and every encoded image at once (a front end whose user left)."""
        self.reset()
        self._registry.clear()
        self._hashes.clear()

    def follows(self, conversation: Conversation) -> bool:
        """Whether `conversation` ends with this session's committed turns (older ones may have been dropped for
        room) and names its images alike: then the session can answer its next turn as it is."""
        kept = self.conversation.messages[len(self._base):]
        if not kept:
            return not conversation.messages[len(self._base):]
        return conversation.messages[-len(kept):] == kept and conversation.labels[-len(self.labels):] == self.labels

    @property
    def turns(self) -> int:
        return (len(self.conversation) - len(self._base)) // 2

    def stream(self, prompt: str | Message, images: Sequence[Image] = (),
               params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas of the answer to a new user turn; the answer is committed when the iterator ends or is closed.

        `prompt` is text placing `images` as `user_message` does (new images become the next IMAGE#k), or a ready
        user message. Errors in the message or a turn that cannot fit raise here, before any text.
        """
        if self._busy:
            raise InputError("the previous answer is still being generated: finish or close its iterator first")
        if isinstance(prompt, Message) and images:
            raise InputError(f"a ready message holds its own images; got {len(images)} more beside it")
        message = prompt if isinstance(prompt, Message) else user_message(prompt, images, known=self.labels)
        if message.role != "user":
            raise InputError(f"a turn starts with a user message, got a {message.role!r} one")
        turn = self._fit(self.conversation.append(message), params)
        return self._run(turn, params)

    def answer(self, prompt: str | Message, images: Sequence[Image] = (),
               params: SamplingParams = SamplingParams()) -> str:
        return "".join(self.stream(prompt, images, params)).strip()

    def undo(self) -> Message:
        """Forget the last turn (question and answer) and cut the cache back to before it; returns its question."""
        if self._busy or not self.turns:
            raise InputError("there is no finished turn to undo")
        question = self.conversation.messages[-2]
        dropped = self._dropped
        self.resume(Conversation(self.conversation.messages[:-2]))
        self._dropped = dropped
        return question

    def resume(self, conversation: Conversation) -> None:
        """Go on from `conversation`, a finished dialogue (or none), as a front end that owns the dialogue does after
        its own undo or edit: the cached positions it shares with the current one are kept, the rest forgotten."""
        messages = conversation.messages
        if self._busy:
            raise InputError("the previous answer is still being generated: finish or close its iterator first")
        if messages and messages[-1].role == "user":
            raise InputError("a session goes on from a dialogue whose last message is an answer, got a user one")
        self._base = messages[:1] if messages and messages[0].role == "system" else ()
        self.conversation, self._dropped = conversation, ()
        if not self.turns:
            return self._crop(0)
        rendered = self._render(validate(conversation), generation=False)
        self._keep(rendered, [self._key(i) for i in conversation.slots], fresh=0)

    def regenerate(self, params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """A new answer to the last question: undo the last turn, then ask it again (with, say, another seed)."""
        return self.stream(self.undo(), params=params)

    # Turns

    def _fit(self, conversation: Conversation, params: SamplingParams) -> _Turn:
        """Drop whole oldest turns until the prompt leaves room to answer; ContextLengthError when none is enough.

        Room means `max_new_tokens`, but at most a quarter of the context: a huge budget must not empty the chat.
        """
        try:  # the new message's own mistakes are the user's to fix, not a reason to drop turns
            validate(conversation)
        except InputError as e:
            gone = [f"IMAGE#{label}" for label in self._dropped if re.search(rf"IMAGE#{re.escape(label)}\b", str(e))]
            if gone:
                raise ContextLengthError(f"{e}: {gone[0]} was in a turn dropped to make room") from None
            raise
        limit = self.processor.config.max_seq_len
        want = min(params.max_new_tokens, limit // 4)
        head, messages = len(self._base), conversation.messages
        for dropped in range((len(messages) - head + 1) // 2):
            candidate = Conversation(messages[:head] + messages[head + 2 * dropped:])
            last = head + 2 * dropped + 1 == len(messages)
            try:
                rendered = self._render(candidate, generation=True)  # too many images or a dropped reference
            except InputError as e:
                if last:
                    raise ContextLengthError(f"this turn cannot fit even without the earlier turns: {e}") from None
                continue
            if len(rendered) + want <= limit or (last and len(rendered) < limit):
                return _Turn(candidate, rendered, [self._key(i) for i in candidate.slots], dropped)
            if last:
                raise ContextLengthError(f"this turn alone is {len(rendered)} tokens, the model takes {limit} "
                                         f"(max_seq_len) including the answer; shorten it or send fewer images")
        raise AssertionError("a conversation ending with a user message always has a last candidate")

    def _run(self, turn: _Turn, params: SamplingParams) -> Iterator[str]:
        if self._busy:
            raise InputError("the previous answer is still being generated: finish or close its iterator first")
        self._busy = True
        before = self.cache.length
        stream = TextStream(self.processor.tokenizer, self.processor.stop_strings + params.stop)
        try:
            prompt, reuse, embeds, signal = self._prefix(turn)
            room = self.processor.config.max_seq_len - prompt.shape[1]
            budget = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, room)})
            seen = self.model.text_ids(prompt)  # the penalty sees the text, as in Chat
            # Under MMCA the cache also keeps which positions are images (KVCache.image), cut back with it.
            tokens = generate(self.model.lm, embeds, budget, stop_ids=self.processor.stop_ids, cache=self.cache,
                              suppress_ids=self.model.input_only_ids, seen=seen, input_ids=prompt[:, reuse:],
                              image_mask=self.model.image_positions(prompt[:, reuse:]), signal=signal,
                              lookahead=self.lookahead)
            yield from deltas(tokens, stream, self.processor.stop_ids)
        except (GeneratorExit, KeyboardInterrupt):  # a stop button or Ctrl-C: keep what was said, as chat UIs do
            self._commit(turn, stream.text)  # safe mid-forward too: the commit cuts the cache to what it knows
            raise
        except BaseException:
            self._crop(min(before, self.cache.length))
            self._busy = False
            raise
        self._commit(turn, stream.text)

    @torch.inference_mode()
    def _prefix(self, turn: _Turn) -> tuple[torch.Tensor, int, torch.Tensor, LayerState | None]:
        """The prompt's ids (1, T), how many cached positions it reuses, the embeddings of the rest, and their
        reader's state (None without adapters or cross-attention)."""
        prompt = torch.tensor([turn.rendered.input_ids], device=self.model.device)
        reuse = self._keep(turn.rendered, turn.keys)
        embeds = self.model.embed(prompt[:, reuse:], self._features(turn, reuse))  # (1, T - reuse, D)
        signal = None
        if self.model.reader is not None:  # the new positions may read an image the cache holds: start from 0
            signal = self.model.signal(prompt, self._features(turn, 0)).tail(prompt.shape[1] - reuse)
        self.stats.update(tokens_reused=reuse, tokens_prefilled=prompt.shape[1] - reuse, turns_dropped=turn.dropped)
        return prompt, reuse, embeds, signal

    def _commit(self, turn: _Turn, text: str) -> None:
        """Commit the answer as the renderer writes it, then the end-of-turn marker: the cache keeps the positions
        that agree with render(conversation + answer). The rest (the marker, and any tokens the model chose that the
        renderer would split otherwise) is prefilled with the next turn, where it costs almost nothing."""
        done = turn.conversation.append(Message("assistant", (Text(text.strip()),)))
        self._crop(common_prefix(self.cache.token_ids, self._render(done, generation=False).input_ids))
        self._slots = [(s, k) for s, k in zip(turn.rendered.image_starts, turn.keys)]
        gone = Conversation(self.conversation.messages[:len(self._base) + 2 * turn.dropped])
        self._dropped += tuple(label for label in gone.labels if label not in self._dropped)
        self.conversation, self._busy = done, False

    def _keep(self, rendered: Rendered, keys: list[str], *, fresh: int = 1) -> int:
        """How many cached positions a rendering starts with, leaving at least `fresh` of it to run (a prompt's last
        position must run to give logits); the cache is cut back to them."""
        ids = rendered.input_ids
        keep = min(common_prefix(self.cache.token_ids, ids), len(ids) - fresh) if self.cache.croppable else 0
        cached = dict(self._slots)
        for start, key in zip(rendered.image_starts, keys):
            # Image tokens share one id, so ids alone cannot tell two images apart; an image is reused whole or not.
            if start < keep and (cached.get(start) != key or start + self.processor.image_span(ids, start)[0] > keep):
                keep = start
                break
        self._crop(keep)
        return keep

    def _features(self, turn: _Turn, reuse: int) -> torch.Tensor | None:
        """(N, K, D) embeddings of the images after `reuse`, encoding in one call only those never seen before."""
        wanted = [(image, key) for image, key, start in zip(turn.conversation.slots, turn.keys,
                                                             turn.rendered.image_starts) if start >= reuse]
        if not wanted:
            return None
        new = {key: image for image, key in wanted if key not in self._registry}
        if new:
            features = self.model.encode_images(self.processor.pixel_values(list(new.values())))  # (U, K, D)
            self._registry.update(zip(new, features))
            self.stats["images_encoded"] += len(new)
        return torch.stack([self._registry[key] for _, key in wanted])

    def _key(self, image: Image) -> str:
        """The image's full SHA-256: the loader's hash of its bytes, or one of its pixels when it has none."""
        if image.sha256 is not None and _FULL_HASH.fullmatch(image.sha256):
            return image.sha256
        if image.pixels is None:
            raise InputError(f"{image.name} has no pixels; load it first (image.load_image)")
        held = self._hashes.get(id(image.pixels))
        if held is None or held[0]() is not image.pixels:
            pixels = image.pixels
            digest = hashlib.sha256(f"{pixels.mode} {pixels.width}x{pixels.height}\n".encode())
            digest.update(pixels.tobytes())
            held = self._hashes[id(pixels)] = (weakref.ref(pixels), digest.hexdigest())
        return held[1]

    def _render(self, conversation: Conversation, *, generation: bool) -> Rendered:
        return self.processor.render(conversation, generation=generation, check_length=False)

    def _crop(self, length: int) -> None:
        self.cache.crop(length)
        self._slots = [(s, k) for s, k in self._slots if s < length]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

"""The shapes world as training data and as an exact benchmark: endless on-the-fly sources for the trainer, a BPE
tokenizer learned from the world's own words, and accuracy per task type scored against the scenes.

Items come from `world.py`; training streams use seeds that never meet the evaluation sets' seeds.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from ..conversation import Conversation, Message, Text
from ..errors import ConfigError
from ..tokenizer import NAMED
from ..train.records import STREAMS, Sample

PREFIX = "world:"
NOMINAL_SIZE = 10_000_000  # an endless stream, sized so that no run ever reaches the end of an "epoch"


class WorldSamples(Sequence):
    """Sample i of `kind`, drawn from its own seed on demand: nothing on disk, nothing repeats."""

    def __init__(self, kind: str, seed: int, *, turns: int = 2):
        from .tasks import MAKERS, WorldConfig

        if kind not in MAKERS:
            raise ConfigError(f"unknown world source {PREFIX}{kind}; expected one of "
                              f"{', '.join(PREFIX + k for k in MAKERS)}")
        self.kind, self.seed, self.maker, self.config = kind, seed, MAKERS[kind], WorldConfig(turns=turns)

    def __len__(self) -> int:
        return NOMINAL_SIZE

    def __getitem__(self, i: int) -> Sample:
        rng = random.Random(f"train/{self.seed}/{self.kind}/{i}")
        if self.kind == "caption":
            item = self.maker(rng, self.config, images=rng.choice((1, 1, 2, 3)))
        else:
            item = self.maker(rng, self.config)
        return Sample(item.conversation, "all", f"{PREFIX}{self.kind}#{i}")


def world_texts(n: int, seed: int = 0) -> Iterator[str]:
    """Every message of n items of each kind: the corpus the default tokenizer learns its merges from."""
    from .tasks import MAKERS

    for kind in MAKERS:
        samples = WorldSamples(kind, seed)
        for i in range(n):
            for message in samples[i].conversation:
                yield message.text


def world_tokenizer(vocab_size: int = 1024, *, image_token: str = "<image>"):
    """A byte-level BPE fitted to the world's words (and our template's), so a sentence costs a few tokens.

    Byte-level: any text still encodes, words the world never uses fall back to bytes. Deterministic: the same
    corpus and settings give the same merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..config import MULTI_IMAGE_SYSTEM
    from ..tokenizer import SPECIAL

    core = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL.values(), image_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    template = [f"{MULTI_IMAGE_SYSTEM}###Human: ###Assistant: ###<Img></Img>"] * 50
    core.train_from_iterator([*template, *world_texts(400)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=[image_token], **SPECIAL)


@dataclass(frozen=True)
class WorldScore:
    accuracy: dict[str, float]  # bison, nlvr2, dialogue turn 1, dialogue turn 2, dialogue (both turns)
    n: dict[str, int]
    rows: list[dict]  # one per scored answer: item, kind, turn, answer, expected, correct


def evaluate_world(chat, *, n: int = 50, seed: int = 1, batch: int = 32, blank: bool = False, params=None,
                   progress=None) -> WorldScore:
    """Accuracy on fresh items: n BISON-style, n NLVR2-style and n two-turn dialogues, scored exactly.

    Turn 2 is asked after the model's own turn-1 answer. With `blank`, every image is replaced by a flat grey
    one: the score of a model that cannot see, which an accuracy must beat to show the model looks.
    """
    from ..config import SamplingParams
    from .tasks import make_eval_set, score

    params = params or SamplingParams(max_new_tokens=64)
    items = [_blanked(i) if blank else i for i in make_eval_set(n, seed)]
    history = {i.id: [] for i in items}
    rows = []
    for turn in range(2):
        asked = [(item, _ask(item, turn, history[item.id])) for item in items if turn < len(item.truths)]
        for start in range(0, len(asked), batch):
            chunk = asked[start:start + batch]
            answers = chat.answer_batch([c for _, c in chunk], params)
            for (item, _), answer in zip(chunk, answers):
                history[item.id].append(answer)
                result = score(item.truths[turn], answer)
                rows.append({"item": item.id, "kind": item.kind, "turn": turn + 1, "answer": answer,
                             "expected": result.expected, "correct": bool(result.correct)})
            if progress:
                progress(len(chunk))
    return WorldScore(*_tally(rows), rows)


def _ask(item, turn: int, answers: list[str]) -> Conversation:
    """The item's conversation up to its `turn`-th question, with the model's own earlier answers."""
    messages, k = [], 0
    for message in item.conversation:
        if message.role == "assistant":
            if k == turn:
                break
            message = Message("assistant", (Text(answers[k]),))
            k += 1
        messages.append(message)
    return Conversation(tuple(messages))


def _blanked(item):
    from PIL import Image as PILImage

    grey = PILImage.new("RGB", (64, 64), (128, 128, 128))
    messages = tuple(Message(m.role, tuple(replace(p, pixels=grey, sha256="blank") if hasattr(p, "pixels") else p
                                           for p in m.parts)) for m in item.conversation)
    return replace(item, conversation=Conversation(messages))


def _tally(rows: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        groups[row["kind"] if row["kind"] != "dialogue" else f"dialogue turn {row['turn']}"].append(row["correct"])
        if row["kind"] == "dialogue":
            groups["dialogue"].append(row["correct"])
    return ({k: sum(v) / len(v) for k, v in sorted(groups.items())}, {k: len(v) for k, v in sorted(groups.items())})


# What the rest of Sparkles finds by name without importing the world: `world:<kind>` sources and `world-bpe`.
STREAMS.register(PREFIX.rstrip(":"), WorldSamples)
NAMED.register("world-bpe", world_tokenizer)

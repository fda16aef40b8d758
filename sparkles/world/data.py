"""The shapes world as training data and as an exact benchmark: endless on-the-fly sources for the trainer, a BPE
tokenizer learned from the world's own words, accuracy per task type scored against the scenes, and the "world"
evaluator that training runs every `eval_every` steps.

Items come from `tasks.py`; training streams use seeds that never meet the evaluation sets' seeds.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from ..conversation import Conversation, Message, Text
from ..errors import ConfigError
from ..tokenizer import NAMED
from ..train.evaluators import EVALUATORS
from ..train.records import STREAMS, Sample

PREFIX = "world:"
NOMINAL_SIZE = 10_000_000  # an endless stream, sized so that no run ever reaches the end of an "epoch"
WORKED_TOKENS = 192  # room for a worked answer: five images described, then the verdict (~130 world-bpe tokens)


class WorldSamples(Sequence):
    """Sample i of `kind`, drawn from its own seed on demand: nothing on disk, nothing repeats."""

    def __init__(self, kind: str, seed: int, *, turns: int = 2):
        from .tasks import FORMS, MAKERS, WorldConfig

        name = kind
        kind, _, option = kind.partition("?")  # "dialogue/worked?turns=3": dialogues of 2 to 3 turns
        kind, _, form = kind.partition("/")  # "bison/worked": the kind, in one of FORMS
        if kind not in MAKERS or (form and form not in FORMS):
            raise ConfigError(f"unknown world source {PREFIX}{name}; expected one of "
                              f"{', '.join(PREFIX + k for k in MAKERS)}, optionally with /{' or /'.join(FORMS)} "
                              "(e.g. world:bison/worked), and for dialogue ?turns=N (e.g. world:dialogue?turns=3)")
        key, _, value = option.partition("=")
        if option and not (kind == "dialogue" and key == "turns" and value.isdigit() and int(value) >= 2):
            raise ConfigError(f"bad option {option!r} of world source {PREFIX}{name}: dialogues take ?turns=N "
                              "with N >= 2 (each dialogue then has 2 to N turns)")
        self.kind, self.seed, self.maker = kind, seed, MAKERS[kind]
        self.config = WorldConfig(turns=turns, form=form or "short")
        self.most_turns = int(value) if option else turns

    def __len__(self) -> int:
        return NOMINAL_SIZE

    def __getitem__(self, i: int) -> Sample:
        rng = random.Random(f"train/{self.seed}/{self.kind}/{i}")
        if self.kind == "caption":
            item = self.maker(rng, self.config, images=rng.choice((1, 1, 2, 3)))
        elif self.most_turns > self.config.turns:  # drawn only then: two-turn streams stay as they always were
            item = self.maker(rng, replace(self.config, turns=rng.randint(self.config.turns, self.most_turns)))
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
    # Accuracy of bison, nlvr2, caption, dialogue turn 1, dialogue turn 2 and dialogue (both turns); and for the
    # captions, "caption precision" and "caption recall" of their objects, micro-averaged over the set.
    accuracy: dict[str, float]
    n: dict[str, int]  # answers per task type; objects claimed (precision) and present (recall) for captions
    rows: list[dict]  # one per scored answer: item, kind, turn, answer, expected, correct; captions: objects


def evaluate_world(chat, *, n: int = 50, seed: int = 1, batch: int = 32, blank: bool = False, params=None,
                   progress=None) -> WorldScore:
    """Accuracy on fresh items: n BISON-style, n NLVR2-style, n two-turn dialogues and n one-image captions,
    scored exactly; caption objects also score per object, so that a near miss shows how near.

    Turn 2 is asked after the model's own turn-1 answer. With `blank`, every image is replaced by a flat grey
    one: the score of a model that cannot see, which an accuracy must beat to show the model looks.
    """
    from ..batch_session import BatchSession
    from ..config import SamplingParams
    from .scoring import object_counts
    from .tasks import make_eval_set, score

    params = params or SamplingParams(max_new_tokens=WORKED_TOKENS)
    items = [blanked(i) if blank else i for i in make_eval_set(n, seed)]
    history = {i.id: [] for i in items}
    rows, session = [], BatchSession(chat)  # turn 2 of a batch resumes from turn 1's cache
    for first in range(0, len(items), batch):
        for turn in range(2):
            chunk = [(item, _ask(item, turn, history[item.id])) for item in items[first:first + batch]
                     if turn < len(item.truths)]
            if not chunk:
                continue
            answers = session.answer_batch([c for _, c in chunk], params)
            for (item, _), answer in zip(chunk, answers):
                history[item.id].append(answer)
                result = score(item.truths[turn], answer)
                rows.append({"item": item.id, "kind": item.kind, "turn": turn + 1, "answer": answer,
                             "expected": result.expected, "correct": bool(result.correct)})
                if item.kind == "caption":  # matched, claimed, present
                    rows[-1]["objects"] = list(object_counts(item.truths[turn], answer))
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


def blanked(item):
    """The item with every image replaced by flat grey: what a model that cannot see is shown."""
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
    accuracy = {k: sum(v) / len(v) for k, v in groups.items()}
    counts = {k: len(v) for k, v in groups.items()}
    objects = [row["objects"] for row in rows if "objects" in row]
    if objects:  # micro-averaged: sums over the set, so a scene of four objects weighs four times one of one
        matched, claimed, present = (sum(column) for column in zip(*objects))
        accuracy |= {"caption precision": matched / claimed if claimed else 0.0,
                     "caption recall": matched / present if present else 0.0}
        counts |= {"caption precision": claimed, "caption recall": present}
    return dict(sorted(accuracy.items())), dict(sorted(counts.items()))


def evaluate_for_training(model, processor, *, n: int, seed: int,
                          max_new_tokens: int = WORKED_TOKENS) -> dict[str, float]:
    """The "world" evaluator of `train.evaluators`: n fresh items of each task type from `seed`, greedy, short and
    batched, on their images and again on grey ones (the blind baseline the first must beat). One flat row for
    metrics.jsonl, every value in [0, 1]: caption, caption_precision, caption_recall, bison, nlvr2,
    dialogue_turn_1, dialogue_turn_2, and each again with "_grey". The model is in eval mode while it runs and is
    given back in the mode it came in, so a training loop can call this between steps.
    """
    from ..config import SamplingParams
    from ..generate import Chat

    chat, params = Chat(model, processor), SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    training = model.training
    model.eval()
    try:
        row: dict[str, float] = {}
        for suffix, blank in (("", False), ("_grey", True)):
            accuracy = evaluate_world(chat, n=n, seed=seed, blank=blank, params=params).accuracy
            row |= {k.replace(" ", "_") + suffix: v for k, v in accuracy.items() if k != "dialogue"}
    finally:
        model.train(training)
    return row


# What the rest of Sparkles finds by name without importing the world: `world:<kind>` sources, `world-bpe` and the
# "world" evaluator that training runs every `eval_every` steps.
STREAMS.register(PREFIX.rstrip(":"), WorldSamples)
NAMED.register("world-bpe", world_tokenizer)
EVALUATORS.register("world", evaluate_for_training)

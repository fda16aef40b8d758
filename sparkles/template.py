"""Conversation templates: how messages become text, before any tokenization.

A template turns a conversation into `Piece`s: runs of text (each marked as carrying loss or not), image slots, and
breaks where tokenization must restart so that a longer conversation renders as a shorter one plus a suffix (the
SparklesChat template restarts only at images, as the original does). Two
templates: SparklesChat's ``###Human:`` / ``###Assistant:`` form (spec §4.1, exact strings), and the tokenizer's
own chat template for modern chat LMs. Tokenization and labels live in `processor.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .conversation import Conversation, Image, Message, Text
from .errors import ConfigError, InputError

LossOn = Literal["all", "last", "none"]

# Private-use characters mark images and assistant spans inside a chat-template string; user text never keeps them.
_IMG, _BEGIN, _QUIET, _END = "\ue000", "\ue001", "\ue002", "\ue003"
_OPEN, _CLOSE = "\ue004", "\ue005"  # around user text in a chat-template string: text typed, not template
_RESERVED = str.maketrans("", "", _IMG + _BEGIN + _QUIET + _END + _OPEN + _CLOSE)


@dataclass(frozen=True)
class Piece:
    text: str = ""
    loss: bool = False  # do these characters' tokens carry loss?
    slot: int | None = None  # an image slot: the index of the image part, in slot order
    brk: bool = False  # tokenization restarts here
    literal: bool = False  # typed text (a message's words): special-token strings in it stay text, never markers


@dataclass(frozen=True)
class SparklesTemplate:
    """``{system}###Human: {user}###Assistant: {answer}###…###Assistant:`` with images as ``IMAGE#k<Img>…</Img>``."""

    system: str = ""
    stop: tuple[str, ...] = ("###",)
    image_prefix: str = "<Img>"
    image_suffix: str = "</Img>"

    def render(self, conversation: Conversation, *, generation: bool, loss_on: LossOn = "all") -> list[Piece]:
        messages, system = _split_system(conversation, self.system)
        last = _last_assistant(messages)
        # Without a system prompt the text still opens with "###": the original trains on "<s>###Human: …" (spec
        # §4.2), so a model trained without one must be prompted the same way.
        pieces = [Piece(system + "###")]
        slot = 0
        for i, message in enumerate(messages):
            if message.role == "user":
                # No tokenization break here: the original tokenizes all text between two images in one call (spec
                # §3.7, §4.4). A SentencePiece tokenizer restarting at "Human" would write "▁Human", not "Human".
                pieces.append(Piece("Human: "))
                slot = _user_parts(pieces, message, slot, self.image_prefix, self.image_suffix)
                pieces.append(Piece("###"))
            else:
                # The space after the colon belongs to the answer: the prompt ends at "Assistant:" (spec §4.1),
                # so the first thing the model must learn to produce is that space.
                pieces.append(Piece("Assistant:"))
                pieces.append(Piece(" " + _text(message) + "###", loss=_supervised(i, last, loss_on)))
        if generation:
            pieces.append(Piece("Assistant:"))
        return pieces


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own Jinja chat template, with our image slots spliced in where the user placed them."""

    tokenizer: object
    system: str = ""
    image_prefix: str = ""
    image_suffix: str = ""
    turn_end: str = ""  # what follows an answer, e.g. <|im_end|>: found once by `for_tokenizer`, not per render

    @staticmethod
    def for_tokenizer(tokenizer, *, system: str = "") -> ChatTemplate:
        return ChatTemplate(tokenizer, system=system, turn_end=_turn_end(tokenizer))

    @property
    def stop(self) -> tuple[str, ...]:
        return (self.turn_end,) if self.turn_end else ()

    def render(self, conversation: Conversation, *, generation: bool, loss_on: LossOn = "all") -> list[Piece]:
        messages, system = _split_system(conversation, self.system)
        last = _last_assistant(messages)
        plain = [{"role": "system", "content": system}] if system else []
        for i, message in enumerate(messages):
            if message.role == "user":
                content = "".join(_IMG if isinstance(p, Image) else _OPEN + p.text.translate(_RESERVED) + _CLOSE
                                  for p in message.parts)
            else:  # marked even without loss: the turn's end is where tokenization restarts
                content = (_BEGIN if _supervised(i, last, loss_on) else _QUIET) + _text(message) + _END
            plain.append({"role": message.role, "content": content})
        try:
            text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # a Jinja template raises whatever it likes; say which template failed
            raise ConfigError(f"the tokenizer's chat template failed: {e}") from None
        return _pieces_from_marked(text, self.turn_end, self.image_prefix, self.image_suffix, conversation)


def _split_system(conversation: Conversation, default: str) -> tuple[tuple[Message, ...], str]:
    messages = conversation.messages
    if messages and messages[0].role == "system":
        return messages[1:], _text(messages[0])
    return messages, default


def _last_assistant(messages: tuple[Message, ...]) -> int:
    return max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)


def _supervised(i: int, last: int, loss_on: LossOn) -> bool:
    return loss_on == "all" or (loss_on == "last" and i == last)


def _text(message: Message) -> str:
    if any(isinstance(p, Image) for p in message.parts):
        raise InputError(f"only user messages may hold images, got one in a {message.role} message")
    return "".join(p.text for p in message.parts).translate(_RESERVED)


def _user_parts(pieces: list[Piece], message: Message, slot: int, prefix: str, suffix: str) -> int:
    for part in message.parts:
        if isinstance(part, Text):
            pieces.append(Piece(part.text.translate(_RESERVED)))
        else:
            name = f"IMAGE#{part.label}" if part.label is not None else ""
            pieces += [Piece(name + prefix), Piece(slot=slot), Piece(suffix)]
            slot += 1
    return slot


def _pieces_from_marked(text: str, turn_end: str, prefix: str, suffix: str, conversation: Conversation) -> list[Piece]:
    """Cut a rendered chat-template string at its markers; an answer's loss runs on over the turn-end token."""
    pieces: list[Piece] = []
    slots = iter(conversation.slots)
    slot, loss, brk, literal, buf = 0, False, False, False, []

    def flush():
        nonlocal brk
        if buf:
            pieces.append(Piece("".join(buf), loss=loss, brk=brk, literal=literal))
            buf.clear()
            brk = False

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == _IMG:
            image = next(slots)
            buf.append((f"IMAGE#{image.label}" if image.label is not None else "") + prefix)
            flush()
            pieces.append(Piece(slot=slot))
            slot += 1
            buf.append(suffix)
        elif ch in (_OPEN, _CLOSE):
            flush()
            literal = ch == _OPEN
        elif ch in (_BEGIN, _QUIET):
            flush()
            loss, literal = ch == _BEGIN, True
        elif ch == _END:
            flush()
            literal = False
            if turn_end and text.startswith(turn_end, i + 1):
                pieces.append(Piece(turn_end, loss=loss))
                i += len(turn_end)
            loss, brk = False, True
        else:
            buf.append(ch)
        i += 1
    flush()
    return pieces


def _turn_end(tokenizer) -> str:
    """What a chat template writes right after an assistant's words, e.g. ``<|im_end|>``; found by rendering a probe."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _END}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.index(_END) + 1:]
    return after.split("\n")[0].strip()

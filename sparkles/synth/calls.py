"""What one teacher call asked for and what came back: the records that the runner makes and the store commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .prompts import Caption


@dataclass(frozen=True)
class Call:
    """One teacher call: its candidates, the first-turn image count of each dialogue asked for, and its prompt."""

    index: int
    id: str  # "<mode>-s<seed>-c<index>": the same call gets the same id in every run with this seed
    candidates: tuple[Caption, ...]
    first_images: tuple[int, ...]
    prompt: str = field(repr=False)
    seed: int = 0  # for the template teacher


@dataclass(frozen=True)
class Reply:
    text: str
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens as the endpoint reports them
    attempts: int = 1
    finish_reason: str | None = None
    model: str = ""
    prompt: str | None = None  # what the teacher was given, when it is not the call's prompt


@dataclass(frozen=True)
class Outcome:
    id: str  # "<call id>-d<k>" for the k-th dialogue, "<call id>-reply" for the reply as a whole
    dialogue: list[dict] | None  # SparklesDialogue messages when accepted
    reason: str = ""
    detail: str = ""
    warnings: tuple[str, ...] = ()
    parsed: Any = None  # the rejected dialogue as parsed, when there was one


@dataclass(frozen=True)
class CallResult:
    call: Call
    reply: Reply | None  # None when the endpoint failed
    outcomes: tuple[Outcome, ...] = ()
    method: str = ""  # how the reply was parsed
    error: str = ""
    seconds: float = 0.0

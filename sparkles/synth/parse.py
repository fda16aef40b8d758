"""Teacher replies made into SparklesDialogue messages: parse (JSON, then Python literals, then the original's regex
fallback, spec §8.5) and check (spec §8.6, made strict). Every failure is a `Rejected` with a stable reason code.

Pure functions: no files, no network. Prompts live in `synth_prompt.py`, the pipeline in `synth.py`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from ..conversation import IMAGE_REF, SLOT, validate
from ..errors import InputError
from ..formats import from_sparkles_dialogue
from .prompts import Caption, DialogueSpec

# Why an output was rejected; the codes are stable, since rejects.jsonl and the report count them.
REASONS = {
    "empty_reply": "the teacher returned no text",
    "unparseable": "neither JSON, a Python literal nor the regex fallback found a dialogue",
    "missing_dialogue": "fewer dialogues than asked for (a reply cut short, usually by max_tokens)",
    "message_format": "a dialogue that is not a list of message objects",
    "message_count": "a dialogue with the wrong number of messages (missing or extra turns)",
    "role_order": "roles that do not alternate user, assistant, starting with the user",
    "missing_image_ids": "a user message without image_ids",
    "unknown_image": "an image id that is not in the captions",
    "not_a_candidate": "an image id from the captions that was not among this call's candidates",
    "repeated_image": "an image shown twice in one dialogue",
    "first_turn_images": "a first user message with an image count outside the allowed ones",
    "later_turn_images": "a later user message with too few or too many new images",
    "image_not_referred": "a shown image that its user message never names as IMAGE#<id>",
    "slot_mismatch": "image slots written by the teacher that do not match image_ids",
    "unknown_reference": "IMAGE#<id> naming an image not shown so far in the dialogue",
    "no_earlier_reference": "a later user message that names none of the earlier images",
    "placeholder": "a placeholder left unfilled, such as the demonstration's '...'",
    "mentions_caption": "a message that speaks of captions (the dialogue must read as if the images were seen)",
    "too_short": "a message with fewer words than allowed",
    "too_long": "a message with more words than allowed",
    "invalid_record": "a record that the SparklesDialogue reader refuses",
    "duplicate": "the same user messages as a dialogue already in the dataset",
    "endpoint_error": "no usable answer from the endpoint within the allowed attempts",
}


class Rejected(InputError):
    """A teacher output that is not kept; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, f"unknown reject reason {reason!r}"
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Parsed:
    dialogues: tuple[Any, ...]  # each a list of message dicts {role, image_ids?, content}, as the teacher wrote them
    method: str  # "json", "literal" (Python repr, as the original's prompt showed) or "regex"


def parse_reply(text: str, *, expected: int) -> Parsed:
    """The dialogues in a teacher reply: a list of dialogues, or one dialogue (a list of messages)."""
    body = _strip_fences(text).strip()
    if not body:
        raise Rejected("empty_reply", "the reply has no text" + (" (only code fences)" if text.strip() else ""))
    for method, load in (("json", json.loads), ("literal", ast.literal_eval)):
        try:
            dialogues = _as_dialogues(load(body))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if dialogues is not None:
            return Parsed(tuple(dialogues), method)
    dialogues = _regex_dialogues(body, expected)
    if not dialogues:
        raise Rejected("unparseable", f"no [{{…}}] dialogue in {len(text)} characters: {text[:60]!r}…")
    return Parsed(tuple(dialogues), "regex")


_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)


def _strip_fences(text: str) -> str:
    """The fenced blocks' contents (several blocks become one list), or the text when it has no fence."""
    if "```" not in text:
        return text
    blocks = [b.strip() for b in _FENCE.findall(text) if b.strip()]
    return "[" + ",".join(blocks) + "]" if len(blocks) > 1 else "".join(blocks)


def _as_dialogues(data: Any) -> list[Any] | None:
    if isinstance(data, Mapping):  # {"dialogues": [...]} or one {"dialogue": [...]}
        data = data.get("dialogues", [data["dialogue"]] if "dialogue" in data else None)
    if not isinstance(data, list) or not data:
        return None
    # [{"dialogue": [...]}, …]: each item wraps its messages
    data = [d.get("dialogue", d.get("messages")) if isinstance(d, Mapping) and {"dialogue", "messages"} & set(d)
            else d for d in data]
    if all(isinstance(m, Mapping) for m in data):
        return [data]  # one dialogue, not wrapped in a list
    return data if all(isinstance(d, list) for d in data) else None


# The original's fallback (spec §8.5), with escapes decoded and the content cut at the next key.
_DIALOGUE = re.compile(r"\[\s*\{.*?\}\s*\]", re.S)
_MESSAGE = re.compile(r"\{.*?\}", re.S)
_CONTENT_KEY = re.compile(r"""['"](?:content|caption)['"]\s*:""")
_NEXT_KEY = re.compile(r"""['"]\s*,\s*['"]\w+['"]\s*:.*""", re.S)
_ROLE = re.compile(r"""['"]role['"]\s*:\s*['"]\w*['"]\s*,?""")
_ESCAPE = re.compile(r"""\\(["'\\/nt])""")


def _regex_dialogues(body: str, expected: int) -> list[list[dict[str, Any]]]:
    found = _DIALOGUE.findall(body)
    if not found and expected == 1:
        found = [body]
    return [[_regex_message(m) for m in _MESSAGE.findall(d)] for d in found]


def _regex_message(text: str) -> dict[str, Any]:
    key = _CONTENT_KEY.search(text)
    rest = text[key.end():].rstrip().removesuffix("}") if key else ""  # up to the message's closing brace
    content = _ROLE.sub("", _NEXT_KEY.sub("'", rest))
    content = content.strip().rstrip(",").strip().strip("'\"")
    content = _ESCAPE.sub(lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), content)
    ids = re.search(r"""['"]image_ids['"]\s*:\s*\[([^\]]*)\]""", text)
    if ids is None:
        return {"role": "assistant", "content": content}
    image_ids = [x.strip().strip("'\"") for x in ids.group(1).split(",") if x.strip()]
    return {"role": "user", "image_ids": image_ids, "content": content}


# Checks

_IMAGE_WORD = re.compile(r"(?i)\bimage\s*#\s*(\w+)")  # "Image #12" -> IMAGE#12, so references are found
_PLACEHOLDER = re.compile(r"^\s*(?:\.\.\.|…)\s*$|IMAGE#(?:image_?id\b|id\b|<|\[|\{)|\{\w*\}"
                          r"|\[(?:insert|your|image|placeholder)[^\]]*\]|<(?:insert|your|placeholder)[^>]*>", re.I)
_CAPTION = re.compile(r"(?i)\bcaptions?\b")


def check_dialogue(messages: Any, *, spec: DialogueSpec, first_images: int | None,
                   candidates: Mapping[str, Caption], known: Container[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One parsed dialogue as SparklesDialogue messages (spec §7.1), with warnings; a failed check raises `Rejected`.

    `first_images` is the count this dialogue was asked for (other allowed counts pass with a warning, as in the
    original); `candidates` are the call's images by id, `known` every captioned id.
    """
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise Rejected("message_format", f"expected a list of message objects, got {messages!r:.80}")
    if len(messages) != 2 * spec.turns:
        raise Rejected("message_count", f"expected {2 * spec.turns} messages ({spec.turns} turns), "
                       f"got {len(messages)}")
    out: list[dict[str, Any]] = []
    warnings: list[str] = []
    shown: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise Rejected("role_order", f"message {i}: expected {'user' if i % 2 == 0 else 'assistant'}, "
                           f"got {role!r}")
        content = _content(message, i, warnings)
        _check_text(content, i, spec.user_words if role == "user" else spec.assistant_words)
        if role == "user":
            ids = _check_images(message, i, spec, first_images, candidates, known, shown, warnings)
            content, ids = _place_slots(content, ids, i)
            _check_references(content, i, shown, ids, candidates)
            out.append({"role": role, "content": content, "images": [
                {"image_id": candidates[k].image_id, "caption": candidates[k].caption} for k in ids]})
            shown += ids
        else:
            _check_references(content, i, shown, [], candidates)
            out.append({"role": role, "content": content})
    try:
        validate(from_sparkles_dialogue({"dialogue": out}), allow_open=False)
    except InputError as e:
        raise Rejected("invalid_record", str(e)) from None
    return out, warnings


def _content(message: Mapping[str, Any], i: int, warnings: list[str]) -> str:
    content = message.get("content")
    if content is None and isinstance(message.get("caption"), str):
        content = message["caption"]  # ~25/200 of the original's replies used this key (spec §8.9)
        warnings.append(f"message {i}: 'caption' used for 'content'")
    if not isinstance(content, str):
        raise Rejected("message_format", f"message {i}: content must be a string, got {content!r:.60}")
    return _IMAGE_WORD.sub(lambda m: f"IMAGE#{m.group(1)}", content.strip())


def _check_text(content: str, i: int, bounds: tuple[int, int]) -> None:
    hit = _PLACEHOLDER.search(content)
    if hit:
        raise Rejected("placeholder", f"message {i}: unfilled {hit.group(0).strip() or 'content'!r}")
    if _CAPTION.search(content):
        raise Rejected("mentions_caption", f"message {i} speaks of captions: {content[:80]!r}")
    words = len(content.replace(SLOT, " ").split())
    if words < bounds[0]:
        raise Rejected("too_short", f"message {i}: {words} words, at least {bounds[0]} expected")
    if words > bounds[1]:
        raise Rejected("too_long", f"message {i}: {words} words, at most {bounds[1]} allowed")


def _check_images(message: Mapping[str, Any], i: int, spec: DialogueSpec, first_images: int | None,
                  candidates: Mapping[str, Caption], known: Container[str], shown: list[str],
                  warnings: list[str]) -> list[str]:
    raw = message.get("image_ids")
    if not isinstance(raw, list) or not raw or not all(isinstance(x, (str, int)) for x in raw):
        raise Rejected("missing_image_ids", f"message {i}: expected a non-empty image_ids list, got {raw!r:.60}")
    ids = [str(x).strip().removeprefix("IMAGE#") for x in raw]
    for k, image_id in enumerate(ids):
        if image_id not in known:
            raise Rejected("unknown_image", f"message {i}: image {image_id!r} is not in the captions")
        if image_id not in candidates:
            raise Rejected("not_a_candidate", f"message {i}: image {image_id} was not among the candidates "
                           f"{', '.join(candidates)}")
        if image_id in shown or image_id in ids[:k]:
            raise Rejected("repeated_image", f"message {i}: image {image_id} is shown a second time")
    n = len(ids)
    if i == 0 and n != first_images:
        if n not in spec.first_images:
            raise Rejected("first_turn_images", f"the first message shows {n} images, expected "
                           f"{first_images or ' or '.join(map(str, spec.first_images))}")
        warnings.append(f"the first message shows {n} images, {first_images} were asked for")
    low, high = spec.later_images
    if i > 0 and not low <= n <= high:
        raise Rejected("later_turn_images", f"message {i} shows {n} new images, expected {low}"
                       + (f" to {high}" if high > low else ""))
    return ids


def _place_slots(content: str, ids: list[str], i: int) -> tuple[str, list[str]]:
    """Put a slot after the first IMAGE#<id> of each shown image; return the text and the ids in slot order."""
    marks = {image_id: f"IMAGE#{image_id}{SLOT}" for image_id in ids}
    if SLOT in content:  # the teacher wrote the slots itself: they must match image_ids one for one
        if content.count(SLOT) != len(ids) or not all(mark in content for mark in marks.values()):
            raise Rejected("slot_mismatch", f"message {i}: {content.count(SLOT)} slots for images {ids}")
        return content, sorted(ids, key=lambda k: content.index(marks[k]))
    found = {}
    for image_id in ids:
        # "IMAGE#" is the left boundary the original lacked; (?!\w) keeps IMAGE#14 from matching IMAGE#1417.
        m = re.search(rf"IMAGE#{re.escape(image_id)}(?!\w)", content)
        if m is None:
            raise Rejected("image_not_referred", f"message {i} shows image {image_id} but never names IMAGE#{image_id}")
        found[image_id] = m.end()
    for end in sorted(found.values(), reverse=True):  # from the back, so earlier positions stay valid
        content = content[:end] + SLOT + content[end:]
    return content, sorted(ids, key=lambda k: found[k])


def _check_references(content: str, i: int, shown: list[str], new: list[str],
                      candidates: Mapping[str, Caption]) -> None:
    refs = IMAGE_REF.findall(content)
    for ref in refs:
        if ref not in shown and ref not in new:
            where = "a candidate not shown yet" if ref in candidates else "not a candidate"
            raise Rejected("unknown_reference", f"message {i} names IMAGE#{ref}, {where}")
    if new and shown and not set(refs) & set(shown):
        raise Rejected("no_earlier_reference", f"message {i} names none of the earlier images "
                       f"{', '.join('IMAGE#' + s for s in shown)}")


def dedup_key(dialogue: list[dict[str, Any]]) -> str:
    """Two dialogues with the same user messages (case and spacing aside) are duplicates."""
    users = [" ".join(m["content"].replace(SLOT, " ").lower().split()) for m in dialogue if m["role"] == "user"]
    return hashlib.sha256("\n".join(users).encode()).hexdigest()[:20]

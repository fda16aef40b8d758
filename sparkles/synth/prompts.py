"""Teacher prompts for SparklesDialogue generation: caption records, demonstration dialogues, and the original's
two prompts (spec §8.3 CC, §8.4 VG), kept verbatim and filled with real JSON instead of Python repr.

Pure functions only: files are read in `synth.py`, replies are parsed and checked in `synth_parse.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..conversation import SLOT
from ..errors import ConfigError, InputError

Mode = Literal["cc", "vg"]
SYSTEM_PROMPT = "You are a helpful assistant."  # the original's system message for the teacher (spec §8.1)

# The original prompts, verbatim (spec §8.3, §8.4). CC slots: demonstrations, candidates. VG slots: demonstration,
# candidates, the first turn's image count as a word. `prompt_template` adapts them to other dialogue shapes.
CC_PROMPT = (
    "Users will interact with a conversational assistant that has advanced capabilities of understanding,"
    " analyzing, and reasoning about images. This includes discussing a variety of real-world concepts, "
    "objects, and entities, generating a range of text materials, seeking advice, guidance, or "
    "assistance, and much more.\n"
    "\n"
    "Below are three illustrative dialogues presented in a JSON format. Each one represents a "
    'self-contained conversation between a "user" and the "assistant" regarding multiple images. Each '
    '"user" message contains an "image_ids" field recording the IDs of newly selected images. The images '
    'are referred to in the "content" field as IMAGE#image_id.\n'
    "```json\n"
    "{}\n"
    "```\n"
    "\n"
    'Please note that the specific "image_ids" and "content" in the JSON above are for illustrative '
    "purposes only. The actual candidate images are shown below delimited by triple quotes, each "
    "accompanied by an image ID and a caption. Avoid using phrases similar to 'caption' and 'description'"
    " in your dialogue as if the user and the assistant have visual capabilities.\n"
    "```json\n"
    "{}\n"
    "```\n"
    "\n"
    "Each dialogue consists of four messages:\n"
    "1. A user examines all candidate images, selects highly relevant ones, and sends a reasonable and "
    "creative message to the assistant.\n"
    "2. Once the images are provided, the assistant thoroughly perceives and comprehends them, responding"
    " with highly helpful and exceptionally detailed answers that provide comprehensive reasoning.\n"
    "3. Considering the past dialogue, the user chooses another candidate image for further inquiry. The "
    "user should refer to both the newly selected image and those mentioned earlier in the same dialogue.\n"
    "4. The assistant provides a highly helpful and exceptionally detailed answer providing comprehensive"
    " reasoning regarding the visual content of the images.\n"
    "\n"
    "The following are three independent dialogues between the user and the assistant, adhering to the "
    "given JSON format. In this format, the first message in the three dialogues includes 1, 2, and 3 "
    "image ids respectively.\n"
    'Make sure to formulate accurate and diverse "content" that does not strictly follow the illustrative'
    ' dialogues. And remember to develop the last "content" even though it is shown as "..." in the JSON '
    "format provided above."
)
VG_PROMPT = (
    "Users will interact with a conversational assistant that has advanced capabilities of understanding,"
    " analyzing, and reasoning about images. This includes discussing a variety of real-world concepts, "
    "objects, and entities, generating a range of text materials, seeking advice, guidance, or "
    "assistance, and much more.\n"
    "\n"
    "Below are an illustrative dialogue presented in a JSON format. The dialogue represents a meaningful "
    'conversation between a "user" and the "assistant" regarding multiple images. Each "user" message '
    'contains an "image_ids" field recording the IDs of newly selected images. The images are referred to'
    ' in the "content" field as IMAGE#image_id.\n'
    "```json\n"
    "{}\n"
    "```\n"
    "Please note that the user contents in the JSON above may be a counterexample that reveals the "
    "content of images and can be answered without looking at the images. Please make sure not to reveal "
    "the content of the images or describe the images in the user messages in the conversation that "
    "follows.\n"
    "\n"
    'Please note that the specific "image_ids" and "content" in the JSON above are for illustrative '
    "purposes only. The actual candidate images are shown below delimited by triple quotes, each "
    "accompanied by an image ID and a caption. Avoid using phrases similar to 'caption' and 'description'"
    " in your dialogue as if the user and the assistant have visual capabilities.\n"
    "```json\n"
    "{}\n"
    "```\n"
    "Each dialogue consists of four messages:\n"
    "1. A user examines all candidate images, selects {} highly relevant images, and sends a reasonable "
    "and creative message to the assistant.\n"
    "2. Once the images are provided, the assistant thoroughly perceives and comprehends them, responding"
    " with highly helpful and exceptionally detailed answers that provide comprehensive reasoning "
    "regarding the visual content of the images.\n"
    "3. Considering the past dialogue, the user chooses other candidate images for further inquiry. The "
    "user should refer to both the newly selected images and those mentioned earlier in the same "
    "dialogue.\n"
    "4. The assistant provides a highly helpful and exceptionally detailed answer providing comprehensive"
    " reasoning regarding the visual content of the images.\n"
    "\n"
    "The following is a dialogue between the user and the assistant, adhering to the given JSON format.\n"
    'Make sure to formulate accurate and diverse "content" that does not follow the illustrative '
    'dialogues. And remember to develop the last "content" even though it is shown as "..." in the JSON '
    "format provided above."
)

@dataclass(frozen=True)
class Caption:
    """One image the teacher may choose: its id, its caption, and (from the shapes world) its scene."""

    image_id: str | int  # kept with its type: CC ids are strings, VG ids ints (spec §7.1)
    caption: str
    scene: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # {"background", "objects"}
    file: str | None = None  # the image file, relative to the captions file's folder or to --images

    @property
    def key(self) -> str:
        """The id as text writes it, IMAGE#<key>: references are IMAGE#(\\w+), so other characters become '_'."""
        return _NOT_WORD.sub("_", str(self.image_id))

    @property
    def shown_id(self) -> str | int:
        """The id the teacher sees: the original id (an int stays an int), or the key when they differ."""
        return self.image_id if self.key == str(self.image_id) else self.key


@dataclass(frozen=True)
class DialogueSpec:
    """The dialogues a call asks for, and the bounds the checks hold them to."""

    mode: Mode = "cc"  # cc: one dialogue per `first_images` entry in each call; vg: one dialogue per call
    turns: int = 2  # user-assistant exchanges per dialogue (the original: 2)
    first_images: tuple[int, ...] = (1, 2, 3)  # images in the first user message (vg: cycled over calls)
    later_images: tuple[int, int] = (1, 1)  # fewest and most new images in each later user message
    candidates: int = 9  # candidate images shown per call
    user_words: tuple[int, int] = (3, 250)  # accepted words per user message
    assistant_words: tuple[int, int] = (5, 2000)  # accepted words per assistant message

    def __post_init__(self):
        if self.mode not in ("cc", "vg"):
            raise ConfigError(f"mode must be 'cc' or 'vg', got {self.mode!r}")
        if self.turns < 1 or not self.first_images or min(self.first_images) < 1:
            raise ConfigError(f"need turns >= 1 and first-turn image counts >= 1, got turns={self.turns}, "
                              f"first_images={self.first_images}")
        if self.mode == "cc" and len(self.first_images) < 2:
            raise ConfigError("cc mode asks for one dialogue per first-turn image count in each call, so it needs "
                              f"at least two counts (the original: 1,2,3), got {self.first_images}; or use vg mode")
        low, high = self.later_images
        if not 1 <= low <= high:
            raise ConfigError(f"later-turn images must be 1 <= least <= most, got {low}-{high}")
        need = max(self.first_images) + (self.turns - 1) * low
        if need > self.candidates:
            raise ConfigError(f"a dialogue needs up to {need} distinct images but a call shows only "
                              f"{self.candidates} candidates; raise --candidates")
        for name, (a, b) in (("user", self.user_words), ("assistant", self.assistant_words)):
            if not 0 <= a <= b:
                raise ConfigError(f"{name} word bounds must be 0 <= least <= most, got {a}-{b}")

    @property
    def per_call(self) -> int:
        return len(self.first_images) if self.mode == "cc" else 1


MODES = {"cc": DialogueSpec(), "vg": DialogueSpec("vg", first_images=(2, 3), later_images=(1, 2), candidates=4)}


# Captions

_NOT_WORD = re.compile(r"\W")


def parse_captions(data: Any, source: str) -> tuple[Caption, ...]:
    """Caption records from a captions file's JSON: a list of {image_id, caption, scene?, file?}, the original's
    CC file {"annotations": [{image_id, caption}]} or its VG file (SVIT {image_id, conversations}) (spec §7.8)."""
    if isinstance(data, Mapping) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise InputError(f"{source}: expected a list of caption records or {{'annotations': [...]}}, "
                         f"got {type(data).__name__}")
    captions: dict[str, Caption] = {}
    for i, record in enumerate(data):
        caption = _caption(record, f"{source}[{i}]")
        if caption.key in captions:
            raise InputError(f"{source}[{i}]: image_id {caption.image_id!r} appears twice (as IMAGE#{caption.key}); "
                             "ids must be unique, also after characters other than letters, digits and _ become _")
        captions[caption.key] = caption
    if not captions:
        raise InputError(f"{source} holds no captions")
    return tuple(captions.values())


def _caption(record: Any, where: str) -> Caption:
    if not isinstance(record, Mapping) or "image_id" not in record:
        raise InputError(f"{where}: expected {{'image_id': …, 'caption': …}}, got {record!r:.80}")
    image_id = record["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or not str(image_id).strip():
        raise InputError(f"{where}: image_id must be a non-empty string or an int, got {image_id!r}")
    text = record.get("caption")
    if text is None and "conversations" in record:  # SVIT: the second value of the one conversation
        try:
            text = record["conversations"][0]["content"][1]["value"]
        except (LookupError, TypeError):
            raise InputError(f"{where}: an SVIT record needs conversations[0].content[1].value") from None
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: expected a non-empty caption string, got {text!r:.80}")
    scene, file = record.get("scene"), record.get("file")
    if scene is not None and not isinstance(scene, Mapping):
        raise InputError(f"{where}: scene must be an object {{'background', 'objects'}}, got {type(scene).__name__}")
    if file is not None and not isinstance(file, str):
        raise InputError(f"{where}: file must be a path string, got {file!r:.80}")
    return Caption(image_id, text.strip(), scene, file)


# Demonstrations

# Our own illustrative dialogues (first user message with 1, 2 or 3 images, then 1); `--demos` replaces them with
# a SparklesDialogue file, such as the original's 50-dialogue pools. Their last answer is shown as "..." anyway.
_DEMOS = (
    (["2043"], "My parents want a quiet weekend. Would the lakeside village in IMAGE#2043 suit them, and what "
     "could they do there?", "IMAGE#2043 looks ideal for a slow weekend: the wooden jetty invites a morning "
     "walk by the water, the small boats suggest rentals for a gentle paddle, and the cafe terraces along the "
     "shore are perfect for long lunches.", ["5170"], "If it rained like in IMAGE#5170, which of the plans for "
     "IMAGE#2043 would still work?"),
    (["118"], "Write a four-line poem that captures the mood of IMAGE#118.", "Grey light on the harbour wall, "
     "/ nets folded, gulls that call; / the boats of IMAGE#118 rest in a row, / waiting for the tide to go.",
     ["9321"], "Now write a second verse in which the market in IMAGE#9321 wakes up near the harbour of IMAGE#118."),
    (["318", "4471"], "Write a short scene in which the baker from IMAGE#318 meets the cyclist in IMAGE#4471 "
     "before sunrise.", "The ovens of IMAGE#318 are already glowing when the cyclist from IMAGE#4471 leans her "
     "bike against the window, still breathing hard from the climb. The baker waves her in with flour on his "
     "hands and a tray of warm rolls.", ["902"], "The cyclist rides on to the market in IMAGE#902. How might "
     "she describe it to the baker of IMAGE#318?"),
    (["56", "7712"], "I can adopt only one of the dogs in IMAGE#56 and IMAGE#7712, and I live in a small flat. "
     "Which one fits better?", "The small terrier in IMAGE#56 is the better fit: it is compact, looks relaxed "
     "indoors and needs less space than the large shepherd in IMAGE#7712, which appears built for long runs "
     "across open fields.", ["1840"], "Would the park in IMAGE#1840 give the dog from IMAGE#7712 enough exercise?"),
    (["77", "1290", "3655"], "Which of the rooms in IMAGE#77, IMAGE#1290 and IMAGE#3655 would make the best "
     "home office, and why?", "IMAGE#1290 is the strongest choice: its large window gives daylight across the "
     "desk, while IMAGE#77 is dominated by a bed and IMAGE#3655 has a dark corner that would need lamps all day.",
     ["2488"], "Could the plants in IMAGE#2488 make the office in IMAGE#1290 more pleasant to work in?"),
    (["640", "5028", "83"], "Plan a one-day route through the places in IMAGE#640, IMAGE#5028 and IMAGE#83 for "
     "a visitor who loves architecture.", "Start early at the cathedral in IMAGE#640 while the light is soft, "
     "walk to the glass tower of IMAGE#5028 for lunch on its terrace, and end at the old bridge of IMAGE#83, "
     "whose arches glow at sunset.", ["3391"], "Where would the museum in IMAGE#3391 fit into the route through "
     "IMAGE#640 and IMAGE#83?"),
)


def builtin_demos() -> tuple[list[dict[str, Any]], ...]:
    """The built-in demonstrations, as the teacher sees them (see `demo_messages`)."""
    out = []
    for first, ask, answer, later, follow_up in _DEMOS:
        out.append([{"role": "user", "image_ids": list(first), "content": ask},
                    {"role": "assistant", "content": answer},
                    {"role": "user", "image_ids": list(later), "content": follow_up},
                    {"role": "assistant", "content": "..."}])
    return tuple(out)


def demo_messages(record: Any, where: str) -> list[dict[str, Any]]:
    """A SparklesDialogue item as the teacher sees it: `image_ids` before `content` (choosing images comes before
    writing), slots removed, and the last answer shown as "..." (spec §8.2). The record is not changed."""
    dialogue = record.get("dialogue") if isinstance(record, Mapping) else None
    if not isinstance(dialogue, list) or not dialogue:
        raise InputError(f"{where}: a demonstration needs a non-empty 'dialogue' list, got {record!r:.80}")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(dialogue):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise InputError(f"{where}: dialogue[{i}] needs a role (user/assistant) and a content string")
        shown = {"role": role}
        if role == "user":
            shown["image_ids"] = [str(image["image_id"]) for image in message.get("images") or []]
        out.append(shown | {"content": content.replace(SLOT, "")})
    if out[0]["role"] != "user" or not out[0]["image_ids"]:
        raise InputError(f"{where}: a demonstration must open with a user message that shows images")
    last = max(i for i, m in enumerate(out) if m["role"] == "assistant") if len(out) > 1 else None
    if last is not None:
        out[last] = {"role": "assistant", "content": "..."}
    return out


# Prompts

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_ITEMS = re.compile(r"Each dialogue consists of four messages:\n((?:\d\. .*\n){4})")


def number_word(n: int) -> str:
    return _WORDS[n] if 0 <= n < len(_WORDS) else str(n)


def prompt_template(spec: DialogueSpec) -> str:
    """The original prompt for `spec.mode`, unchanged for the original's shapes (CC: 2 turns, first turns of 1, 2
    and 3 images, then 1; VG: 2 turns), else with the counts and the list of messages rewritten to match."""
    text = CC_PROMPT if spec.mode == "cc" else VG_PROMPT
    items = _ITEMS.search(text).group(1).splitlines()
    if spec.mode == "cc" and spec.later_images != (1, 1):
        items[2] = _ITEMS.search(VG_PROMPT).group(1).splitlines()[2]  # "chooses other candidate images"
    steps = items[:2] + items[2:] * (spec.turns - 1)
    listed = "".join(f"{k}. {step.split('. ', 1)[1]}\n" for k, step in enumerate(steps, start=1))
    text = _ITEMS.sub(lambda _: f"Each dialogue consists of {number_word(len(steps))} messages:\n" + listed, text)
    if spec.mode == "cc" and spec.first_images != (1, 2, 3):
        n, counts = number_word(len(spec.first_images)), [str(c) for c in spec.first_images]
        listing = " and ".join(counts) if len(counts) == 2 else ", ".join(counts[:-1]) + ", and " + counts[-1]
        for old, new in (("Below are three", f"Below are {n}"), ("are three independent", f"are {n} independent"),
                         ("in the three dialogues includes 1, 2, and 3 image", f"in the {n} dialogues includes "
                          f"{listing} image")):
            assert old in text, f"the CC prompt lost the phrase {old!r}"
            text = text.replace(old, new)
    return text


def build_prompt(spec: DialogueSpec, demos: Sequence[list[dict[str, Any]]], *, candidates: Sequence[Caption],
                 first_images: Sequence[int]) -> str:
    """The filled prompt for one call: `demos` (one per dialogue asked for), then the candidates, as JSON."""
    shown = [{"image_id": c.shown_id, "caption": c.caption} for c in candidates]
    if spec.mode == "cc":
        return prompt_template(spec).format(_json_lines(demos), _json_lines(shown))
    # As the original shows it (spec §8.4): a list of dialogues holding the one demonstration, [[{…}, …]], with its
    # image ids as ints, like the SVIT candidates' (it calls int() on them).
    demo = [m | {"image_ids": [_as_int(i) for i in m["image_ids"]]} if "image_ids" in m else m for m in demos[0]]
    return prompt_template(spec).format(_json_lines([demo]), _json_lines(shown), number_word(first_images[0]))


def _as_int(image_id: str | int) -> str | int:
    """A decimal id as the int it spells; anything else (a CC id with letters, "007") unchanged."""
    return int(image_id) if isinstance(image_id, str) and image_id.isdigit() and str(int(image_id)) == image_id \
        else image_id


def _json_lines(items: Sequence[Any]) -> str:
    """A JSON list with one item per line: valid JSON (the original showed Python repr), still compact."""
    return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]"

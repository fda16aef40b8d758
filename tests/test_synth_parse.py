"""SparklesDialogue generation, the pure parts: verbatim prompts, reply parsing, the checks and their reasons,
caption files, the template teacher's exact answers, the rate limiter and the report's numbers."""

import copy
import hashlib
import json
import re

import pytest

from sparkles.conversation import SLOT
from sparkles.errors import ConfigError, InputError
from sparkles.synth.parse import REASONS, Rejected, check_dialogue, dedup_key, parse_reply
from sparkles.synth.prompts import (
    MODES,
    Caption,
    DialogueSpec,
    build_prompt,
    builtin_demos,
    demo_messages,
    parse_captions,
    prompt_template,
)
from sparkles.synth.report import dataset_stats, histogram, svg_bars
from sparkles.synth.run import RateLimiter
from sparkles.synth.template import check_scenes, template_reply

# sha256 of the spec §8.3 / §8.4 prompt texts, copied from the spec: the prompts must stay verbatim.
CC_SHA = "7be7484019ffe2388b3237129cc6e6d8e0f478a27a53124e38cb190cadd49078"
VG_SHA = "18a283048b6fee4001cfd13a5ad7181146bd8f7495b362fcd4b08b5a13e2e8e6"

CAPTIONS = {f"{k}": Caption(f"{k}", f"a photo number {k}") for k in (7, 14, 1417, 21, 22, 23, 30, 31, 32, 99)}
KNOWN = set(CAPTIONS) | {"500"}
CC = MODES["cc"]


def dialogue(first=("14",), later=("21",), *, ask=None, follow=None):
    names = " and ".join(f"IMAGE#{i}" for i in first)
    return [{"role": "user", "image_ids": list(first), "content": ask or f"What do {names} have in common?"},
            {"role": "assistant", "content": f"Both {names} show a calm street with people walking home."},
            {"role": "user", "image_ids": list(later),
             "content": follow or f"Would IMAGE#{later[0]} fit next to IMAGE#{first[0]} in an album?"},
            {"role": "assistant", "content": f"Yes, IMAGE#{later[0]} shares the evening light of IMAGE#{first[0]}."}]


def check(messages, first=1, spec=CC):
    return check_dialogue(messages, spec=spec, first_images=first, candidates=CAPTIONS, known=KNOWN)


def test_the_prompts_are_the_originals_verbatim_and_filled_with_json():
    assert hashlib.sha256(prompt_template(MODES["cc"]).encode()).hexdigest() == CC_SHA
    assert hashlib.sha256(prompt_template(MODES["vg"]).encode()).hexdigest() == VG_SHA
    demos = builtin_demos()
    assert [len(d[0]["image_ids"]) for d in demos] == [1, 1, 2, 2, 3, 3]
    assert all(d[-1]["content"] == "..." and list(d[0]) == ["role", "image_ids", "content"] for d in demos)
    candidates = [Caption(i, f"caption {i}") for i in (3, 4, 5, 6)]
    prompt = build_prompt(MODES["vg"], [demos[2]], candidates=candidates, first_images=[2])
    shown, listed = (json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", prompt, re.S))
    assert listed[0] == {"image_id": 3, "caption": "caption 3"}  # an int id stays an int
    # VG shows its one demonstration as the original does: inside a list of dialogues, [[{…}]], ids as ints.
    assert prompt.count("```json\n[\n[{") == 1 and len(shown) == 1
    assert shown[0] == [m | {"image_ids": [int(i) for i in m["image_ids"]]} if "image_ids" in m else m
                        for m in demos[2]]
    assert all(isinstance(i, int) for m in shown[0] for i in m.get("image_ids", []))
    assert "selects two highly relevant images" in prompt


def test_the_prompt_follows_other_dialogue_shapes():
    text = prompt_template(DialogueSpec(turns=3, first_images=(1, 2), later_images=(1, 2)))
    assert "Each dialogue consists of six messages:\n1. A user examines" in text
    assert "\n5. Considering the past dialogue, the user chooses other candidate images" in text
    assert "Below are two illustrative" in text and "includes 1 and 2 image ids respectively" in text
    with pytest.raises(ConfigError, match="at least two counts"):
        DialogueSpec(first_images=(2,))
    with pytest.raises(ConfigError, match="raise --candidates"):
        DialogueSpec("vg", first_images=(3,), later_images=(2, 2), candidates=4)


def test_a_demonstration_file_record_is_shown_without_slots_and_is_not_changed():
    record = {"dialogue": [{"role": "user", "content": f"Look at IMAGE#5{SLOT}.", "images": [{"image_id": 5}]},
                           {"role": "assistant", "content": "A red door."}]}
    before = copy.deepcopy(record)
    assert demo_messages(record, "demo") == [{"role": "user", "image_ids": ["5"], "content": "Look at IMAGE#5."},
                                             {"role": "assistant", "content": "..."}]
    assert record == before
    with pytest.raises(InputError, match="open with a user message that shows images"):
        demo_messages({"dialogue": [{"role": "user", "content": "hi"}]}, "demo")


def test_replies_parse_as_json_python_repr_or_by_the_fallback():
    dialogues = [dialogue(), dialogue(("22", "23"), ("30",))]
    fenced = "Here they are:\n```json\n" + json.dumps(dialogues) + "\n```"
    assert parse_reply(fenced, expected=2).method == "json"
    assert parse_reply(json.dumps(dialogues[0]), expected=1).dialogues == (dialogues[0],)  # one bare dialogue
    assert parse_reply(repr(dialogues), expected=2).method == "literal"
    wrapped = json.dumps({"dialogues": [{"dialogue": d} for d in dialogues]})
    assert parse_reply(wrapped, expected=2).dialogues == tuple(dialogues)
    # Cut short inside the second dialogue: the fallback keeps the first whole one.
    text = json.dumps(dialogues).replace("calm street", 'calm\\nstreet')
    cut = text[: text.index('"30"')]
    parsed = parse_reply(cut, expected=2)
    assert parsed.method == "regex" and len(parsed.dialogues) == 1
    assert parsed.dialogues[0][0] == dialogues[0][0] and "calm\nstreet" in parsed.dialogues[0][1]["content"]
    for text, reason in (("", "empty_reply"), ("```json\n```", "empty_reply"), ("I cannot help.", "unparseable")):
        with pytest.raises(Rejected) as caught:
            parse_reply(text, expected=3)
        assert caught.value.reason == reason


def test_a_good_dialogue_gets_its_slots_and_images():
    out, warnings = check(dialogue(("14", "1417"), ("21",), ask="Is IMAGE#1417 older than IMAGE#14?"), first=2)
    assert out[0]["content"] == f"Is IMAGE#1417{SLOT} older than IMAGE#14{SLOT}?"
    assert [i["image_id"] for i in out[0]["images"]] == ["1417", "14"]  # slot order, not image_ids order
    assert out[0]["images"][0]["caption"] == "a photo number 1417" and warnings == []
    assert out[2]["content"].startswith(f"Would IMAGE#21{SLOT} fit") and "images" not in out[1]
    _, warnings = check(dialogue(), first=3)  # another allowed count: kept with a warning, as the original did
    assert warnings == ["the first message shows 1 images, 3 were asked for"]


def _set(messages, i, **changes):
    messages = copy.deepcopy(messages)
    messages[i].update(changes)
    return messages


BAD = {
    "message_format": [dict(m) for m in dialogue()][:3] + ["not a message"],
    "message_count": dialogue()[:2],
    "role_order": _set(dialogue(), 1, role="user"),
    "missing_image_ids": _set(dialogue(), 2, image_ids=[]),
    "unknown_image": _set(dialogue(), 0, image_ids=["404"]),
    "not_a_candidate": _set(dialogue(), 0, image_ids=["500"], content="What is in IMAGE#500?"),
    "repeated_image": dialogue(("14",), ("14",)),
    "first_turn_images": dialogue(("14", "22", "23", "30")),
    "later_turn_images": dialogue(("14",), ("21", "22")),
    "image_not_referred": _set(dialogue(), 0, content="What do you see in this picture?"),
    "slot_mismatch": _set(dialogue(), 0, content=f"What is in IMAGE#7{SLOT}?"),
    "unknown_reference": _set(dialogue(), 1, content="IMAGE#21 is lovely, and so is the rest of the street."),
    "no_earlier_reference": _set(dialogue(), 2, content="And what about IMAGE#21 on its own?"),
    "placeholder": _set(dialogue(), 3, content="..."),
    "mentions_caption": _set(dialogue(), 1, content="The caption of IMAGE#14 says it is a street at dusk."),
    "too_short": _set(dialogue(), 1, content="IMAGE#14: yes."),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_dialogue_is_rejected_with_its_reason(reason):
    with pytest.raises(Rejected) as caught:
        check(BAD[reason])
    assert caught.value.reason == reason and reason in REASONS


def test_word_bounds_and_placeholders_of_the_demonstrations():
    with pytest.raises(Rejected, match="too_long"):
        check(dialogue(), spec=DialogueSpec(assistant_words=(5, 8)))
    with pytest.raises(Rejected, match="placeholder"):
        check(_set(dialogue(), 0, content="Compare IMAGE#image_id with IMAGE#14."))
    assert dedup_key(check(dialogue())[0]) == dedup_key(check(_set(dialogue(), 1, content="Other words, same "
                                                                   "question about IMAGE#14."))[0])


def test_caption_files_in_every_form():
    plain = [{"image_id": "w0-001", "caption": " a red circle ", "file": "images/w0-001.png"}]
    (caption,) = parse_captions(plain, "c.json")
    assert caption.key == "w0_001" and caption.shown_id == "w0_001" and caption.caption == "a red circle"
    assert parse_captions({"annotations": [{"image_id": "2", "caption": "x"}]}, "cc.json")[0].shown_id == "2"
    svit = [{"image_id": 61, "conversations": [{"content": [{"value": "Describe."}, {"value": "A harbour."}]}]}]
    assert parse_captions(svit, "vg.json")[0] == Caption(61, "A harbour.")
    for data, message in (([{"image_id": "1", "caption": "a"}, {"image_id": 1, "caption": "b"}], "appears twice"),
                          ([{"image_id": True, "caption": "a"}], "image_id must be"),
                          ([{"image_id": "1", "caption": ""}], "non-empty caption"), ({"x": 1}, "expected a list")):
        with pytest.raises(InputError, match=message):
            parse_captions(data, "bad.json")


OBJECTS = [[{"shape": "circle", "color": "red", "size": "big", "x": 0.7, "y": 0.5},
            {"shape": "square", "color": "blue", "size": "small", "x": 0.2, "y": 0.5}],
           [{"shape": "circle", "color": "red", "size": "small", "x": 0.5, "y": 0.5}],
           [{"shape": "triangle", "color": "green", "size": "big", "x": 0.5, "y": 0.5}] * 3,
           [{"shape": "cross", "color": "red", "size": "big", "x": 0.1, "y": 0.1}]]
SCENES = [Caption(f"s{k}", "shapes", {"background": {"kind": "plain"}, "objects": o}) for k, o in enumerate(OBJECTS)]


def test_the_template_teacher_answers_exactly():
    spec = DialogueSpec(first_images=(1, 2), candidates=4)
    texts = {template_reply(SCENES, (1, 2), spec=spec, seed=seed) for seed in range(40)}
    assert len(texts) > 10  # varied questions and images
    counts = {c.key: len(c.scene["objects"]) for c in SCENES}
    for text in texts:
        for messages in json.loads(text):
            out, _ = check_dialogue(messages, spec=spec, first_images=len(messages[0]["image_ids"]),
                                    candidates={c.key: c for c in SCENES}, known=set(counts))
            answer = out[1]["content"]
            if "holds the most" in answer:  # the image with the most objects wins, with its count
                winner = re.match(r"IMAGE#(\w+)", answer).group(1)
                assert counts[winner] == max(counts[i] for i in messages[0]["image_ids"])
            if out[0]["content"].startswith("Going from left to right") and messages[0]["image_ids"] == ["s0"]:
                assert answer.endswith("a small blue square and a big red circle.")
    with pytest.raises(InputError, match="1 of 2 captions in c.json have no 'scene'"):
        check_scenes([SCENES[0], Caption("x", "no scene")], "c.json")


def test_the_rate_limiter_spaces_call_starts():
    now, slept = [0.0], []
    limiter = RateLimiter(120, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        limiter.wait()
    assert slept == [0.5, 1.0]
    RateLimiter(0, sleep=slept.append).wait()
    assert len(slept) == 2


def test_statistics_and_plots():
    records = [{"dialogue": check(dialogue())[0]}, {"dialogue": check(dialogue(("22", "23"), ("30",)), first=2)[0]}]
    stats = dataset_stats(records)
    assert stats["dialogues"] == 2 and (stats["images_unique"], stats["images_total"]) == (5, 5)
    assert stats["images_per_turn"] == {1: {1: 1, 2: 1}, 2: {1: 2}} and stats["images_per_dialogue"] == {2: 1, 3: 1}
    assert stats["user_words"]["min"] == 6 and stats["verb_nouns"] is None
    assert sum(c for _, _, c in histogram(list(range(100)))) == 100 and len(histogram(list(range(1000)))) <= 40
    svg = svg_bars(["1", "2"], [3, 0], title="t <&>")
    assert svg.startswith("<svg") and "t &lt;&amp;&gt;" in svg and svg.count("<rect") == 2

"""The shapes world's tasks: deterministic items, truths that match the scenes, the original schemas on disk."""

import io
import json
import random
from pathlib import Path

import pytest

from sparkles.cli import main
from sparkles.conversation import Conversation, Message, to_markup, validate
from sparkles.errors import ConfigError
from sparkles.formats import from_sparkles_dialogue, to_sparkles_dialogue
from sparkles.world import scoring, shapes
from sparkles.world.sets import SETS, generate
from sparkles.world.tasks import (
    MAKERS,
    WorldConfig,
    make_bison,
    make_dialogue,
    make_eval_set,
    make_nlvr2,
    score,
)

ALL = [(kind, seed) for kind in MAKERS for seed in range(40)]


def pixels(item):
    return [image.pixels.tobytes() for image in item.conversation.images]


@pytest.mark.parametrize("kind", list(MAKERS))
def test_the_same_seed_gives_the_same_item(kind):
    a, b = (MAKERS[kind](random.Random(7)) for _ in range(2))
    assert [to_markup(m.parts) for m in a.conversation] == [to_markup(m.parts) for m in b.conversation]
    assert a.truths == b.truths and pixels(a) == pixels(b)
    assert [i.sha256 for i in a.conversation.images] == [i.sha256 for i in b.conversation.images]


def test_every_item_is_a_valid_conversation_whose_answers_score_as_correct():
    for kind, seed in ALL:
        item = MAKERS[kind](random.Random(seed))
        validate(item.conversation, allow_open=False)
        assert [i.label for i in item.conversation.images] == [str(k + 1) for k in range(len(item.scenes))]
        answers = [m for m in item.conversation if m.role == "assistant"]
        assert len(answers) == len(item.truths) == len(item.turns)
        for message, truth in zip(answers, item.truths):
            assert message.text == truth.answer and score(truth, truth.answer).correct


def test_dialogues_bring_new_images_in_later_turns_and_name_them_where_they_appear():
    for seed in range(100):
        item = make_dialogue(random.Random(seed), WorldConfig(turns=3))
        assert 2 <= len(item.scenes) <= 5 and len(item.turns) == 3
        assert item.turns[0].images and item.turns[1].images
        for turn in item.turns:
            for image in turn.images:  # word-level: each slot right where the text names it
                assert f"IMAGE#{image.label}<Img><ImageHere></Img>" in to_markup(turn.parts)


def _attr(claims):
    return {k: next(iter(claims[k])) for k in ("color", "shape") if claims[k]}


def test_truths_match_a_recount_from_the_scenes():
    seen = set()
    for seed in range(300):
        item = make_dialogue(random.Random(seed))
        scenes, shown, attr = dict(zip("12345", item.scenes)), [], {}
        for turn, truth in zip(item.turns, item.truths):
            text = to_markup(turn.parts)
            shown += [i.label for i in turn.images]
            claims = scoring.read_claims(text)
            attr = attr if text.startswith("And in") else _attr(claims)
            asked = shown if "we discussed" in text else sorted(claims["image"])
            counts = {b: shapes.count(scenes[b], **attr) for b in asked}
            seen.add(truth.kind)
            if truth.kind in ("count", "total"):
                assert truth.count == sum(shapes.count(scenes[b], **attr) for b in truth.images), text
            elif truth.kind == "most":
                assert max(counts.values()) == counts[truth.images[0]] == truth.count, text
                assert list(counts.values()).count(truth.count) == 1
            elif truth.kind == "which":
                assert [b for b in asked if counts[b]] == [truth.images[0]], text
            elif truth.kind == "odd":
                kinds = [scenes[b].background.kind for b in asked]
                assert kinds.count(scenes[truth.images[0]].background.kind) == 1 and len(set(kinds)) == 2
            elif truth.kind in ("color", "shape"):
                # `attr` is the shape asked about for a colour, or the colour for a shape
                match = [o for o in scenes[truth.images[0]].objects if all(getattr(o, k) == v for k, v in attr.items())]
                assert len(match) == 1 and getattr(match[0], truth.kind) == truth.words[0], text
            elif truth.kind == "caption":
                assert truth.words == tuple(shapes.caption(scenes[b]) for b in truth.images)
    assert seen == {"count", "total", "most", "which", "odd", "color", "shape", "share", "caption"}


def test_bison_pairs_differ_in_one_thing_and_nlvr2_labels_are_balanced():
    for seed in range(50):
        item = make_bison(random.Random(seed))
        captions = [shapes.caption(s) for s in item.scenes]
        assert captions[int(item.truths[0].images[0]) - 1] == item.conversation.meta["caption"]
        assert captions[0] != captions[1]
    firsts = sum(make_bison(random.Random(s)).truths[0].images == ("1",) for s in range(200))
    trues = sum(make_nlvr2(random.Random(s)).truths[0].value for s in range(200))
    assert 70 < firsts < 130 and 70 < trues < 130


def test_the_original_form_is_the_spec_prompt_with_its_slots():
    from sparkles.eval.tasks import bison, nlvr2

    config = WorldConfig(form="original")
    item = make_bison(random.Random(1), config)
    assert to_markup(item.turns[0].parts) == bison.PROMPT.format(item.conversation.meta["caption"])
    item = make_nlvr2(random.Random(1), config)
    assert to_markup(item.turns[0].parts) == nlvr2.PROMPT.format(item.conversation.meta["sentence"])
    assert item.conversation[1].text.startswith("Let's think step by step. IMAGE#1 shows ")


def test_turn_two_follows_the_models_own_answer_and_scores_on_its_own():
    from sparkles.eval.tasks import Example, conversation_for

    item = [i for i in make_eval_set(2, seed=3) if i.kind == "dialogue"][-1]
    assert item.id == "dialogue-3-1"
    prompt = conversation_for(Example(item.id, item.turns), ["Sorry, I cannot see it."])
    validate(prompt)
    assert prompt[1].text == "Sorry, I cannot see it." and prompt[2] == item.turns[1]
    assert [i.label for i in prompt.images] == [str(k + 1) for k in range(len(item.scenes))]
    assert score(item.truths[1], item.truths[1].answer).correct


def test_the_eval_set_is_what_generate_writes(tmp_path):
    items = make_eval_set(3, seed=5)
    assert [i.kind for i in items] == ["bison"] * 3 + ["nlvr2"] * 3 + ["dialogue"] * 3 + ["caption"] * 3
    generate(tmp_path, n=3, seed=5, progress=False)
    truths = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    by_set = {(t["set"], t["id"], t["turn"]): t["answer"] for t in truths}
    captions = _json(tmp_path / SETS["captions"][1])
    for item in items:
        i = int(item.id[-1])
        if item.kind == "caption":  # one image, "Describe IMAGE#1.", the caption captions.json holds
            assert to_markup(item.turns[0].parts) == "Describe IMAGE#1<Img><ImageHere></Img>." and len(item.scenes) == 1
            assert item.truths[0].words == (captions[i]["caption"],)
            continue
        name = {"bison": "BISON", "nlvr2": "NLVR2", "dialogue": "SparklesEval"}[item.kind]
        assert [by_set[(name, i, t + 1)] for t in range(len(item.truths))] == [t.answer for t in item.truths]


def test_adding_captions_changed_no_earlier_item():
    """The kinds scored before captions came keep their items, so earlier numbers still compare: the digest is of
    make_eval_set(2, seed=7) before captions were added (ids, answers, scene digests)."""
    import hashlib

    items = [i for i in make_eval_set(2, seed=7) if i.kind != "caption"]
    data = [(i.id, [t.answer for t in i.truths], [im.sha256 for im in i.conversation.images]) for i in items]
    digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()
    assert digest == "c11ba2498ce38fe5e3f38ef9317acd140eb34b67f9d07478cc66c601246cc9ea"


def _json(path: Path):
    return json.loads(path.read_text())


def test_generate_writes_the_original_layouts(tmp_path, capsys):
    assert main(["world", "generate", "--out", str(tmp_path), "--n", "4", "--seed", "2", "--image-size", "48"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(SETS)
    captions = _json(tmp_path / "captions.json")
    assert [c["image_id"] for c in captions] == [f"w2-{i:06d}" for i in range(4)]
    for c in captions:
        assert set(c) == {"image_id", "caption", "scene", "file"} and (tmp_path / c["file"]).is_file()
        assert shapes.caption(shapes.scene_from_dict(c["scene"])) == c["caption"]
    for name, ext in (("SparklesDialogue", "png"), ("SparklesEval", "jpg")):
        records = _json(tmp_path / SETS[name][1])
        assert len(records) == 4
        for k, record in enumerate(records):
            assert record.get("evaluation_id", k) == k and [m["role"] for m in record["dialogue"]] == [
                "user", "assistant"] * 2
            conversation = validate(from_sparkles_dialogue(record), allow_open=False)
            assert to_sparkles_dialogue(conversation, on_loss="error") == record  # a lossless round trip
            for image in conversation.images:
                assert isinstance(image.image_id, str) and image.caption
                assert (tmp_path / name / "images" / f"{image.image_id}.{ext}").is_file()
    for record in _json(tmp_path / SETS["BISON"][1]):
        assert set(record) == {"evaluation_id", "caption", "true_image_id", "image_candidates"}
        assert record["true_image_id"] in [c["image_id"] for c in record["image_candidates"]]
        assert all((tmp_path / "BISON" / "images" / c["image_filename"]).is_file() for c in record["image_candidates"])
    for record in _json(tmp_path / SETS["NLVR2"][1]):
        assert set(record) == {"evaluation_id", "identifier", "sentence", "label"}
        assert record["label"] in ("True", "False")
        for k in (0, 1):
            assert (tmp_path / "NLVR2" / "images" / f"{record['identifier'][:-2]}-img{k}.png").is_file()
    for line in (tmp_path / "truth.jsonl").read_text().splitlines():
        truth = scoring.truth_from_dict(json.loads(line))
        assert score(truth, truth.answer).correct


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_deterministic_and_resumes(tmp_path):
    first = generate(tmp_path / "a", n=3, seed=9, progress=False)
    assert first["BISON"] == 6 and first["captions"] == 3
    generate(tmp_path / "b", n=3, seed=9, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert set(generate(tmp_path / "a", n=3, seed=9, progress=False).values()) == {0}  # nothing new to write
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    (tmp_path / "a" / "BISON" / "images" / "w9-b000000.png").unlink()  # as if interrupted
    assert generate(tmp_path / "a", n=3, seed=9, progress=False)["BISON"] == 1
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert not [p for p in (tmp_path / "a").rglob("*.tmp")]


def test_jpegs_keep_colours_true_at_the_centre_of_objects(tmp_path):
    from PIL import Image as PILImage

    generate(tmp_path, n=2, seed=1, progress=False)
    record = _json(tmp_path / SETS["SparklesEval"][1])[0]
    item = next(i for i in make_eval_set(1, seed=1) if i.kind == "dialogue")
    first = record["dialogue"][0]["images"][0]["image_id"]
    image = PILImage.open(io.BytesIO((tmp_path / "SparklesEval" / "images" / f"{first}.jpg").read_bytes()))
    for o in item.scenes[0].objects:
        got = image.getpixel((int(o.x * 64), int(o.y * 64)))
        assert max(abs(a - b) for a, b in zip(got, shapes.COLORS[o.color])) < 30


def test_config_errors():
    with pytest.raises(ConfigError, match="max_images"):
        WorldConfig(max_images=6)
    with pytest.raises(ConfigError, match="form"):
        WorldConfig(form="long")


def test_a_conversation_of_the_world_round_trips_through_sparkles_dialogue():
    item = make_dialogue(random.Random(11))
    record = to_sparkles_dialogue(item.conversation, on_loss="ignore")
    back = from_sparkles_dialogue(record)
    assert [to_markup(m.parts) for m in back] == [to_markup(m.parts) for m in item.conversation]
    assert [i.caption for i in back.images] == [shapes.caption(s) for s in item.scenes]
    assert isinstance(back, Conversation) and isinstance(back[0], Message)

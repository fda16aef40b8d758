"""Perception before reasoning: exact captions with per-object precision and recall, verdicts read from worked
answers, and the "world" evaluator that training runs."""

import random

import pytest

from sparkles.conversation import to_markup
from sparkles.world import shapes
from sparkles.world.scoring import ObjectCounts, Truth, object_counts, read_claims, read_objects, score, verdict
from sparkles.world.shapes import Background, Obj, Scene
from sparkles.world.tasks import make_caption, make_eval_set

# A scene of three objects, two of them alike, on a striped background; its truth as the caption task makes it.
SCENE = Scene(Background("striped"), (Obj("square", "blue", "small", 0.2, 0.2), Obj("circle", "red", "big", 0.5, 0.5),
                                      Obj("square", "blue", "small", 0.8, 0.8)))
CAPTION = Truth("caption", f"IMAGE#1 shows {shapes.caption(SCENE)}.", ("1",), words=(shapes.caption(SCENE),))

CAPTIONS = [  # answer, exact, (matched, claimed, present)
    ("IMAGE#1 shows a big red circle and two small blue squares on a striped background.", True, (3, 3, 3)),
    ("IMAGE#1 shows two small blue squares and a big red circle on a striped background.", True, (3, 3, 3)),
    ("A big red circle, 2 small blue squares, on a striped background", True, (3, 3, 3)),
    ("On a STRIPED background: a small blue square, a big red circle and a small blue square.", True, (3, 3, 3)),
    ("IMAGE#1 shows a big green circle and two small blue squares on a striped background.", False, (2, 3, 3)),
    ("IMAGE#1 shows a small red circle and two small blue squares on a striped background.", False, (2, 3, 3)),
    ("IMAGE#1 shows two small blue squares on a striped background.", False, (2, 2, 3)),
    ("IMAGE#1 shows a big red circle and a small blue square on a striped background.", False, (2, 2, 3)),
    ("IMAGE#1 shows a big red circle, two small blue squares and a big yellow star on a striped background.", False,
     (3, 4, 3)),
    ("IMAGE#1 shows a big red circle and three small blue squares on a striped background.", False, (3, 4, 3)),
    ("IMAGE#1 shows a big red circle and two small blue squares on a plain background.", False, (3, 3, 3)),
    ("IMAGE#1 shows a big red circle and two small blue squares.", False, (3, 3, 3)),  # no background said
    ("IMAGE#1 shows a red circle and two small blue squares on a striped background.", False, (2, 3, 3)),  # size?
    ("IMAGE#1 shows a big red circle and small blue squares on a striped background.", True, (3, 3, 3)),  # 2 at least
    ("I cannot see the image.", False, (0, 0, 3)),
]


@pytest.mark.parametrize("answer, exact, counts", CAPTIONS)
def test_captions_score_exactly_and_per_object(answer, exact, counts):
    assert score(CAPTION, answer).correct is exact
    assert object_counts(CAPTION, answer) == ObjectCounts(*counts)


def test_the_caption_reader_reads_numbers_plurals_and_articles():
    objects, backgrounds = read_objects("An orange cross, 3 big green triangles and no stars on a gradient background")
    assert objects == {("cross", "orange", None): 1, ("triangle", "green", "big"): 3}
    assert backgrounds == {"gradient"}
    assert read_objects("IMAGE#2 shows four small purple crosses")[0] == {("cross", "purple", "small"): 4}
    assert read_objects("two red shapes")[0] == {(None, "red", None): 2}  # claims two objects no scene has
    assert read_objects("nothing on a noisy background") == ({}, {"noisy"})


def test_what_the_caption_scorer_found_is_said_in_the_captions_words():
    result = score(CAPTION, "IMAGE#1 shows 2 small blue squares and one big red circle on a striped background.")
    said = "two small blue squares and a big red circle on a striped background"
    assert result == (True, shapes.caption(SCENE), said, "caption")
    assert score(CAPTION, "No idea.").found is None


def test_several_images_are_each_described_after_their_name():
    other = Scene(Background("plain"), (Obj("triangle", "yellow", "big", 0.5, 0.5),))
    words = (shapes.caption(SCENE), shapes.caption(other))
    truth = Truth("caption", "", ("1", "2"), words=words)
    assert score(truth, f"IMAGE#1 shows {words[0]}. IMAGE#2 shows {words[1]}.").correct
    assert score(truth, f"IMAGE#2 shows {words[1]}. IMAGE#1 shows {words[0]}.").correct
    assert not score(truth, f"IMAGE#1 shows {words[1]}. IMAGE#2 shows {words[0]}.").correct
    assert not score(truth, f"IMAGE#1 shows {words[0]}.").correct
    assert object_counts(truth, f"IMAGE#1 shows {words[0]}.") == (3, 3, 4)


def test_every_caption_item_scores_its_own_answer_exactly():
    for seed in range(200):
        item = make_caption(random.Random(seed), images=1 + seed % 3)
        truth = item.truths[0]
        assert score(truth, truth.answer).correct, truth
        matched, claimed, present = object_counts(truth, truth.answer)
        assert matched == claimed == present == sum(len(s.objects) for s in item.scenes)


def test_the_caption_items_of_the_eval_set_ask_for_one_image():
    captions = [i for i in make_eval_set(3, seed=2) if i.kind == "caption"]
    assert [i.id for i in captions] == ["caption-2-0", "caption-2-1", "caption-2-2"]
    for item in captions:
        assert to_markup(item.turns[0].parts) == "Describe IMAGE#1<Img><ImageHere></Img>." and len(item.scenes) == 1


# Verdicts of worked answers: each image's content, then the conclusion.

BISON = Truth("bison", "IMAGE#2 matches it.", ("2",))
NLVR2 = Truth("nlvr2", "True.", ("1", "2"), value=True)
WORK = "IMAGE#1 shows a small red circle on a plain background. IMAGE#2 shows a big red circle on a plain background."
PAIR = "IMAGE#1 shows two red squares. IMAGE#2 shows one red square and a blue circle."

WORKED = [
    (BISON, f"Let's think step by step. {WORK} So IMAGE#2 matches the caption.", True),
    (BISON, f"{WORK} Answer: IMAGE#2", True),
    (BISON, f"{WORK} The caption describes IMAGE#2.", True),  # no marker: the last sentence
    (BISON, f"{WORK}\nThe answer is IMAGE#2", True),
    (BISON, f"{WORK} The answer (IMAGE#1 or IMAGE#2) is IMAGE#2.", True),  # the prompt's options, echoed
    (BISON, f"{WORK} So IMAGE#1 matches the caption.", False),
    (BISON, f"{WORK} Answer: IMAGE#1", False),
    (BISON, f"{WORK} So both IMAGE#1 and IMAGE#2 match.", False),
    (BISON, f"{WORK} IMAGE#1 and IMAGE#2 both match.", False),
    (BISON, f"{WORK} So neither matches.", False),
    (BISON, f"{WORK} It is hard to say.", False),
    (BISON, f"{WORK} Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#2.", True),  # the original's form
    (BISON, f"{WORK} Therefore, neither matches.", False),
    (NLVR2, f"Let's think step by step. {PAIR} So the statement is true.", True),
    (NLVR2, f"{PAIR} Answer: TRUE", True),
    (NLVR2, f"{PAIR} IMAGE#1 has more red squares, which is true of the left image. So it is true.", True),
    (NLVR2, f"{PAIR} So the statement is false.", False),
    (NLVR2, f"{PAIR} It is true of IMAGE#1 and false of IMAGE#2.", False),
    (NLVR2, f"{PAIR} The left part is true, the right part false. So it is both true and false.", False),
    (NLVR2, f"{PAIR} So I cannot tell.", False),
    (NLVR2, f"{PAIR} Therefore, the answer (TRUE or FALSE) is TRUE.", True),
]


@pytest.mark.parametrize("truth, answer, correct", WORKED)
def test_worked_answers_are_read_at_their_verdict(truth, answer, correct):
    assert score(truth, answer).correct is correct


@pytest.mark.parametrize("truth, answer, correct", [
    (BISON, "IMAGE#2 matches it.", True), (BISON, "IMAGE#1 matches it.", False), (BISON, "IMAGE#1 or IMAGE#2", False),
    (BISON, "IMAGE#2 matches it. It has a big red circle.", True), (BISON, "It matches.", False),
    (NLVR2, "True.", True), (NLVR2, "False.", False), (NLVR2, "true or false", False),
    (NLVR2, "True, so the statement holds.", True),
])
def test_short_answers_score_as_before(truth, answer, correct):
    assert score(truth, answer).correct is correct


def test_the_verdict_is_all_of_a_short_answer_and_the_conclusion_of_a_worked_one():
    def images(text):
        return read_claims(text)["image"]

    assert verdict("IMAGE#2 matches it. It has a circle.", images) == "image#2 matches it. it has a circle."
    assert verdict(f"{WORK} So IMAGE#2.", images) == " image#2."
    assert verdict(f"{WORK} IMAGE#2 it is.", images) == "image#2 it is."


# The "world" evaluator that training runs every eval_every steps.


def test_the_world_evaluator_is_registered_and_scores_every_task_type_on_real_and_grey_images(tiny):
    from sparkles.train.evaluators import EVALUATORS

    model, processor = tiny
    model.train()
    evaluate = EVALUATORS.get("world")
    first = evaluate(model, processor, n=2, seed=3)
    kinds = ["caption", "caption_precision", "caption_recall", "bison", "nlvr2", "dialogue_turn_1", "dialogue_turn_2"]
    assert set(first) == set(kinds) | {f"{k}_grey" for k in kinds}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in first.values())
    assert model.training  # given back in the mode it came in
    assert evaluate(model, processor, n=2, seed=3) == first


def test_the_benchmarks_own_answers_score_one_everywhere(tmp_path):
    """`sparkles eval shapes` with the canonical answers as the responder: every criterion, captions too, is 1."""
    import json

    from sparkles.config import SamplingParams
    from sparkles.eval.harness import RunOptions, evaluate
    from sparkles.eval.report import write_outputs
    from sparkles.eval.responders import ReferenceResponder
    from sparkles.eval.tasks import load_task

    task = load_task("shapes", None, n=3, seed=5)
    options = RunOptions(out=tmp_path, params=SamplingParams(), progress=False)
    meta, results = evaluate(task, ReferenceResponder(task.examples(), task.references), options)
    write_outputs(tmp_path, meta, results)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 12 and summary["accuracy"] == 1.0
    assert summary["per_criterion"] == dict.fromkeys(["bison", "caption", "caption precision", "caption recall",
                                                      "dialogue turn 1", "dialogue turn 2", "nlvr2"], 1.0)

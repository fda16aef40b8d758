"""Worked answers (world/worked.py): each image described, then the verdict; the scorer reads them at the verdict,
and the short questions of the eval set stay what they were."""

import random

import pytest

from sparkles.errors import ConfigError
from sparkles.world import shapes, worked
from sparkles.world.data import WorldSamples
from sparkles.world.scoring import Truth
from sparkles.world.tasks import MAKERS, WorldConfig, _rng, make_bison, make_eval_set, make_nlvr2, score

WORKED = WorldConfig(form="worked")


def _answers(item):
    return [m.text for m in item.conversation if m.role == "assistant"]


@pytest.mark.parametrize("kind", ["dialogue", "bison", "nlvr2"])
def test_every_worked_answer_scores_as_right(kind):
    seen = set()
    for i in range(150):
        item = MAKERS[kind](_rng(11, kind, i), WORKED)
        for truth, answer in zip(item.truths, _answers(item)):
            seen.add(truth.kind)
            assert score(truth, answer).correct, (truth, answer)
            if truth.kind in worked.WORKED_KINDS:
                assert " shows " in answer and " So " in answer, answer
    if kind == "dialogue":  # every kind a dialogue asks, worked or not
        assert seen >= {"count", "total", "which", "most", "share", "caption", "color", "shape"}


def test_the_worked_form_changes_answers_only():
    for kind in ("dialogue", "bison", "nlvr2"):
        for i in range(30):
            short, long = (MAKERS[kind](_rng(3, kind, i), config) for config in (WorldConfig(), WORKED))
            assert short.turns == long.turns and short.truths == long.truths and short.scenes == long.scenes


def test_a_bison_answer_holds_each_caption_against_the_one_asked_about():
    item = make_bison(random.Random(4), WORKED)
    first, second = (shapes.caption(s) for s in item.scenes)
    label = item.truths[0].images[0]
    said = _answers(item)[0]
    assert said.startswith(f"IMAGE#1 shows {first}, ") and f"IMAGE#2 shows {second}, " in said
    assert said.count("as the caption says") == 1 and said.count("unlike the caption") == 1
    assert said.endswith(f"So IMAGE#{label} matches it.")


def test_an_nlvr2_answer_counts_what_its_statement_counts():
    for seed in range(40):
        item = make_nlvr2(random.Random(seed), WORKED)
        said, sentence = _answers(item)[0], item.conversation.meta["sentence"]
        assert said.endswith(f"So {'true' if item.truths[0].value else 'false'}.")
        if "background" in sentence:
            assert "The left image has" not in said
        else:
            assert "The left image has" in said and "the right image has" in said


@pytest.mark.parametrize("truth, answer, correct", [
    (Truth("count", "IMAGE#1 has two red circles.", ("1",), count=2),
     "IMAGE#1 shows two red circles and three blue squares on a plain background. So IMAGE#1 has two red circles.",
     True),
    (Truth("count", "IMAGE#1 has two red circles.", ("1",), count=2),
     "IMAGE#1 shows two red circles and three blue squares on a plain background. So IMAGE#1 has three.", False),
    (Truth("which", "IMAGE#2 has a red circle.", ("2",)),
     "IMAGE#1 shows a blue square. IMAGE#2 shows a red circle. So IMAGE#2 has a red circle.", True),
    (Truth("which", "IMAGE#2 has a red circle.", ("2",)),
     "IMAGE#1 shows a blue square. IMAGE#2 shows a red circle. So IMAGE#1 and IMAGE#2 have one.", False),
    (Truth("which", "IMAGE#2 has a red circle.", ("2",)),
     "IMAGE#1 shows a blue square. IMAGE#2 shows a red circle.", True),  # no marker: its last sentence
    (Truth("most", "IMAGE#1 has more red circles: two.", ("1",), count=2),
     "IMAGE#1 shows two red circles. IMAGE#2 shows a red circle. So IMAGE#1 has more red circles: three.", False),
    (Truth("total", "IMAGE#1 and IMAGE#2 have three circles in total.", ("1", "2"), count=3),
     "IMAGE#1 shows two red circles. IMAGE#2 shows a blue circle. So they have three circles in total.", True),
    (Truth("share", "IMAGE#1 and IMAGE#2 both have a red shape.", ("1", "2"), words=("red",)),
     "IMAGE#1 shows a red circle and a blue square. IMAGE#2 shows a red star. So both have a red shape.", True),
    (Truth("share", "IMAGE#1 and IMAGE#2 both have a red shape.", ("1", "2"), words=("red",)),
     "IMAGE#1 shows a red circle and a blue square. IMAGE#2 shows a red star. So both have a blue shape.", False),
])
def test_dialogue_kinds_that_compare_or_count_are_read_at_their_verdict(truth, answer, correct):
    assert score(truth, answer).correct is correct


def test_the_eval_set_still_asks_short_questions():
    for item in make_eval_set(5, seed=9):
        for truth, answer in zip(item.truths, _answers(item)):
            assert " So " not in answer and score(truth, answer).correct


def test_a_world_source_names_its_form():
    sample = WorldSamples("bison/worked", seed=0)[0]
    assert " So IMAGE#" in sample.conversation[1].text and sample.origin.startswith("world:bison#")
    assert WorldSamples("bison", seed=0)[0].conversation[1].text.endswith("matches it.")
    with pytest.raises(ConfigError, match=r"world:bison/long.*world:bison/worked"):
        WorldSamples("bison/long", seed=0)


def test_the_images_a_question_is_about():
    assert worked.about("Compare IMAGE#3 with IMAGE#1: which has more circles?", ["1", "2"]) == ["1", "3"]
    assert worked.about("Which of the images we discussed and IMAGE#4 has a star?", ["1", "2", "3"]) == \
        ["1", "2", "3", "4"]

"""The shapes world's scenes and words: determinism, visibility, captions, statements, and the exact scorer."""

import io
import json
import random

import numpy as np
import pytest

from sparkles.errors import ConfigError
from sparkles.world import shapes
from sparkles.world.scoring import Truth, read_claims, score
from sparkles.world.shapes import (
    COLORS,
    Background,
    Obj,
    Scene,
    SceneConfig,
    caption,
    render,
    sample_scene,
)

EVERYTHING = SceneConfig(shapes=shapes.SHAPES, max_objects=5)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_same_seed_gives_the_same_scene_and_the_same_bytes():
    a, b = sample_scene(random.Random(3), EVERYTHING), sample_scene(random.Random(3), EVERYTHING)
    assert a == b and png(render(a)) == png(render(b))
    assert json.dumps(shapes.describe(a)) == json.dumps(shapes.describe(b))
    assert sample_scene(random.Random(4), EVERYTHING) != a


def test_scenes_follow_the_config_and_objects_never_overlap():
    config = SceneConfig(shapes=("star", "cross"), colors=("red", "blue"), min_objects=2, max_objects=5)
    for seed in range(200):
        scene = sample_scene(random.Random(seed), config)
        assert 2 <= len(scene.objects) <= 5
        for i, o in enumerate(scene.objects):
            assert o.shape in config.shapes and o.color in config.colors
            assert o.radius < o.x < 1 - o.radius and o.radius < o.y < 1 - o.radius
            for p in scene.objects[i + 1:]:
                assert ((o.x - p.x) ** 2 + (o.y - p.y) ** 2) ** 0.5 >= o.radius + p.radius


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_object_is_visible_at_its_centre(size):
    for seed in range(100):
        scene = sample_scene(random.Random(seed), EVERYTHING)
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        for o in scene.objects:
            assert image.getpixel((int(o.x * size), int(o.y * size))) == COLORS[o.color], (seed, o)


@pytest.mark.parametrize("kind", shapes.BACKGROUNDS)
def test_backgrounds_are_grey_so_they_never_hide_an_object(kind):
    scene = Scene(Background(kind, ((60, 60, 60), (230, 230, 230)), seed=1), ())
    pixels = np.asarray(render(scene)).reshape(-1, 3)
    assert (pixels == pixels[:, :1]).all()
    assert (len(np.unique(pixels[:, 0])) == 1) == (kind == "plain")


def test_the_caption_groups_objects_in_canonical_order():
    objects = (Obj("square", "blue", "small", 0.2, 0.2), Obj("circle", "red", "big", 0.5, 0.5),
               Obj("square", "blue", "small", 0.8, 0.8))
    scene = Scene(Background("striped"), objects)
    assert caption(scene) == "a big red circle and two small blue squares on a striped background"
    three = Scene(Background("plain"), objects + (Obj("cross", "green", "big", 0.2, 0.8),))
    assert caption(three) == ("a big red circle, two small blue squares and a big green cross on a plain "
                              "background")
    assert shapes.count(scene, color="blue") == 2 and shapes.count(scene, shape="circle", size="small") == 0


def test_the_description_is_plain_json_and_reads_back():
    scene = sample_scene(random.Random(5), EVERYTHING)
    assert shapes.scene_from_dict(json.loads(json.dumps(shapes.describe(scene)))) == scene


def test_a_variation_changes_exactly_what_it_says():
    for seed in range(200):
        rng = random.Random(seed)
        scene = sample_scene(rng, EVERYTHING)
        other, change = shapes.vary(scene, rng, EVERYTHING)
        assert caption(other) != caption(scene)
        if change == "background":
            assert other.objects == scene.objects and other.background.kind != scene.background.kind
        else:
            assert other.background == scene.background
            assert abs(len(other.objects) - len(scene.objects)) == (change in ("add", "remove"))


def test_statements_say_what_they_are_asked_to():
    left = Scene(Background("plain"), (Obj("circle", "red", "big", 0.3, 0.3), Obj("circle", "red", "small", .7, .7)))
    right = Scene(Background("noisy"), (Obj("square", "red", "big", 0.5, 0.5),))
    config = SceneConfig(colors=("red",), shapes=("circle",), backgrounds=("plain",))  # its only words

    def said(template, want):
        return {shapes.statement(random.Random(s), (left, right), template, want, config) for s in range(60)}

    assert said("neither", True) == {None}  # both images have red shapes
    assert said("both", True) == {None, "Both images have a red shape."}
    assert said("only", True) == {None, "Only the left image has a circle.", "Only the left image has a red circle."}
    assert said("background", False) == {"Both images have a plain background."}
    assert said("same", False) == {"The two images have the same number of red shapes.",
                                   "The two images have the same number of circles.",
                                   "The two images have the same number of red circles."}
    assert said("exactly", True) == {"The left image has exactly two red shapes.",
                                     "The left image has exactly two circles.",
                                     "The left image has exactly two red circles.",
                                     "The right image has exactly one red shape.",
                                     "The right image has no circles.", "The right image has no red circles."}
    assert said("total", False) <= {f"The two images have {n} in total." for n in
                                    ("two red shapes", "four red shapes", "one circle", "three circles",
                                     "one red circle", "three red circles")}


def test_config_errors_say_what_was_expected():
    with pytest.raises(ConfigError, match="subset of"):
        SceneConfig(shapes=("hexagon",))
    with pytest.raises(ConfigError, match="max_objects"):
        SceneConfig(max_objects=6)


# The exact scorer, on hand-written answers.

WHICH = Truth("which", "IMAGE#1 has a red circle.", ("1",))
MOST = Truth("most", "IMAGE#2 has the most red shapes: three.", ("2",), count=3)
COUNT = Truth("count", "IMAGE#2 has two red shapes.", ("2",), count=2)
ZERO = Truth("count", "IMAGE#3 has no circles.", ("3",), count=0)
TOTAL = Truth("total", "IMAGE#1 and IMAGE#3 have five circles in total.", ("1", "3"), count=5)
COLOR = Truth("color", "The triangle in IMAGE#1 is green.", ("1",), words=("green",))
SHAPE = Truth("shape", "The blue shape in IMAGE#2 is a star.", ("2",), words=("star",))
SHARE = Truth("share", "IMAGE#1 and IMAGE#3 both have a red shape.", ("1", "3"), words=("red",))
ODD = Truth("odd", "IMAGE#3 is the odd one out: it has a striped background.", ("3",))
CAPTION = Truth("caption", "IMAGE#1 shows a big red circle on a plain background.", ("1",),
                words=("a big red circle on a plain background",))
BISON = Truth("bison", "IMAGE#2 matches it.", ("2",))
NLVR2 = Truth("nlvr2", "False.", ("1", "2"), value=False)

CASES = [
    (WHICH, "IMAGE#1 has a red circle.", True), (WHICH, "image #1", True), (WHICH, "It's Image#1!", True),
    (WHICH, "IMAGE#12 has a red circle.", False), (WHICH, "IMAGE#2 has a red circle.", False),
    (WHICH, "IMAGE#1 and IMAGE#2 have a red circle.", False), (WHICH, "The first one.", False),
    (MOST, "IMAGE#2 has the most red shapes: three.", True), (MOST, "IMAGE#2.", True),
    (MOST, "IMAGE#2 has the most red shapes: 4.", False), (MOST, "IMAGE#2 has more than IMAGE#1.", False),
    (COUNT, "IMAGE#2 has two red shapes.", True), (COUNT, "2", True), (COUNT, "There are 2 in IMAGE#2", True),
    (COUNT, "IMAGE#2 has three red shapes.", False), (COUNT, "IMAGE#2 has a red shape.", False),
    (COUNT, "IMAGE#2 has two, IMAGE#1 has one.", False), (COUNT, "IMAGE#1 has two red shapes.", False),
    (COUNT, "IMAGE#22 has two red shapes.", False),
    (ZERO, "IMAGE#3 has no circles.", True), (ZERO, "None.", True), (ZERO, "zero", True), (ZERO, "0", True),
    (ZERO, "IMAGE#3 has one circle.", False), (ZERO, "I cannot tell.", False),
    (TOTAL, "IMAGE#1 and IMAGE#3 have five circles in total.", True), (TOTAL, "5 circles", True),
    (TOTAL, "IMAGE#1 and IMAGE#2 have five circles.", False), (TOTAL, "four", False),
    (COLOR, "The triangle in IMAGE#1 is green.", True), (COLOR, "GREEN", True), (COLOR, "It is red.", False),
    (COLOR, "green or blue", False),
    (SHAPE, "The blue shape in IMAGE#2 is a star.", True), (SHAPE, "stars", True), (SHAPE, "A star in IMAGE#1.", False),
    (SHAPE, "a start", False), (SHAPE, "a star or a cross", False),
    (SHARE, "IMAGE#1 and IMAGE#3 both have a red shape.", True), (SHARE, "Red.", True),
    (SHARE, "IMAGE#1 and IMAGE#3 both have a red and a blue shape.", False), (SHARE, "IMAGE#2 is red.", False),
    (ODD, "IMAGE#3 is the odd one out: it has a striped background.", True), (ODD, "IMAGE#3", True),
    (ODD, "IMAGE#3 and IMAGE#1", False), (ODD, "IMAGE#4", False),
    (CAPTION, "IMAGE#1 shows a big red circle on a plain background.", True),
    (CAPTION, "A big red   circle on a PLAIN background", True),
    (CAPTION, "IMAGE#1 shows a small red circle on a plain background.", False),
    (BISON, "IMAGE#2 matches it.", True), (BISON, "IMAGE#1 matches it.", False), (BISON, "IMAGE#1 or IMAGE#2", False),
    (BISON, "Let's think step by step. IMAGE#1 shows … Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE #2.", True),
    (BISON, "Therefore, IMAGE#2 is not the correct match.", True),  # the original extractor's reading (spec §9.7)
    (BISON, "Therefore, the answer is IMAGE#1, because it matches better than IMAGE#2.", False),
    (NLVR2, "False.", True), (NLVR2, "false", True), (NLVR2, "True.", False), (NLVR2, "true or false", False),
    (NLVR2, "Let's think step by step. Therefore, the answer (TRUE or FALSE) is FALSE.", True),
    (NLVR2, "The statement is not true. Therefore, the answer is not true.", True),
    (NLVR2, "Therefore, we cannot determine if the statement is true or false", False),
]


@pytest.mark.parametrize("truth, answer, correct", CASES)
def test_the_scorer_on_hand_written_answers(truth, answer, correct):
    result = score(truth, answer)
    assert result.correct is correct, result
    assert result.kind == truth.kind


def test_every_canonical_answer_is_correct():
    for truth, *_ in CASES:
        assert score(truth, truth.answer).correct, truth


def test_the_score_says_what_it_expected_and_found():
    assert score(COUNT, "IMAGE#2 has 3 or four.") == (False, "2", "3, 4", "count")
    assert score(WHICH, "Neither.") == (False, "IMAGE#1", None, "which")
    assert score(BISON, "Therefore, the answer is image#2.") == (True, "image#2", "image#2", "bison")


def test_claims_read_numbers_colours_shapes_and_images():
    claims = read_claims("IMAGE#12 has two Red crosses, 3 squares and no stars; image #4 is TRUE.")
    assert claims == {"image": {"12", "4"}, "number": {2, 3, 0}, "color": {"red"},
                      "shape": {"cross", "square", "star"}, "value": {"true"}}

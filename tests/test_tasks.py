"""Tasks: the original's answer extractor on its own edge cases (spec §9.7), loading the original folder layouts,
verbatim prompts, turn-2 conditioning and the original's result records."""

import json

import pytest
from evaldata import bison, nlvr2, sparkleseval

from sparkles.conversation import Image, Text
from sparkles.errors import ConfigError, InputError
from sparkles.eval.tasks import conversation_for, extract_option, load_task
from sparkles.eval.tasks.common import Scored

TF, IMG = ("TRUE", "FALSE"), ("IMAGE#1", "IMAGE#2")

# Spec §9.7: the actual behaviour of the original extractor (its own comments expect other results for 2 and 5).
CONFORMANCE = [
    ("Therefore, we cannot determine if the statement is true or false", TF, None),
    ('Therefore, the statement "A man is sitting" cannot be true and is FALSE.', TF, None),
    ("Therefore, the answer is TRUE for Image#2 and FALSE for Image#1. In conclusion, there is one true and one "
     "false statement in this comparison.", TF, None),
    ("Therefore, the answer is IMAGE#1, because it more closely matches the caption than IMAGE#2.", IMG, "image#1"),
    ("Therefore, IMAGE#2 is not the correct match.", IMG, "image#2"),
    ("Let's think step by step. The truck is red. Therefore, the answer (TRUE or FALSE) is FALSE.", TF, "false"),
    ("Let's think step by step. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE #2.", IMG, "image#2"),
    ("The statement is not true. Therefore, the answer is not true.", TF, "false"),
    ("So the answer is TRUE.", TF, None),
    ("Therefore, the answer (TRUE or FALSE) is TRUE, but it could be false.", TF, "true"),
    ("Therefore the answer is false because there is no dog.", TF, "false"),
]


@pytest.mark.parametrize("response,options,expected", CONFORMANCE)
def test_the_extractor_reproduces_the_original(response, options, expected):
    assert extract_option(response, options) == expected


def test_more_edge_cases_of_the_original_extractor():
    # Only the text after the last "therefore" counts, and only "not <first option>" is understood.
    assert extract_option("Therefore TRUE. On reflection, therefore, FALSE.", TF) == "false"
    assert extract_option("Therefore, the answer is not false.", TF) == "false"
    assert extract_option("THEREFORE: image #1", IMG) == "image#1"
    assert extract_option("therefore", TF) is None
    # Whichever option is written first wins, even against an explicit "the answer is": strict mode fixes that.
    text = "Therefore, comparing IMAGE#2 with IMAGE#1, the answer is IMAGE#1."
    assert extract_option(text, IMG) == "image#2"
    assert extract_option(text, IMG, mode="strict") == "image#1"
    assert extract_option(CONFORMANCE[4][0], IMG, mode="strict") == "image#2"


def test_bison_reads_the_original_layout(tmp_path):
    task = load_task("bison", bison(tmp_path, 3))
    examples = task.examples()
    assert [e.id for e in examples] == ["0", "1", "2"]  # sorted by evaluation_id, as the original
    first = examples[0]
    assert [e.target for e in examples] == ["image#1", "image#2", "image#1"]
    assert first.turns[0].text.startswith("Carefully examine the two similar images of IMAGE#1<Img><ImageHere></Img>"
                                          " and IMAGE#2<Img><ImageHere></Img>.\nGiven the following caption")
    assert "The caption is: 'a plain red picture'.\n" in first.turns[0].text
    assert first.turns[0].text.endswith('end with "Therefore, the answer (IMAGE#1 or IMAGE#2) is".')
    assert [i.label for i in first.images] == ["1", "2"]
    assert first.images[0].source.endswith("images/COCO_val2014_000000001000.jpg")
    answer = "Let's think step by step. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#1."
    scored = task.score(first, [answer])
    assert scored == Scored(1.0, parsed=True, prediction="image#1")
    record = task.legacy_record(first, [answer], scored)
    assert list(record) == ["label", "prompt", "img_paths", "predict", "response", "sentence", "evaluation_id"]
    assert record["label"] == "IMAGE#1" and record["predict"] == "image#1" and record["evaluation_id"] == 0
    assert record["sentence"] == "a plain red picture" and record["img_paths"][0].startswith("/")
    assert task.score(first, ["I like both."]) == Scored(0.0, parsed=False, prediction=None)


def test_nlvr2_reads_the_original_layout(tmp_path):
    task = load_task("nlvr2", nlvr2(tmp_path, 2))
    first, second = task.examples()
    assert first.turns[0].text.splitlines()[2] == "'The left image is red.'"
    lines = first.turns[0].text.splitlines()
    assert lines[3] == "Jointly reasoning about the statement grounded in IMAGE#1 and IMAGE#2." and len(lines) == 6
    assert [i.source.rsplit("/", 1)[1] for i in first.images] == ["test1-10-0-img0.png", "test1-10-0-img1.png"]
    assert (first.target, second.target) == ("true", "false")
    scored = task.score(second, ["Therefore, the answer (TRUE or FALSE) is FALSE."])
    assert scored.value == 1.0 and task.legacy_record(second, ["x"], scored)["label"] == "False"


def test_sparkleseval_turns_and_references(tmp_path):
    task = load_task("sparkleseval", sparkleseval(tmp_path, 2))
    example = task.examples()[1]
    assert len(example.turns) == 2 and len(example.images) == 4
    assert [i.label for i in example.turns[0].images] == ["2350010", "2350011", "2350012"]
    assert example.images[0].source.endswith("images/2350010.jpg") and example.images[0].caption
    # Turn 2 is asked after the model's own turn-1 answer, with every image of both turns.
    conversation = conversation_for(example, ["my own first answer"])
    assert [m.role for m in conversation] == ["user", "assistant", "user"]
    assert conversation[1].parts == (Text("my own first answer"),)
    assert len(conversation.slots) == 4 and all(isinstance(p, Image) for p in conversation.slots)
    with pytest.raises(InputError, match="all 2 are answered"):
        conversation_for(example, ["a", "b"])
    prompt = task.judge_prompt(example, ["first", "second"])
    assert "###User Q1:\nCompare IMAGE#2350010 and IMAGE#2350011 and IMAGE#2350012. What differs?\n\n" in prompt
    assert "[{'image_id': 2350010, 'caption': 'A plain green square.'}, {'image_id': 2350011," in prompt
    assert "###Assistant A1:\nfirst\n\n###User Q2:\nDoes IMAGE#2350013 match IMAGE#2350010?\n\n" in prompt


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="no annotation file at .*sparkles_evaluation_bison_annotations.json"):
        load_task("bison", tmp_path)
    root = nlvr2(tmp_path / "n", 1)
    path = root / "annotations" / "sparkles_evaluation_nlvr2_annotations.json"
    path.write_text(json.dumps([{"evaluation_id": 0, "identifier": "x1-2-3", "sentence": "s", "label": "maybe"}]))
    with pytest.raises(InputError, match="label must be 'True' or 'False', got 'maybe'"):
        load_task("nlvr2", root)
    path.write_text(json.dumps([{"identifier": "x"}]))
    with pytest.raises(InputError, match="missing 'evaluation_id'"):
        load_task("nlvr2", root)
    with pytest.raises(ConfigError, match="unknown task 'mmmu'; tasks: sparkleseval, bison, nlvr2"):
        load_task("mmmu", root)

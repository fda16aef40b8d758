"""The original's result files, read by a reader that does what the original's `evaluate.py --merge-results` and
its HTML viewers (`dataset/visualize_data_in_html.py`) do with them: the numbers must be those of summary.json,
with and without failed items and unreadable answers."""

import html
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import pytest
from evaldata import bison, judge_text, nlvr2, sparkleseval

from sparkles.config import SamplingParams
from sparkles.errors import ContextLengthError
from sparkles.eval.harness import RunOptions, evaluate
from sparkles.eval.judge import Judge
from sparkles.eval.report import write_outputs
from sparkles.eval.tasks import load_task

RIGHT = "Let's think step by step. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#{}."
TRUE = "Let's think step by step. Therefore, the answer (TRUE or FALSE) is {}."


def original_merge(folder: Path, stem: str, judge_models=("judge-x",)) -> dict:
    """What the original's merge does: read every `<stem>_*.json` in the results folder, sort by evaluation_id,
    join SparklesEval items by id; then accuracy (`calculate_score`) or the per-criterion means and
    (A1 + A2) / 2. The viewers' reads are repeated too (`predict.lower()`, four numbers per judge object)."""
    results = folder / "original-results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    ours = sorted(p for p in folder.glob(f"{stem}*.json") if p.name == f"{stem}.json" or p.name.startswith(
        f"{stem}_acc"))
    assert len(ours) == 1, ours
    shutil.copy(ours[0], results / f"{stem}_0to150.json")  # a shard name, as its evaluation runs write them
    files = [results / f for f in os.listdir(results) if f.startswith(stem + "_") and f.endswith(".json")]
    predictions = []
    for path in files:
        predictions.extend(json.loads(path.read_text()))
    predictions = sorted(predictions, key=lambda x: int(x["evaluation_id"]))
    if stem.startswith("SparklesEval"):
        by_id = {}
        for p in predictions:
            if p["evaluation_id"] in by_id:
                for j in judge_models:
                    if j in p and j not in by_id[p["evaluation_id"]]:
                        by_id[p["evaluation_id"]][j] = p[j]
            else:
                by_id[p["evaluation_id"]] = p
        predictions = list(by_id.values())
        out = {}
        for j in judge_models:
            for item in predictions:  # the viewer
                if j in item:
                    a1, c1, c2, c3 = item[j]["A1_C123_scores"]
                    a2, c1, c2, c3 = item[j]["A2_C123_scores"]
                    html.escape(item[j]["response"])
            if j in predictions[0]:
                m1 = [fmean(col) for col in zip(*[item[j]["A1_C123_scores"] for item in predictions])]
                m2 = [fmean(col) for col in zip(*[item[j]["A2_C123_scores"] for item in predictions])]
                t1, t2 = fmean(m1[1:]), fmean(m2[1:])
                out[j] = {"A1_C123": m1, "A2_C123": m2, "A1": t1, "A2": t2, "overall": (t1 + t2) / 2,
                          "n": len(predictions)}
        return out
    for r in predictions:  # the viewer
        assert isinstance(r["label"].lower() == r["predict"].lower(), bool)
        assert r["img_paths"][0].split("/")[-1] and r["img_paths"][1].split("/")[-1]
    correct = sum(p["predict"].lower() == p["label"].lower() for p in predictions)
    return {"accuracy": correct / len(predictions) if predictions else 0, "n": len(predictions)}


@dataclass
class Scripted:
    answer: object
    name: str = "scripted"

    def describe(self):
        return {"kind": "scripted"}

    def answer_batch(self, conversations, params):
        return [self.answer(c) for c in conversations]


def item_of(conversation):
    stem = conversation.slots[0].source.rsplit("/", 1)[1].split(".")[0]
    if "COCO" in stem:
        return (int(stem.rsplit("_", 1)[1]) - 1000) // 2
    if stem.startswith("test1-"):
        return int(stem.split("-")[1]) - 10
    return (int(stem) - 2350000) // 10


def run(tmp_path, task, answer, judge=None):
    out = tmp_path / "run"
    options = RunOptions(out=out, params=SamplingParams(max_new_tokens=8, seed=0), progress=False, batch_size=2)
    meta, results = evaluate(task, Scripted(answer), options, judge)
    return out, meta, write_outputs(out, meta, results)


@pytest.mark.parametrize("broken", [True, False])
def test_bison_file_reads_as_summary(tmp_path, broken):
    task = load_task("bison", bison(tmp_path / "data", 6))

    def answer(c):
        i = item_of(c)
        if broken and i == 1:
            raise ContextLengthError("3000 tokens")  # a failure: no answer at all
        if broken and i in (2, 4):
            return "Both images are plain."  # unreadable: wrong, and kept
        return RIGHT.format(1 + (i + (broken and i == 5)) % 2)  # right, but for item 5 of the broken run

    out, meta, summary = run(tmp_path, task, answer)
    read = original_merge(out, "BISON_scripted")
    assert read["accuracy"] == pytest.approx(summary["accuracy"]) and read["n"] == summary["n"] - summary["failed"]
    note = out / "BISON_scripted.left_out.json"
    if broken:
        assert summary["failed"] == 1 and summary["unparsed"] == 2 and summary["accuracy"] == pytest.approx(2 / 5)
        left = json.loads(note.read_text())
        assert [x["id"] for x in left["left_out"]] == ["1"] and "3000 tokens" in left["left_out"][0]["error"]
        assert left["unreadable_answers_kept_as_wrong"] == ["2", "4"]
        assert left["file"] == "BISON_scripted_acc0.400.json"
        legacy = json.loads((out / left["file"]).read_text())
        assert [r["predict"] for r in legacy if r["evaluation_id"] in (2, 4)] == ["unreadable"] * 2
    else:
        assert summary["failed"] == summary["unparsed"] == 0 and not note.exists()
        assert read["accuracy"] == 1.0


def test_nlvr2_file_reads_as_summary(tmp_path):
    task = load_task("nlvr2", nlvr2(tmp_path / "data", 4))
    out, _, summary = run(tmp_path, task, lambda c: TRUE.format("TRUE") if item_of(c) < 3 else "No idea.")
    assert summary["unparsed"] == 1
    assert original_merge(out, "NLVR2_scripted")["accuracy"] == pytest.approx(summary["accuracy"]) == 0.5


class FakeJudgeClient:
    """A judge endpoint in-process: item 1's judge never follows the format (when `broken`)."""

    def __init__(self, broken):
        self.broken = broken
        self.config = type("Config", (), {"model": "judge-x", "base_url": "http://judge.invalid/v1"})()

    def chat(self, messages, temperature, max_tokens):
        item = int(messages[1]["content"].split("'image_id': ")[1].split(",")[0]) // 10 - 235000
        text = "I cannot see images." if self.broken and item == 1 else judge_text(
            8, (8, 7 + item % 2, 9), 6, (6, 5 + item, 7.5))
        return type("Reply", (), {"text": text})()


@pytest.mark.parametrize("broken", [True, False])
def test_sparkleseval_file_reads_as_summary(tmp_path, broken):
    task = load_task("sparkleseval", sparkleseval(tmp_path / "data", 4))
    judge = Judge(FakeJudgeClient(broken), attempts=2)
    out, _, summary = run(tmp_path, task, lambda c: f"Answer {len(c)}.", judge)
    read = original_merge(out, "SparklesEval_scripted")["judge-x"]
    assert read["overall"] == pytest.approx(summary["score"]) and read["n"] == summary["scored"]
    assert read["A1"] == pytest.approx(summary["per_turn"]["1"]) and read["A2"] == pytest.approx(
        summary["per_turn"]["2"])
    names = [f"judge_A{t}" if k == 0 else f"C{k}_{t}" for t in (1, 2) for k in range(4)]
    assert read["A1_C123"] + read["A2_C123"] == pytest.approx([summary["per_criterion"][n] for n in names])
    note = out / "SparklesEval_scripted.left_out.json"
    if broken:
        assert summary["failed"] == 1 and summary["scored"] == 3
        left = json.loads(note.read_text())["left_out"]
        assert left == [{"id": "1", "status": "failed", "error": left[0]["error"]}] and "2 attempts" in left[0][
            "error"]
        # Our own results keep the failure and every raw reply.
        ours = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert ours[1]["judgment"]["replies"] == ["I cannot see images."] * 2
    else:
        assert summary["failed"] == 0 and not note.exists()

"""The evaluation harness: scores and result files, resample caps, resume after a kill, shards and merge, the
SparklesEval flow against a local judge endpoint, the HTML report and the `sparkles eval` commands."""

import json
from dataclasses import dataclass

import pytest
from evaldata import bison, endpoint, judge_text, sparkleseval

from sparkles.cli import main
from sparkles.client import Client, EndpointConfig
from sparkles.config import SamplingParams
from sparkles.conversation import user_message
from sparkles.errors import ConfigError, ContextLengthError, InputError
from sparkles.eval.harness import RunOptions, evaluate, parse_shard, select
from sparkles.eval.judge import Judge, JudgmentCache
from sparkles.eval.report import load_run, merge_runs, summarize, write_outputs
from sparkles.eval.tasks import Example, Scored, load_task

RIGHT = "Let's think step by step. Both are plain. Therefore, the answer (IMAGE#1 or IMAGE#2) is IMAGE#{}."


class Scripted:
    """A responder that answers with `answer(conversation, params)`, counts its calls, and can be killed."""

    name = "scripted"

    def __init__(self, answer, kill_at=None):
        self.answer, self.kill_at, self.calls = answer, kill_at, []

    def describe(self):
        return {"kind": "scripted"}

    def answer_batch(self, conversations, params):
        self.calls.append((list(conversations), params))
        if len(self.calls) == self.kill_at:
            raise KeyboardInterrupt
        return [self.answer(c, params) for c in conversations]


def item_of(conversation):
    """The item number of a synthetic BISON or SparklesEval conversation, read from its first image file."""
    stem = conversation.slots[0].source.rsplit("/", 1)[1].split(".")[0]
    return (int(stem.rsplit("_", 1)[1]) - 1000) // 2 if "COCO" in stem else (int(stem) - 2350000) // 10


def options(tmp_path, **kw):
    return RunOptions(out=tmp_path / "run", params=SamplingParams(max_new_tokens=8, seed=0), progress=False, **kw)


def test_bison_scores_and_writes_the_original_result_file(tmp_path):
    task = load_task("bison", bison(tmp_path / "data", 4))
    answers = {0: RIGHT.format(1), 1: RIGHT.format(1), 2: RIGHT.format(1), 3: "Both images are plain."}
    responder = Scripted(lambda c, p: answers[item_of(c)])
    meta, results = evaluate(task, responder, options(tmp_path, batch_size=3))
    assert [len(conversations) for conversations, _ in responder.calls] == [3, 1]
    assert [r["value"] for r in results] == [1.0, 0.0, 1.0, 0.0] and not results[3]["parsed"]
    summary = write_outputs(tmp_path / "run", meta, results)
    assert summary["accuracy"] == 0.5 and summary["n"] == 4 and summary["unparsed"] == 1 and summary["failed"] == 0
    assert summary["by_images"] == {"2": {"n": 4, "accuracy": 0.5}} and len(summary["ci95"]) == 2
    legacy = json.loads((tmp_path / "run" / "BISON_scripted_acc0.500.json").read_text())
    assert [r["evaluation_id"] for r in legacy] == [0, 1, 2, 3]
    # The original's code calls predict.lower(): an unreadable answer is a word that no label equals, not null.
    assert legacy[3]["predict"] == "unreadable" and legacy[0]["predict"] == "image#1"
    assert legacy[1]["label"] == "IMAGE#2"
    assert results[3]["prediction"] is None
    assert (tmp_path / "run" / "BISON_scripted_acc0.500.json").read_text().startswith('[\n    {\n        "label"')
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Item 3" in page and "predicted no option (unparsable answer)" in page
    assert "COCO_val2014_000000001006.jpg" in page
    assert "<svg" in (tmp_path / "run" / "distribution.svg").read_text()


def test_resampling_is_capped_and_counted(tmp_path):
    task = load_task("bison", bison(tmp_path / "data", 2))
    # Item 0 reads only when sampled; item 1 never reads.
    responder = Scripted(lambda c, p: RIGHT.format(1) if p.temperature == 1.0 and item_of(c) == 0 else "Unsure.")
    _, results = evaluate(task, responder, options(tmp_path, resample=3))
    assert [r["generations"] for r in results] == [2, 4] and [r["value"] for r in results] == [1.0, 0.0]
    assert [p.temperature for _, p in responder.calls] == [0.0, 1.0, 1.0, 1.0]
    assert [p.seed for _, p in responder.calls] == [0, 1, 2, 3] and responder.calls[1][1].top_p == 0.9


def test_a_killed_run_resumes_without_redoing_anything(tmp_path):
    task = load_task("bison", bison(tmp_path / "data", 5))
    killed = Scripted(lambda c, p: RIGHT.format(1), kill_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(task, killed, options(tmp_path, batch_size=2))
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        evaluate(task, killed, options(tmp_path, batch_size=2))
    again = Scripted(lambda c, p: RIGHT.format(1))
    _, results = evaluate(task, again, options(tmp_path, batch_size=2, resume=True))
    asked = [item_of(c) for conversations, _ in again.calls for c in conversations]
    assert asked == [2, 3, 4] and [r["id"] for r in results] == ["0", "1", "2", "3", "4"]
    idle = Scripted(lambda c, p: RIGHT.format(1))
    assert len(evaluate(task, idle, options(tmp_path, resume=True))[1]) == 5 and idle.calls == []
    with pytest.raises(ConfigError, match="another protocol"):
        evaluate(load_task("bison", tmp_path / "data", extractor="strict"), idle, options(tmp_path, resume=True))


def test_a_failing_item_costs_only_itself_and_is_redone_on_resume(tmp_path):
    task = load_task("bison", bison(tmp_path / "data", 3))

    def answer(c, p):
        if item_of(c) == 1:
            raise ContextLengthError("the conversation is 3000 tokens long")
        return RIGHT.format(1)

    responder = Scripted(answer)
    _, results = evaluate(task, responder, options(tmp_path))
    assert [r["status"] for r in results] == ["ok", "error", "ok"] and "3000 tokens" in results[1]["error"]
    assert [len(c) for c, _ in responder.calls] == [3, 1, 1, 1]  # the batch fails, then one at a time
    assert summarize(results, "accuracy")["failed"] == 1
    fixed = Scripted(lambda c, p: RIGHT.format(2))
    _, results = evaluate(task, fixed, options(tmp_path, resume=True))
    assert [item_of(c) for c in fixed.calls[0][0]] == [1] and results[1]["value"] == 1.0


def test_shards_merged_equal_a_single_run(tmp_path, tiny):
    from sparkles.eval.responders import SparklesResponder
    from sparkles.generate import Chat

    task = load_task("bison", bison(tmp_path / "data", 5))
    responder = SparklesResponder(Chat(*tiny), "tiny")
    single = RunOptions(out=tmp_path / "single", params=SamplingParams(max_new_tokens=6, seed=0), batch_size=2,
                        progress=False)
    meta, whole = evaluate(task, responder, single)
    for i in (1, 2):
        evaluate(task, responder, RunOptions(out=tmp_path / "shards", params=single.params, batch_size=3,
                                             shard=(i, 2), progress=False))
    assert sorted(p.name for p in (tmp_path / "shards").glob("results*")) == ["results.shard1of2.jsonl",
                                                                             "results.shard2of2.jsonl"]
    merged_meta, merged = merge_runs([tmp_path / "shards"], tmp_path / "merged")
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(merged) == drop(whole) and merged_meta["protocol_hash"] == meta["protocol_hash"]
    accuracy = write_outputs(tmp_path / "merged", merged_meta, merged)["accuracy"]
    assert accuracy == summarize(whole, "accuracy")["accuracy"]
    (tmp_path / "shards" / "results.shard2of2.jsonl").unlink()
    with pytest.raises(Exception, match="shards 2/2 have no results"):
        merge_runs([tmp_path / "shards"], tmp_path / "merged2")
    assert parse_shard("2/3") == (2, 3) and [len(select(range(10), limit=None, shard=(i, 3))) for i in (1, 2, 3)] \
        == [3, 3, 4]
    with pytest.raises(ConfigError, match="i/n"):
        parse_shard("2")


def sparkleseval_judge_replies():
    """Per item: the judge's replies, in order. Item 3's judge never follows the format."""
    return {0: [judge_text(9, (9, 8, 10), 8, (8, 8, 7))],
            1: [judge_text(8.5, (8.5, 9, 8), 6.5, (6, 7, 6.5))],
            2: [judge_text(7, (7, 7, 8), 5, (5, 6, 4))[:200], judge_text(7, (7, 7, 8), 5, (5, 6, 4), brackets=False)],
            3: ["As an AI I can't see images."] * 3}


def judge_reply(body, n):
    prompt = body["messages"][1]["content"]
    item = int(prompt.split("'image_id': ")[1].split(",")[0]) // 10 - 235000
    replies = sparkleseval_judge_replies()[item]
    seen = judge_reply.seen.setdefault(item, 0)
    judge_reply.seen[item] += 1
    return replies[min(seen, len(replies) - 1)]


def two_turns(conversation, params):
    """Turn 1 names its item; turn 2 repeats what the model itself said in turn 1."""
    if len(conversation) == 1:
        return f"Turn one about item {item_of(conversation)}."
    return f"Earlier I said: {conversation[1].text} Now {len(conversation.slots)} images."


def test_sparkleseval_against_a_local_judge(tmp_path):
    judge_reply.seen = {}
    task = load_task("sparkleseval", sparkleseval(tmp_path / "data", 4))
    responder = Scripted(two_turns)
    with endpoint(judge_reply) as (url, calls):
        judge = Judge(Client(EndpointConfig(url, "judge-x", backoff=0.0)), attempts=3,
                      cache=JudgmentCache(tmp_path / "cache.jsonl"))
        meta, results = evaluate(task, responder, options(tmp_path, batch_size=2), judge)
        assert len(calls) == 1 + 1 + 2 + 3
    assert results[1]["answers"] == ["Turn one about item 1.", "Earlier I said: Turn one about item 1. Now 4 images."]
    assert any("###Assistant A1:\nTurn one about item 0.\n\n###User Q2:" in c["messages"][1]["content"] for c in calls)
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed"]
    assert results[3]["judgment"]["replies"] == ["As an AI I can't see images."] * 3 and results[3]["value"] is None
    summary = write_outputs(tmp_path / "run", meta, results)
    # The original: average each criterion over the judged items, a turn is the mean of its three, then (A1+A2)/2.
    c1 = [(9 + 8.5 + 7) / 3, (8 + 9 + 7) / 3, (10 + 8 + 8) / 3]
    c2 = [(8 + 6 + 5) / 3, (8 + 7 + 6) / 3, (7 + 6.5 + 4) / 3]
    assert summary["per_turn"]["1"] == pytest.approx(sum(c1) / 3) and summary["per_turn"]["2"] == pytest.approx(
        sum(c2) / 3)
    assert summary["score"] == pytest.approx((sum(c1) / 3 + sum(c2) / 3) / 2)
    assert summary["score"] == pytest.approx(22 / 3)  # (74.5 / 9 + 57.5 / 9) / 2
    assert summary["per_criterion"]["C3_2"] == pytest.approx(17.5 / 3)
    assert summary["per_criterion"]["judge_A1"] == pytest.approx(24.5 / 3)  # kept, but not part of the score
    assert summary["n"] == 4 and summary["scored"] == 3 and summary["failed"] == 1
    assert set(summary["by_images"]) == {"3", "4"}
    legacy = json.loads((tmp_path / "run" / "SparklesEval_scripted.json").read_text())
    assert legacy[0]["judge-x"]["A1_C123_scores"] == [9.0, 9.0, 8.0, 10.0]
    assert legacy[0]["dialogue"][1]["content"] == "Turn one about item 0." and legacy[0]["evaluation_id"] == "0"
    # The failed judgment is left out of the original's file (its code reads four numbers from each) and listed
    # beside it; our results.jsonl keeps it with every raw reply (asserted above).
    assert len(legacy) == 3
    left = json.loads((tmp_path / "run" / "SparklesEval_scripted.left_out.json").read_text())
    assert [x["id"] for x in left["left_out"]] == ["3"] and "no reply parsed" in left["left_out"][0]["error"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "relates the kitchen to the office" in page and "Earlier I said: Turn one about item 2." in page
    assert "no reply parsed in 3 attempts" in page and "../data/images/2350000.jpg" in page


class Killer:
    """A judge that is killed on its first call, as a Ctrl-C while judging would."""

    def __init__(self, judge):
        self.inner, self.killed = judge, False

    def describe(self):
        return self.inner.describe()

    def judge(self, prompt):
        if not self.killed:
            self.killed = True
            raise KeyboardInterrupt
        return self.inner.judge(prompt)


def test_a_run_killed_while_judging_resumes_without_generating_again(tmp_path):
    judge_reply.seen = {}
    task = load_task("sparkleseval", sparkleseval(tmp_path / "data", 3))
    with endpoint(judge_reply) as (url, calls):
        judge = Judge(Client(EndpointConfig(url, "judge-x", backoff=0.0)), cache=JudgmentCache(tmp_path / "c.jsonl"))
        with pytest.raises(KeyboardInterrupt):
            evaluate(task, Scripted(two_turns), options(tmp_path, judge_workers=1), Killer(judge))
        assert (tmp_path / "run" / "answers.jsonl").read_text().count("\n") == 3
        again = Scripted(two_turns)
        _, results = evaluate(task, again, options(tmp_path, resume=True), judge)
        assert again.calls == [] and [r["status"] for r in results] == ["ok", "ok", "ok"]
        judged = len(calls)
        # A fresh run in another folder with the same judge cache pays the judge nothing.
        evaluate(task, Scripted(two_turns), RunOptions(out=tmp_path / "fresh", params=options(tmp_path).params,
                                                       progress=False), judge)
        assert len(calls) == judged


def test_answers_first_and_a_judge_later(tmp_path):
    judge_reply.seen = {}
    task = load_task("sparkleseval", sparkleseval(tmp_path / "data", 2))
    meta, results = evaluate(task, Scripted(two_turns), options(tmp_path))
    assert results == [] and meta["judge"] is None
    assert (tmp_path / "run" / "answers.jsonl").read_text().count("\n") == 2
    with endpoint(judge_reply) as (url, calls):
        judge = Judge(Client(EndpointConfig(url, "judge-x", backoff=0.0)))
        later = Scripted(two_turns)
        meta, results = evaluate(task, later, options(tmp_path, resume=True), judge)
    assert later.calls == [] and len(calls) == 2 and meta["judge"]["model"] == "judge-x"
    assert [r["value"] for r in results] == [pytest.approx((9 + 23 / 3) / 2), pytest.approx((8.5 + 6.5) / 2)]


def test_missing_images_stop_the_run_before_it_starts(tmp_path):
    data = bison(tmp_path / "data", 2)
    (data / "images" / "COCO_val2014_000000001003.jpg").unlink()
    with pytest.raises(InputError, match="1 image files of bison are missing, e.g. .*000000001003.jpg"):
        evaluate(load_task("bison", data), Scripted(lambda c, p: "x"), options(tmp_path))


@dataclass(frozen=True)
class Counting:
    """A new exact task, as the shapes world would add one: two turns, images held as pixels, no judge."""

    items: tuple
    name: str = "counting"
    metric: str = "accuracy"
    legacy_name: str = "Counting"

    def examples(self):
        return self.items

    def judge_prompt(self, example, answers):
        return None

    def score(self, example, answers, judgment=None):
        right = [a.strip() == t for a, t in zip(answers, example.target.split("|"))]
        return Scored(sum(right) / len(right), parts={f"turn_{k + 1}": float(r) for k, r in enumerate(right)})

    def legacy_record(self, example, answers, scored, judgment=None):
        return {"evaluation_id": example.id, "answers": list(answers)}


def test_a_new_exact_task_plugs_in(tmp_path):
    from conftest import solid

    def example(i):
        first = user_message("How many images? <image> <image>", [solid("red"), solid("blue")])
        second = user_message("And now? <image>", [solid("green")], known=["1", "2"])
        return Example(str(i), (first, second), target="2|3")

    task = Counting((example(0), example(1)))
    responder = Scripted(lambda c, p: str(len(c.slots)) if c[0].images[0].pixels is not None else "?")
    meta, results = evaluate(task, responder, options(tmp_path))
    assert [len(c[0]) for c, _ in responder.calls] == [1, 3]  # turn 2 carries turn 1 and its answer
    summary = write_outputs(tmp_path / "run", meta, results)
    assert summary["accuracy"] == 1.0 and summary["per_turn"] == {"1": 1.0, "2": 1.0}
    assert json.loads((tmp_path / "run" / "Counting_scripted_acc1.000.json").read_text())[1]["answers"] == ["2", "3"]
    assert "Item 1" in (tmp_path / "run" / "report.html").read_text()


def test_the_commands(tmp_path, capsys):
    data = bison(tmp_path / "data", 3)
    common = ["--data", str(data), "--max-new-tokens", "4", "--quiet", "--model", "tiny"]
    assert main(["eval", "bison", *common, "--out", str(tmp_path / "a")]) == 0
    assert "| tiny | bison | accuracy 0.000 |" in capsys.readouterr().out
    assert main(["eval", "bison", *common, "--out", str(tmp_path / "a")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    for i in (1, 2):
        assert main(["eval", "bison", *common, "--out", str(tmp_path / "b"), "--shard", f"{i}/2"]) == 0
    assert main(["eval", "merge", str(tmp_path / "b"), "--out", str(tmp_path / "b")]) == 0
    page = tmp_path / "both.html"
    assert main(["eval", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(page),
                 "--embed-images"]) == 0
    html = page.read_text()
    assert html.count("<svg") == 2 and "data:image/jpeg;base64," in html and "Item 2" in html
    assert "<small>tiny (a)</small>" in html and "<small>tiny (b)</small>" in html
    assert [r["answers"] for r in load_run(tmp_path / "b").results] == [r["answers"] for r in
                                                                         load_run(tmp_path / "a").results]
    capsys.readouterr()
    seval = sparkleseval(tmp_path / "seval", 2)
    judge_reply.seen = {}
    with endpoint(judge_reply) as (url, calls):
        args = ["eval", "sparkleseval", "--data", str(seval), "--out", str(tmp_path / "s"), "--references",
                "--judge-base-url", url, "--judge-model", "judge-x", "--judge-cache", "none", "--quiet"]
        assert main(args) == 0
    assert "| references | sparkleseval | score 7.917 |" in capsys.readouterr().out
    assert any("Reference answer one for item 0." in c["messages"][1]["content"] for c in calls)
    assert main(["eval", "nlvr2", "--data", str(data), "--out", str(tmp_path / "n")]) == 2
    assert "no annotation file" in capsys.readouterr().err

"""The judge: the original's parsing on realistic replies, bounded re-asks through a local endpoint, failure
records with the raw text, the disk cache, and pairwise judging with position swap."""

import pytest
from evaldata import endpoint, judge_text

from sparkles.client import Client, EndpointConfig
from sparkles.eval.judge import (
    TEMPLATE,
    Judge,
    JudgmentCache,
    JudgmentParseError,
    combine_swapped,
    compare_runs,
    parse_ratings,
    parse_verdict,
    sparkleseval_prompt,
)


def test_a_well_formed_reply():
    parsed = parse_ratings(judge_text(9, (9, 8, 10), 7, (7, 8, 6)))
    assert parsed == {"A1_C123_scores": [9.0, 9.0, 8.0, 10.0], "A2_C123_scores": [7.0, 7.0, 8.0, 6.0],
                      "mismatch": []}


def test_decimals_and_missing_brackets_parse_as_the_original():
    assert parse_ratings(judge_text(8.67, (8.5, 9, 8.5), 6.5, (6, 7, 6.5)))["A1_C123_scores"] == [8.67, 8.5, 9, 8.5]
    bare = parse_ratings(judge_text(7, (7, 7, 8), 5, (5, 6, 4), brackets=False))
    assert bare["A2_C123_scores"] == [5.0, 5.0, 6.0, 4.0]
    half = judge_text(7, (7, 7, 8), 5, (5, 6, 4)).replace("Rating: [[8]]", "Rating: [8]").replace("is [[5]]", "is 5]]")
    assert parse_ratings(half)["A1_C123_scores"] == [7.0, 7.0, 7.0, 8.0]
    # The overall rating disagreeing with the criteria is flagged, not enforced (int(mean(7, 7, 8)) == 7 != 9).
    assert parse_ratings(judge_text(9, (7, 7, 8), 5, (5, 6, 4)))["mismatch"] == ["A1"]


@pytest.mark.parametrize("reply,reason", [
    (judge_text(9, (9, 8, 10), 7, (7, 8, 6))[:-160], "expected 'rating of A2 is"),  # truncated
    ("I'm sorry, I cannot evaluate images I cannot see.", "expected 'rating of A1 is"),  # nonsense
    ("(C1) looks fine. Rating: 8\n" + judge_text(9, (9, 8, 10), 7, (7, 8, 6)), r"2 ratings for \(C1\).*found 3"),
    (judge_text(9, (9, 8, 10), 7, (7, 8, 6)).replace("(C3)", "(C 3)"), r"\(C3\), one per answer, found 0"),
    (judge_text(9, (9, 8, 10), 7, (7, 8, 6)).replace("(C2)", "(C two)", 1), r"\(C2\).*found 1"),
])
def test_replies_the_original_would_ask_again_for(reply, reason):
    with pytest.raises(JudgmentParseError, match=reason):
        parse_ratings(reply)


def test_the_prompt_is_the_original_template():
    prompt = sparkleseval_prompt([{"image_id": 7, "caption": "A cat."}], "Q one", "A one", "Q two", "A two")
    assert prompt.startswith("Users will interact with a conversational assistant. The assistant is designed")
    assert "```json\n[{'image_id': 7, 'caption': 'A cat.'}]\n```" in prompt
    dialogue = "###User Q1:\nQ one\n\n###Assistant A1:\nA one\n\n###User Q2:\nQ two\n\n###Assistant A2:\nA two\n```"
    assert dialogue in prompt
    assert prompt.endswith("Therefore, the overall rating of A2 is [[5]]\n```\n")
    assert TEMPLATE.count("{") == 5 and len(TEMPLATE.splitlines()) == 42


def test_a_criterion_without_its_number_reads_the_next_rating_as_the_original():
    # The original's lazy match runs across lines to the next "Rating: N" in the same answer's section.
    reply = judge_text(9, (9, 8, 10), 7, (7, 6, 6)).replace("Rating: [[8]]", "Rating: eight")
    assert parse_ratings(reply)["A1_C123_scores"] == [9.0, 9.0, 10.0, 10.0]


def judge_for(url, tmp_path=None, **kw):
    client = Client(EndpointConfig(url, "judge-x", backoff=0.0, max_attempts=3))
    cache = JudgmentCache(tmp_path / "cache.jsonl") if tmp_path else None
    return Judge(client, cache=cache, **kw)


def test_reasks_are_bounded_and_failures_keep_the_raw_text(tmp_path):
    good = judge_text(8, (8, 9, 7), 6, (6, 6, 7))
    replies = {"truncated": [good[:90], good], "nonsense": ["No idea."] * 5, "down": [(500, "overloaded")] * 9}

    def reply(body, n):
        prompt = body["messages"][1]["content"]
        case = next(k for k in replies if k in prompt)
        seen = sum(case in c["messages"][1]["content"] for c in calls)
        return replies[case][seen - 1]

    with endpoint(reply) as (url, calls):
        judge = judge_for(url, tmp_path, attempts=3)
        ok = judge.judge("truncated")
        assert ok.status == "ok" and ok.attempts == 2 and ok.replies == (good[:90], good)
        assert ok.parsed["A2_C123_scores"] == [6.0, 6.0, 6.0, 7.0]
        assert [c["temperature"] for c in calls] == [0.0, 1.0]  # re-asks sample, as the original always did
        assert calls[0]["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        assert {c["model"] for c in calls} == {"judge-x"} and calls[0]["max_tokens"] == 1024
        failed = judge.judge("nonsense")
        assert failed.status == "failed" and failed.attempts == 3 and failed.replies == ("No idea.",) * 3
        assert failed.response == "No idea." and "no reply parsed in 3 attempts" in failed.error
        before = len(calls)
        down = judge.judge("down")  # the client retries 3 times, then the judge records an error
        assert down.status == "error" and "HTTP 500: overloaded" in down.error and len(calls) == before + 3
        # Parsed and failed judgments are cached on disk, endpoint errors are not: a new judge pays nothing twice.
        before = len(calls)
        again = judge_for(url, tmp_path, attempts=3)
        assert again.judge("truncated").cached and again.judge("nonsense").status == "failed"
        assert len(calls) == before
        assert again.judge("down").status == "error" and len(calls) == before + 3
        # Another judge model is another key.
        other = Judge(Client(EndpointConfig(url, "judge-y")), cache=JudgmentCache(tmp_path / "cache.jsonl"))
        assert other.key("truncated") != again.key("truncated")
        # So is the same model name at another endpoint: its judgments are not this one's.
        elsewhere = Judge(Client(EndpointConfig("http://127.0.0.1:9/v1", "judge-x")),
                          cache=JudgmentCache(tmp_path / "cache.jsonl"))
        assert elsewhere.key("truncated") != again.key("truncated")
        assert Judge(Client(EndpointConfig(url, "judge-x"))).key("truncated") == again.key("truncated")


def test_pairwise_with_position_swap(tmp_path):
    assert parse_verdict("A is more detailed. [[A]]") == {"verdict": "A"}
    assert parse_verdict("[[B]] ... on reflection [[C]]") == {"verdict": "tie"}
    with pytest.raises(JudgmentParseError):
        parse_verdict("A wins")
    assert combine_swapped("A", "B") == "first" and combine_swapped("B", "A") == "second"
    assert combine_swapped("A", "A") == "inconsistent" and combine_swapped("tie", "tie") == "tie"

    def record(i, answers):
        dialogue = [{"role": "user", "content": f"Q{i} IMAGE#5<Img><ImageHere></Img>",
                     "images": [{"image_id": 5, "caption": "c"}]}, {"role": "assistant", "content": answers[0]},
                    {"role": "user", "content": "Q2", "images": []}, {"role": "assistant", "content": answers[1]}]
        return {"id": str(i), "answers": answers, "legacy": {"dialogue": dialogue}}

    first = [record(0, ["long careful answer", "more"]), record(1, ["x", "y"])]
    second = [record(0, ["short", "short"]), record(1, ["p", "q"])]

    def reply(body, n):  # prefers the careful answer wherever it stands on item 0; always "A" on item 1
        prompt = body["messages"][1]["content"]
        if "Q0 IMAGE#5" not in prompt:
            return "Both fine, the first shown is better. [[A]]"
        a_part = prompt.split("[Assistant A, first answer]")[1].split("[Assistant B")[0]
        return "[[A]]" if "careful" in a_part else "[[B]]"

    with endpoint(reply) as (url, calls):
        verdicts = compare_runs(judge_for(url), first, second, workers=2)
    assert len(calls) == 4
    assert [i["outcome"] for i in verdicts["items"]] == ["first", "inconsistent"]
    assert verdicts["counts"]["first"] == 1 and verdicts["win_rate"] == 0.75 and verdicts["swap_consistency"] == 0.5
    assert "<Img>" not in calls[0]["messages"][1]["content"]

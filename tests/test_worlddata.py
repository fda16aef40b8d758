"""The shapes world as training data and benchmark: endless sources, the fitted tokenizer, exact accuracy."""

import pytest

from sparkles.config import DataSource, SamplingParams
from sparkles.errors import ConfigError
from sparkles.generate import Chat
from sparkles.train.records import read_source
from sparkles.world.data import WorldSamples, evaluate_world, world_tokenizer


def test_world_sources_are_endless_deterministic_and_loaded():
    samples, report = read_source(DataSource("world:dialogue"), seed=3)
    assert len(samples) >= 10**6 and report.samples == len(samples)
    a, b = samples[5], WorldSamples("dialogue", 3)[5]
    assert [m.text for m in a.conversation] == [m.text for m in b.conversation]
    assert a.conversation.slots[0].pixels is not None and a.loss_on == "all"
    assert [m.text for m in samples[6].conversation] != [m.text for m in a.conversation]
    with pytest.raises(ConfigError, match="unknown world source world:maze"):
        WorldSamples("maze", 0)


def test_dialogues_of_more_turns_are_a_source_option_that_leaves_two_turn_streams_alone():
    def turns(name):
        return [sum(m.role == "user" for m in WorldSamples(name, 0)[i].conversation) for i in range(40)]

    assert set(turns("dialogue/worked?turns=3")) == {2, 3} and set(turns("dialogue/worked")) == {2}
    samples, _ = read_source(DataSource("world:dialogue?turns=4"), seed=0)
    assert max(sum(m.role == "user" for m in samples[i].conversation) for i in range(40)) == 4
    for bad in ("dialogue?turns=1", "bison?turns=3", "dialogue?rounds=3"):
        with pytest.raises(ConfigError, match="dialogues take \\?turns=N"):
            WorldSamples(bad, 0)


def test_the_fitted_tokenizer_is_compact_and_exact():
    tok = world_tokenizer()
    text = "IMAGE#2 has two red squares and a big blue circle."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 14 and tok.decode(ids) == text
    odd = "Zebra ⭐ naïve"  # words the world never uses still encode, byte by byte
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id


def test_evaluate_world_scores_every_task_type_and_the_blind_baseline(tiny):
    chat = Chat(*tiny)
    result = evaluate_world(chat, n=2, seed=5, params=SamplingParams(max_new_tokens=8))
    assert set(result.accuracy) == {"bison", "nlvr2", "dialogue", "dialogue turn 1", "dialogue turn 2", "caption",
                                    "caption precision", "caption recall"}
    assert result.n["bison"] == 2 and result.n["dialogue"] == 4 and result.n["caption"] == 2
    captions = [r["objects"] for r in result.rows if r["kind"] == "caption"]  # (matched, claimed, present) each
    assert result.n["caption recall"] == sum(c[2] for c in captions) >= 2
    assert result.accuracy["caption recall"] == sum(c[0] for c in captions) / result.n["caption recall"]
    assert all(0.0 <= v <= 1.0 for v in result.accuracy.values())
    assert {row["turn"] for row in result.rows} == {1, 2}
    blind = evaluate_world(chat, n=1, seed=5, blank=True, params=SamplingParams(max_new_tokens=4))
    assert blind.n["nlvr2"] == 1


def test_sparkles_eval_shapes_reports_accuracy_per_task_type(tmp_path, capsys):
    import json

    from sparkles.cli import main

    out = tmp_path / "run"
    assert main(["eval", "shapes", "--n", "2", "--seed", "4", "--out", str(out), "--max-new-tokens", "6",
                 "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 8 and summary["task"] == "shapes"
    assert set(summary["per_criterion"]) == {"bison", "nlvr2", "dialogue turn 1", "dialogue turn 2", "caption",
                                             "caption precision", "caption recall"}
    assert "data:image/png" in (out / "report.html").read_text()  # generated images travel inside the report
    assert main(["eval", "bison", "--out", str(tmp_path / "b")]) == 2
    assert "needs --data DIR" in capsys.readouterr().err


def test_demo_plays_a_checked_dialogue_and_writes_a_page(tmp_path, capsys):
    from sparkles.cli import main

    assert main(["demo", "--seed", "7", "--out", str(tmp_path / "demo"), "--turns", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("USER: ") == 2 and out.count("SPARKLES: ") == 2 and "answers right" in out
    assert "sparkles chat --image" in out
    page = (tmp_path / "demo" / "demo.html").read_text()
    assert page.count('<div class="user">') == 2 and (tmp_path / "demo" / "IMAGE1.png").is_file()

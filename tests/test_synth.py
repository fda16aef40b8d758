"""`sparkles synth` end to end: a scripted OpenAI-compatible endpoint on 127.0.0.1 (valid, truncated, wrong ids,
missing turns, empty, HTTP 500), bounded retries, resume after a kill, determinism, the template teacher, and
the statistics report and viewer."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image as PILImage

from sparkles.cli import main
from sparkles.client import EndpointConfig, EndpointError
from sparkles.synth.prompts import MODES, Caption
from sparkles.synth.run import LLMTeacher, SynthConfig, TemplateTeacher, synthesize
from sparkles.synth.store import read_jsonl

CAPTIONS = [Caption(f"img{k}", f"a photo of place number {k}, with trees and a path") for k in range(60)]


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client killed mid-request (the SIGKILL test) is expected, not a failure of the endpoint


class Endpoint:
    """A tiny OpenAI-compatible chat endpoint answering `script(request number, candidate ids)` with
    (status, text[, finish_reason]); it records each request body."""

    def __init__(self, script, delay=0.0):
        self.script, self.delay, self.requests, lock = script, delay, [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    endpoint.requests.append(body)
                    number = len(endpoint.requests)
                prompt = body["messages"][-1]["content"]
                ids = [str(c["image_id"]) for c in json.loads(re.findall(r"```json\n(.*?)\n```", prompt, re.S)[1])]
                status, text, *finish = endpoint.script(number, ids)
                time.sleep(endpoint.delay)
                payload = {"choices": [{"message": {"role": "assistant", "content": text},
                                        "finish_reason": finish[0] if finish else "stop"}],
                           "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4},
                           "model": body["model"]} if status == 200 else {"error": {"message": text}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def endpoint():
    started = []

    def start(script, delay=0.0):
        started.append(Endpoint(script, delay))
        return started[-1]

    yield start
    for e in started:
        e.server.shutdown()
        e.server.server_close()


def talk(first, later):
    names = " and ".join(f"IMAGE#{i}" for i in first)
    return [{"role": "user", "image_ids": first, "content": f"What story could connect {names}?"},
            {"role": "assistant", "content": f"In {names} a quiet scene unfolds, with small details worth a look."},
            {"role": "user", "image_ids": later, "content": f"How does IMAGE#{later[0]} change the story of "
                                                            f"IMAGE#{first[0]}?"},
            {"role": "assistant", "content": f"IMAGE#{later[0]} adds a new place, so IMAGE#{first[0]} moves on."}]


def good(ids):
    """Three CC dialogues (first turns of 1, 2, 3 images, then 1) from nine candidate ids."""
    return [talk(ids[0:1], [ids[6]]), talk(ids[1:3], [ids[7]]), talk(ids[3:6], [ids[8]])]


def teacher(url, **kw):
    return LLMTeacher(EndpointConfig(url, "teacher-1", timeout=10, backoff=0.01, **kw))


def test_teacher_outputs_are_kept_or_rejected_with_their_reasons(endpoint, tmp_path):
    def script(number, ids):
        replies = good(ids)
        if number == 2:  # cut inside the third dialogue, as max_tokens does
            text = json.dumps(replies)
            return 200, text[: text.index(f'["{ids[8]}"]')], "length"
        if number == 3:
            replies[0][0]["image_ids"] = ["nope"]
            replies[1] = talk([c for c in (x.key for x in CAPTIONS) if c not in ids][:2], [ids[7]])
        if number == 4:
            replies[0] = replies[0][:2]
        if number == 5:
            return 200, ""
        if number == 6:
            return 500, "overloaded"
        if number == 8:  # Python repr, with 'caption' for 'content' (the original saw both)
            replies[0][1]["caption"] = replies[0][1].pop("content")
            return 200, "```python\n" + repr(replies) + "\n```"
        if number == 9:
            replies[1], replies[2][3]["content"] = replies[0], "..."
        return 200, json.dumps(replies)

    e = endpoint(script)
    config = SynthConfig(n=100, concurrency=1, max_calls=8, price_in=0.01, price_out=0.03)
    summary = synthesize(CAPTIONS, teacher(e.url), out=tmp_path, config=config, progress=False)
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert Counter(r["reason"] for r in rejects) == {"missing_dialogue": 1, "unknown_image": 1, "not_a_candidate": 1,
                                                     "message_count": 1, "empty_reply": 1, "placeholder": 1,
                                                     "duplicate": 1}
    assert all(r["raw"] or r["reason"] == "empty_reply" for r in rejects)
    assert "finish_reason length" in next(r["detail"] for r in rejects if r["reason"] == "missing_dialogue")
    dataset = read_jsonl(tmp_path / "dataset.jsonl")
    assert len(dataset) == summary["dialogues"] == 3 + 2 + 1 + 2 + 0 + 3 + 3 + 1
    assert len({r["id"] for r in dataset}) == len(dataset) and len(e.requests) == 9  # one retry after the 500
    calls = read_jsonl(tmp_path / "calls.jsonl")
    assert [c["attempts"] for c in calls] == [1, 1, 1, 1, 1, 2, 1, 1]
    assert {r["synth"]["parse"] for r in dataset} == {"json", "regex", "literal"}
    assert any("'caption' used" in w for r in dataset for w in r["synth"]["warnings"])
    tokens = [sum(c["usage"][k] for c in calls) for k in ("prompt_tokens", "completion_tokens")]
    assert [summary["prompt_tokens"], summary["completion_tokens"]] == tokens
    assert summary["cost"] == pytest.approx((tokens[0] * 0.01 + tokens[1] * 0.03) / 1000, abs=1e-6)
    assert {b["model"] for b in e.requests} == {"teacher-1"} and e.requests[0]["temperature"] == 1.0
    exported = json.loads((tmp_path / "SparklesDialogue.json").read_text())
    assert exported == dataset and exported[0]["raw"][0]["prompt"].startswith("Users will interact")


def test_a_failing_endpoint_stops_the_run_and_resume_retries_its_calls(endpoint, tmp_path):
    e = endpoint(lambda number, ids: (500, "down"))
    config = SynthConfig(n=6, concurrency=1, max_failures=2)
    with pytest.raises(EndpointError, match="stopped after 2 failed calls in a row"):
        synthesize(CAPTIONS, teacher(e.url, max_attempts=2), out=tmp_path, config=config, progress=False)
    tries = Counter(r["messages"][-1]["content"] for r in e.requests)  # per call; a third may have been in flight
    assert list(tries.values())[:2] == [2, 2] and len(tries) <= 3 and max(tries.values()) == 2
    assert [r["reason"] for r in read_jsonl(tmp_path / "rejects.jsonl")] == ["endpoint_error"] * 2
    assert read_jsonl(tmp_path / "calls.jsonl") == []  # failed calls stay open
    e.script = lambda number, ids: (200, json.dumps(good(ids)))
    summary = synthesize(CAPTIONS, teacher(e.url), out=tmp_path, config=config, resume=True, progress=False)
    assert summary["dialogues"] == 6 and summary["this_run"]["calls"] == 2


class Killed(Exception):
    pass


class KilledAfter:
    """The teacher of a run that dies at its k-th call."""

    def __init__(self, inner, k):
        self.inner, self.k, self.name, self.calls, self.lock = inner, k, inner.name, 0, threading.Lock()

    def __call__(self, call):
        with self.lock:
            self.calls += 1
            if self.calls > self.k:
                raise Killed()
        return self.inner(call)


def test_a_killed_run_resumes_to_the_same_dataset(endpoint, tmp_path):
    e = endpoint(lambda number, ids: (200, json.dumps(good(ids))))
    config = SynthConfig(n=10, concurrency=3)
    whole = synthesize(CAPTIONS, teacher(e.url), out=tmp_path / "whole", config=config, progress=False)
    assert whole["dialogues"] == 10 and whole["surplus"] == 2  # 4 calls of 3; the last keeps 1
    with pytest.raises(Killed):
        synthesize(CAPTIONS, KilledAfter(teacher(e.url), 2), out=tmp_path / "cut", config=config, progress=False)
    assert 0 < len(read_jsonl(tmp_path / "cut" / "dataset.jsonl")) < 10
    # A kill between a call's dataset lines and its ledger line, then half a line:
    calls = (tmp_path / "cut" / "calls.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "calls.jsonl").write_text("".join(calls[:-1]))
    with (tmp_path / "cut" / "dataset.jsonl").open("a") as f:
        f.write('{"id": "cc-s0-c000009-d0", "dialo')
    resumed = synthesize(CAPTIONS, teacher(e.url), out=tmp_path / "cut", config=config, resume=True, progress=False)
    assert resumed["dialogues"] == 10
    assert (tmp_path / "cut" / "dataset.jsonl").read_text() == (tmp_path / "whole" / "dataset.jsonl").read_text()
    assert "half-written" in (tmp_path / "cut" / "synth.log").read_text()


def test_a_seed_gives_the_same_dataset_at_any_concurrency(endpoint, tmp_path):
    e = endpoint(lambda number, ids: (200, json.dumps(good(ids))))
    for name, seed, concurrency in (("a", 3, 1), ("b", 3, 4), ("c", 4, 4)):
        config = SynthConfig(n=9, seed=seed, concurrency=concurrency)
        synthesize(CAPTIONS, teacher(e.url), out=tmp_path / name, config=config, progress=False)
    text = {name: (tmp_path / name / "dataset.jsonl").read_text() for name in "abc"}
    assert text["a"] == text["b"] != text["c"]


def test_sigkill_then_resume_with_the_command(endpoint, tmp_path):
    e = endpoint(lambda number, ids: (200, json.dumps(good(ids))), delay=0.15)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": c.key, "caption": c.caption}) + "\n" for c in CAPTIONS))
    args = ["synth", "--captions", str(captions), "--out", str(tmp_path / "out"), "--n", "30", "--teacher-base-url",
            e.url, "--teacher-model", "teacher-1", "--concurrency", "2", "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "sparkles.cli", *args], stderr=subprocess.DEVNULL)
    ledger, deadline = tmp_path / "out" / "calls.jsonl", time.monotonic() + 30
    while time.monotonic() < deadline and (not ledger.exists() or len(ledger.read_text().splitlines()) < 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    before = len(read_jsonl(tmp_path / "out" / "dataset.jsonl"))
    assert 0 < before < 30
    e.delay = 0.0
    assert main([*args, "--resume"]) == 0
    ids = [r["id"] for r in read_jsonl(tmp_path / "out" / "dataset.jsonl")]
    assert len(ids) == len(set(ids)) == 30


def make_world(folder, n=16, scenes=True):
    """A small captions file with scenes, and one PNG per image under images/."""
    (folder / "images").mkdir(parents=True)
    records = []
    for k in range(n):
        objects = [{"shape": ("circle", "square", "triangle")[(k + j) % 3], "color": ("red", "blue")[j % 2],
                    "size": "big", "x": 0.2 + 0.3 * j, "y": 0.5} for j in range(1 + k % 3)]
        PILImage.new("RGB", (16, 16), (k * 10, 100, 200)).save(folder / "images" / f"w{k}.png")
        records.append({"image_id": f"w{k}", "caption": f"{len(objects)} shapes on a plain background",
                        "file": f"images/w{k}.png"} | ({"scene": {"background": "white", "objects": objects}}
                                                      if scenes else {}))
    (folder / "captions.json").write_text(json.dumps(records))
    return folder / "captions.json"


def test_the_template_teacher_with_the_command_then_stats_and_view(tmp_path, capsys):
    captions = make_world(tmp_path / "world")
    out = tmp_path / "out"
    base = ["--captions", str(captions), "--images", str(tmp_path / "world" / "images"), "--teacher", "template",
            "--out", str(out), "--quiet"]
    assert main(["synth", *base, "--n", "9"]) == 0
    assert "9 dialogues" in capsys.readouterr().out
    assert main(["synth", "run", *base, "--n", "12", "--resume"]) == 0
    assert main(["synth", "stats", str(out)]) == 0
    printed = capsys.readouterr().out
    records = read_jsonl(out / "dataset.jsonl")
    images = [i["image_id"] for r in records for m in r["dialogue"] for i in m.get("images", [])]
    assert f"12 dialogues, {len(set(images))} unique / {len(images)} total images" in printed
    report = (out / "report.md").read_text()
    assert "| dialogues | 12 |" in report and "spaCy" in report and (out / "plots" / "user_words.svg").exists()
    assert "<svg" in (out / "report.html").read_text()
    assert main(["synth", "view", str(out), "--limit", "5"]) == 0
    page = (out / "view.html").read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert page.count("<section") == 5 and sources and all((out / s).resolve().exists() for s in sources)


def test_vg_mode_deals_each_image_once(tmp_path):
    captions = [Caption(f"v{k}", "shapes", {"objects": [{"shape": "star", "color": "red"}] * (1 + k % 4)})
                for k in range(40)]
    config = SynthConfig(MODES["vg"], n=6)
    summary = synthesize(captions, TemplateTeacher(MODES["vg"]), out=tmp_path, config=config, progress=False)
    records = read_jsonl(tmp_path / "dataset.jsonl")
    images = [i["image_id"] for r in records for m in r["dialogue"] for i in m.get("images", [])]
    assert summary["dialogues"] == 6 and len(images) == len(set(images))
    assert [len(r["dialogue"][0]["images"]) for r in records] == [2, 3, 2, 3, 2, 3]


def test_command_errors_say_what_to_do(tmp_path, capsys):
    plain = make_world(tmp_path / "plain", scenes=False)
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(["synth", "--captions", str(plain), "--teacher", "template", *out]) == 2
    assert "have no 'scene'" in capsys.readouterr().err
    assert main(["synth", "--captions", str(plain), *out]) == 2
    assert "needs --teacher-base-url and --teacher-model" in capsys.readouterr().err
    world = make_world(tmp_path / "world")
    assert main(["synth", "--captions", str(world), "--teacher", "template", "--n", "3", *out]) == 0
    assert main(["synth", "--captions", str(world), "--teacher", "template", "--n", "3", *out]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["synth", "--captions", str(world), "--teacher", "template", "--seed", "1", "--resume", *out]) == 2
    assert "other settings (seed=0)" in capsys.readouterr().err
    assert main(["synth", "--captions", str(world), "--later-images", "1-2-3", *out]) == 2

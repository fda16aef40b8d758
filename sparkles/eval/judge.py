"""The SparklesEval judge: the original's prompt and score parsing (spec §9.3–9.4), bounded re-asks, a disk cache,
and a pairwise mode with position swap (MT-Bench practice).

Prompts and parsers are pure functions; `Judge` is the I/O edge that talks to an OpenAI-compatible endpoint
through `client.Client`. Aggregating scores over items is `report.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from ..errors import ConfigError, SparklesError

log = logging.getLogger(__name__)

# The original's judge prompt, verbatim (spec §9.3); it ends with a newline after the closing fence.
TEMPLATE = """Users will interact with a conversational assistant. The assistant is designed to understand, analyze, and reason about multiple images across two turns of conversation. The assistant is expected to provide highly helpful and exceptionally detailed answers providing comprehensive reasoning regarding the visual content of the images.

Below are images represented by their image ids and captions (delimited by triple quotes):
```json
{images}
```

Next is a dialogue between a user and the assistant regarding the images above:
```
###User Q1:
{Q1}

###Assistant A1:
{A1}

###User Q2:
{Q2}

###Assistant A2:
{A2}
```

Your task as an impartial judge is to evaluate the responses (A1 and A2) provided by the assistant to the user's questions.
Please rate the following three criteria C1, C2, and C3 on a scale of 1-10 for A1 and A2 separately, where a higher score indicates better overall performance:
(C1) Image Understanding and Reasoning: This measures the assistant's ability to accurately identify and describe objects, context, and relationships within and between the images.
(C2) Cross-Image and Cross-Turn Coherence: This evaluates the assistant's ability to maintain a consistent understanding across multiple images and dialogue turns.
(C3) Relevance and Completeness of Responses: This assesses whether the assistant's responses are directly related to the user's inquiries and the images' content, and whether the responses provide thorough, detailed answers.

Begin your evaluation by providing a short explanation for each criterion. Be as objective as possible. After providing your explanation, rate the response on a scale of 1 to 10 by strictly following the format below (note that "5" and "..." are placeholders):
```
* Evaluating A1
- (C1) Explanation: "..." Rating: [[5]]
- (C2) Explanation: "..." Rating: [[5]]
- (C3) Explanation: "..." Rating: [[5]]
Therefore, the overall rating of A1 is [[5]]

* Evaluating A2
- (C1) Explanation: "..." Rating: [[5]]
- (C2) Explanation: "..." Rating: [[5]]
- (C3) Explanation: "..." Rating: [[5]]
Therefore, the overall rating of A2 is [[5]]
```
"""  # noqa: E501
SYSTEM = "You are a helpful assistant."  # the original's system message

_NUMBER = r"\[?\[?(\d+\.?\d*)\]?\]?"  # an int or decimal, optionally in [[ ]], as the original reads it
_OVERALL = {turn: re.compile(rf"rating of {turn} is {_NUMBER}") for turn in ("A1", "A2")}
_CRITERION = {c: re.compile(rf"\({c}\)(.*?)Rating: {_NUMBER}", re.DOTALL) for c in ("C1", "C2", "C3")}
_SECTION = re.compile(r"Evaluating [A-Za-z0-9]+")


class JudgmentParseError(SparklesError):
    """A judge reply that does not follow the requested format."""


def sparkleseval_prompt(images: list[Any], q1: str, a1: str, q2: str, a2: str) -> str:
    """The judge prompt; `images` is the list of {image_id, caption} dicts, written with str() as the original."""
    return TEMPLATE.format(images=images, Q1=q1, A1=a1, Q2=q2, A2=a2)


def parse_ratings(text: str) -> dict[str, Any]:
    """[A1, C1, C2, C3] and [A2, C1, C2, C3] from a judge reply, exactly as the original reads them (spec §9.4).

    The overall ratings are the first "rating of A1/A2 is N"; each criterion is read once per section split at
    "Evaluating <word>" (text before the first one counts as a section) and must appear exactly twice.
    """
    overall = {}
    for turn, pattern in _OVERALL.items():
        found = pattern.search(text)
        if found is None:
            raise JudgmentParseError(f"expected 'rating of {turn} is [[N]]', found none")
        overall[turn] = float(found.group(1))
    sections = _SECTION.split(text)
    criteria = {}
    for name, pattern in _CRITERION.items():
        scores = [float(m.group(2)) for m in (pattern.search(s) for s in sections) if m]
        if len(scores) != 2:
            raise JudgmentParseError(f"expected 2 ratings for ({name}), one per answer, found {len(scores)}")
        criteria[name] = scores
    first = [overall["A1"], *(criteria[c][0] for c in ("C1", "C2", "C3"))]
    second = [overall["A2"], *(criteria[c][1] for c in ("C1", "C2", "C3"))]
    # The original prints a warning when the overall rating disagrees with its criteria, and keeps both.
    mismatch = [t for t, s in (("A1", first), ("A2", second)) if int(fmean(s[1:])) != int(s[0])]
    return {"A1_C123_scores": first, "A2_C123_scores": second, "mismatch": mismatch}


# Pairwise comparison with position swap. The original has no pairwise mode: this prompt is ours.

PAIRWISE_TEMPLATE = """You compare two assistants that each held the same two-turn conversation with a user about several images. You cannot see the images; each is given by its id and a caption:
```json
{images}
```

The user's first question was:
{Q1}

The user's second question was:
{Q2}

[Assistant A, first answer]
{A1}
[Assistant A, second answer]
{A2}

[Assistant B, first answer]
{B1}
[Assistant B, second answer]
{B2}

Decide which assistant understood the images better, stayed consistent across images and turns, and answered both questions more relevantly and completely. Ignore the order in which the assistants are shown and the length of their answers. Explain your decision briefly, then end with exactly one verdict: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie.
"""  # noqa: E501

_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def pairwise_prompt(images: list[Any], q1: str, q2: str, first: tuple[str, str], second: tuple[str, str]) -> str:
    return PAIRWISE_TEMPLATE.format(images=images, Q1=q1, Q2=q2, A1=first[0], A2=first[1], B1=second[0],
                                    B2=second[1])


def parse_verdict(text: str) -> dict[str, str]:
    """{"verdict": "A" | "B" | "tie"} from the last [[A]], [[B]] or [[C]] of a reply."""
    found = _VERDICT.findall(text)
    if not found:
        raise JudgmentParseError("expected a verdict [[A]], [[B]] or [[C]], found none")
    return {"verdict": {"A": "A", "B": "B", "C": "tie"}[found[-1]]}


def combine_swapped(straight: str, swapped: str) -> str:
    """One outcome from two verdicts, the second with the answers' positions swapped: "first", "second", "tie",
    or "inconsistent" when the verdicts disagree (counted as a tie, as MT-Bench does)."""
    unswap = {"A": "B", "B": "A", "tie": "tie"}[swapped]
    if straight != unswap:
        return "inconsistent"
    return {"A": "first", "B": "second", "tie": "tie"}[straight]


# Asking the judge


@dataclass(frozen=True)
class Judgment:
    model: str
    prompt: str
    response: str  # the reply that parsed, or the last one that did not
    status: str  # "ok"; "failed": no reply parsed within the attempts; "error": the endpoint gave no reply
    parsed: dict[str, Any] = field(default_factory=dict)  # what the parser read (empty unless ok)
    attempts: int = 0
    replies: tuple[str, ...] = ()  # every raw reply, so a failure can be read
    error: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"replies": list(self.replies)}


class JudgmentCache:
    """Judgments on disk, keyed by a hash of (judge model, settings, messages): a rerun pays nothing twice.

    An append-only JSON Lines file, safe to share between the threads of one process.
    """

    def __init__(self, path: str | Path):
        self.path, self.lock = Path(path), threading.Lock()
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill: that judgment is simply asked again
                    self.entries[entry["key"]] = entry["judgment"]

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, judgment: dict) -> None:
        with self.lock:
            self.entries[key] = judgment
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "judgment": judgment}, ensure_ascii=False) + "\n")


class Judge:
    """Asks an OpenAI-compatible judge, re-asking a bounded number of times while the reply does not parse.

    The first attempt uses `temperature` (0: reproducible); re-asks use `retry_temperature` (the original's 1.0),
    since a deterministic judge would only repeat a reply that did not parse.
    """

    def __init__(self, client, *, cache: JudgmentCache | None = None, attempts: int = 3, temperature: float = 0.0,
                 retry_temperature: float = 1.0, max_tokens: int = 1024, system: str = SYSTEM):
        if attempts < 1:
            raise SparklesError(f"judge attempts must be >= 1, got {attempts}")
        self.client, self.cache, self.attempts = client, cache, attempts
        self.settings = {"temperature": temperature, "retry_temperature": retry_temperature,
                         "max_tokens": max_tokens, "system": system}

    @property
    def model(self) -> str:
        return self.client.config.model

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.client.config.base_url, "attempts": self.attempts,
                "template_sha256": hashlib.sha256(TEMPLATE.encode()).hexdigest()[:16], **self.settings}

    def key(self, prompt: str) -> str:
        # The base URL is part of the key: one model name at two endpoints (a provider and a local server) is two
        # judges, and one's judgments must not be served as the other's.
        data = json.dumps([self.model, self.client.config.base_url, self.settings, prompt], ensure_ascii=False,
                          sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()

    def judge(self, prompt: str, parse: Callable[[str], dict] = parse_ratings) -> Judgment:
        key = self.key(prompt)
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            return Judgment(**{**hit, "replies": tuple(hit["replies"]), "cached": True})
        judgment = self._ask(prompt, parse)
        if self.cache and judgment.status != "error":  # an endpoint failure is worth asking again later
            self.cache.put(key, {k: v for k, v in judgment.to_dict().items() if k != "cached"})
        return judgment

    def _ask(self, prompt: str, parse: Callable[[str], dict]) -> Judgment:
        from ..client import EndpointError

        messages = [{"role": "system", "content": self.settings["system"]}, {"role": "user", "content": prompt}]
        replies: list[str] = []
        reason = ""
        for attempt in range(1, self.attempts + 1):
            temperature = self.settings["temperature" if attempt == 1 else "retry_temperature"]
            try:
                reply = self.client.chat(messages, temperature=temperature, max_tokens=self.settings["max_tokens"])
            except EndpointError as e:
                return Judgment(self.model, prompt, replies[-1] if replies else "", "error", attempts=attempt,
                                replies=tuple(replies), error=str(e))
            replies.append(reply.text)
            try:
                parsed = parse(reply.text)
            except JudgmentParseError as e:
                reason = str(e)
                log.warning("judge reply %d/%d did not parse (%s)", attempt, self.attempts, reason)
                continue
            if parsed.get("mismatch"):
                log.warning("judge: overall rating of %s disagrees with its criteria", ", ".join(parsed["mismatch"]))
            return Judgment(self.model, prompt, reply.text, "ok", parsed, attempt, tuple(replies))
        return Judgment(self.model, prompt, replies[-1], "failed", attempts=self.attempts, replies=tuple(replies),
                        error=f"no reply parsed in {self.attempts} attempts; last: {reason}")


def make_judge(base_url: str, model: str | None, *, key_env: str = "OPENAI_API_KEY", attempts: int = 3,
               temperature: float = 0.0, cache: str | Path | None = None) -> Judge:
    """A judge at an OpenAI-compatible endpoint, with its judgments cached in the JSONL file `cache`."""
    from ..client import Client, EndpointConfig

    if not model:
        raise ConfigError("a judge endpoint needs the judge model's name (--judge-model; pin a version)")
    client = Client(EndpointConfig(base_url, model, api_key_env=key_env))
    return Judge(client, cache=JudgmentCache(cache) if cache else None, attempts=attempts, temperature=temperature)


def judge_pair(judge: Judge, images: list[Any], q1: str, q2: str, first: tuple[str, str],
               second: tuple[str, str]) -> dict[str, Any]:
    """Judge two runs' answers twice, swapping their positions; the outcome is for `first` vs `second`."""
    straight = judge.judge(pairwise_prompt(images, q1, q2, first, second), parse_verdict)
    swapped = judge.judge(pairwise_prompt(images, q1, q2, second, first), parse_verdict)
    if straight.status != "ok" or swapped.status != "ok":
        outcome = "failed"
    else:
        outcome = combine_swapped(straight.parsed["verdict"], swapped.parsed["verdict"])
    return {"outcome": outcome, "judgments": [straight.to_dict(), swapped.to_dict()]}


def compare_runs(judge: Judge, first: list[dict], second: list[dict], *, workers: int = 4) -> dict[str, Any]:
    """Pairwise verdicts, with position swap, on the SparklesEval items both runs answered (their result records).

    `win_rate` counts a tie or an inconsistent pair as half a win for each side; failed pairs are left out.
    """
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from ..conversation import SLOT

    others = {r["id"]: r for r in second if r.get("legacy")}
    pairs = [(r, others[r["id"]]) for r in first if r.get("legacy") and r["id"] in others]

    def one(pair: tuple[dict, dict]) -> dict[str, Any]:
        a, b = pair
        dialogue = a["legacy"]["dialogue"]
        images = list(dialogue[0].get("images", [])) + list(dialogue[2].get("images", []))
        q1, q2 = (dialogue[k]["content"].replace(SLOT, "") for k in (0, 2))
        return {"id": a["id"]} | judge_pair(judge, images, q1, q2, tuple(a["answers"]), tuple(b["answers"]))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        items = list(pool.map(one, pairs))
    counts = Counter(i["outcome"] for i in items)
    counts = {k: counts.get(k, 0) for k in ("first", "second", "tie", "inconsistent", "failed")}
    decided = len(items) - counts["failed"]
    wins = counts["first"] + (counts["tie"] + counts["inconsistent"]) / 2
    return {"n": len(items), "counts": counts, "win_rate": wins / decided if decided else None,
            "swap_consistency": 1 - counts["inconsistent"] / decided if decided else None, "items": items}

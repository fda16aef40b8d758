"""SparklesDialogue generation: captions -> teacher prompts -> a teacher (any OpenAI-compatible LLM, or the template
teacher) -> parse and check -> de-duplicate -> an append-only JSONL dataset that a killed run resumes.

Calls run in a thread pool under a rate limit, but results are committed in call order, so a seed gives the same
dataset whatever the concurrency. Prompts: `prompts`; parsing and checks: `parse`; the template teacher:
`template`; storage: `store`; statistics, report and viewer: `report`; the command: `cli`. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..client import Client, EndpointConfig, EndpointError
from ..errors import ConfigError
from .calls import Call, CallResult, Outcome, Reply
from .parse import Rejected, check_dialogue, parse_reply
from .prompts import SYSTEM_PROMPT, Caption, DialogueSpec, build_prompt, builtin_demos
from .store import LOG, REJECTS, RunState, commit, export, open_run
from .template import template_reply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthConfig:
    spec: DialogueSpec = DialogueSpec()
    n: int = 100  # dialogues the dataset should hold
    seed: int = 0  # picks candidates, demonstrations and the template teacher's choices
    concurrency: int = 4  # teacher calls in flight
    requests_per_minute: float = 0.0  # 0 = no limit
    max_calls: int = 0  # 0 = four times the calls that n needs, plus ten
    max_failures: int = 5  # endpoint failures in a row that stop the run (it can then be resumed)
    price_in: float = 0.0  # per 1k prompt tokens, for the cost estimate
    price_out: float = 0.0  # per 1k completion tokens

    def __post_init__(self):
        if self.n < 1 or self.concurrency < 1 or self.max_calls < 0 or self.max_failures < 1:
            raise ConfigError(f"need n >= 1, concurrency >= 1, max_calls >= 0 and max_failures >= 1, got n={self.n}, "
                              f"concurrency={self.concurrency}, max_calls={self.max_calls}, "
                              f"max_failures={self.max_failures}")


class Teacher(Protocol):
    name: str

    def __call__(self, call: Call) -> Reply: ...


class LLMTeacher:
    """A chat model behind an OpenAI-compatible endpoint, called with the original's settings (spec §8.1)."""

    def __init__(self, endpoint: EndpointConfig, *, temperature: float = 1.0, max_tokens: int = 2048,
                 client: Client | None = None):
        self.client = client or Client(endpoint)
        self.name, self.params = endpoint.model, {"temperature": temperature, "max_tokens": max_tokens, "top_p": 1,
                                                  "frequency_penalty": 0, "presence_penalty": 0}

    def __call__(self, call: Call) -> Reply:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": call.prompt}]
        done = self.client.chat(messages, **self.params)
        return Reply(done.text, done.usage, done.attempts, done.finish_reason, done.model)


class TemplateTeacher:
    """Dialogues from the scenes of the shapes world, with no LLM (see `synth_template`)."""

    name = "template"

    def __init__(self, spec: DialogueSpec):
        self.spec = spec

    def __call__(self, call: Call) -> Reply:
        text = template_reply(call.candidates, call.first_images, spec=self.spec, seed=call.seed)
        return Reply(text, {}, 1, "stop", "template", prompt="(the template teacher reads the candidates' scenes)")


# Planning: every call is fixed by the seed before it is made


def plan_calls(captions: Sequence[Caption], demos: Sequence[list[dict]], *, config: SynthConfig) -> Iterator[Call]:
    """The calls of a run, in order. CC samples candidates afresh for each call, so images repeat across calls as in
    the original; VG deals each image out once (spec §8.3, §8.4). Demonstration images are never candidates."""
    spec, rng = config.spec, random.Random(config.seed)
    shown = {str(i) for demo in demos for m in demo if m["role"] == "user" for i in m["image_ids"]}
    pool = [c for c in captions if c.key not in shown]
    if len(pool) < spec.candidates:
        raise ConfigError(f"a call shows {spec.candidates} candidates but only {len(pool)} captioned images are "
                          "available (demonstration images excluded)")
    if spec.mode == "vg":
        rng.shuffle(pool)
    for index in itertools.count():
        if spec.mode == "vg":
            candidates = pool[index * spec.candidates:(index + 1) * spec.candidates]
            if len(candidates) < spec.candidates:
                return
            first = (spec.first_images[index % len(spec.first_images)],)
        else:
            candidates, first = rng.sample(pool, spec.candidates), spec.first_images
        picked = [_pick_demo(demos, count, rng) for count in first]
        yield Call(index, f"{spec.mode}-s{config.seed}-c{index:06d}", tuple(candidates), tuple(first),
                   build_prompt(spec, picked, candidates=candidates, first_images=first), rng.randrange(2**31))


def _pick_demo(demos: Sequence[list[dict]], first: int, rng: random.Random) -> list[dict]:
    matching = [d for d in demos if len(d[0]["image_ids"]) == first]
    return rng.choice(matching or list(demos))


# One call, in a worker thread: rate limit, teacher, parse and check. Nothing is written here.


class RateLimiter:
    """Spaces call starts at least 60/rpm seconds apart, across threads."""

    def __init__(self, per_minute: float, *, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep, self.next, self.lock = clock, sleep, 0.0, threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:  # reserve a start time under the lock, sleep outside it
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


def judge_reply(call: Call, reply: Reply, *, spec: DialogueSpec, known: set[str]) -> tuple[list[Outcome], str]:
    """Every dialogue of a reply, accepted or rejected with a reason; dialogues asked for but missing count too."""
    try:
        parsed = parse_reply(reply.text, expected=len(call.first_images))
    except Rejected as r:
        return [Outcome(f"{call.id}-reply", None, r.reason, r.detail)], ""
    candidates, out = {c.key: c for c in call.candidates}, []
    for k, messages in enumerate(parsed.dialogues):
        first = call.first_images[k] if k < len(call.first_images) else None
        try:
            dialogue, warnings = check_dialogue(messages, spec=spec, first_images=first, candidates=candidates,
                                                known=known)
            out.append(Outcome(f"{call.id}-d{k}", dialogue, warnings=tuple(warnings)))
        except Rejected as r:
            out.append(Outcome(f"{call.id}-d{k}", None, r.reason, r.detail, parsed=messages))
    cut = f" (finish_reason {reply.finish_reason})" if reply.finish_reason not in (None, "stop") else ""
    for k in range(len(parsed.dialogues), len(call.first_images)):
        out.append(Outcome(f"{call.id}-d{k}", None, "missing_dialogue",
                           f"the reply holds {len(parsed.dialogues)} of {len(call.first_images)} dialogues{cut}"))
    return out, parsed.method


def _work(call: Call, teacher: Teacher, limiter: RateLimiter, spec: DialogueSpec, known: set[str]) -> CallResult:
    limiter.wait()
    start = time.monotonic()
    try:
        reply = teacher(call)
    except EndpointError as e:
        return CallResult(call, None, error=str(e), seconds=time.monotonic() - start)
    outcomes, method = judge_reply(call, reply, spec=spec, known=known)
    return CallResult(call, reply, tuple(outcomes), method, seconds=time.monotonic() - start)


# The run


def synthesize(captions: Sequence[Caption], teacher: Teacher, *, out: str | Path, config: SynthConfig = SynthConfig(),
               demos: Sequence[list[dict]] | None = None, resume: bool = False, progress: bool = True,
               sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill `out` with `config.n` dialogues, or continue a run there (`resume`); returns the folder's summary.

    `sources` (the captions file, the images folder) is kept in run.json for the viewer.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demos = list(builtin_demos() if demos is None else demos)
    limit = config.max_calls or 4 * -(-config.n // config.spec.per_call) + 10
    made: dict[str, int] = {}
    with _log_to(out / LOG):
        state = open_run(out, _fingerprint(captions, demos, config, teacher, sources or {}), resume=resume)
        planned = itertools.islice(plan_calls(captions, demos, config=config), limit)
        calls = (c for c in planned if c.id not in state.done)
        log.info("synth: %d dialogues wanted, %d already in %s; teacher %s; %s", config.n, state.accepted, out,
                 teacher.name, config)
        try:
            made = _run_calls(calls, teacher, state, out, config, {c.key for c in captions}, progress)
        finally:
            summary = export(out)
            log.info("this run: %s; folder: %s", made, summary)
        if state.accepted < config.n:
            log.warning("only %d of %d dialogues after %d calls: raise --max-calls, or look at %s", state.accepted,
                        config.n, limit, REJECTS)
    return summary | {"this_run": made}


def _run_calls(calls: Iterator[Call], teacher: Teacher, state: RunState, out: Path, config: SynthConfig,
               known: set[str], progress: bool) -> dict[str, int]:
    """Keep up to 2 x concurrency calls in flight, commit results in call order, stop at n dialogues."""
    from tqdm import tqdm

    spec, limiter, pending, made, failures = config.spec, RateLimiter(config.requests_per_minute), deque(), {}, 0
    pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="synth")
    bar = tqdm(total=config.n, initial=min(state.accepted, config.n), desc="synth", unit="dialogue",
               disable=not progress)
    try:
        while state.accepted < config.n:
            # Ask only for what could still be needed if every call in flight came back whole.
            while len(pending) < 2 * config.concurrency and state.accepted + spec.per_call * len(pending) < config.n:
                call = next(calls, None)
                if call is None:
                    break
                pending.append(pool.submit(_work, call, teacher, limiter, spec, known))
            if not pending:
                break
            result = pending.popleft().result()
            ledger = commit(out, state, result, n=config.n, teacher=teacher.name)
            for key in ("accepted", "rejected"):
                made[key] = made.get(key, 0) + ledger[key]
            made["calls"] = made.get("calls", 0) + 1
            _log_call(result, ledger)
            bar.update(ledger["accepted"])
            bar.set_postfix(accepted=state.accepted, rejected=made["rejected"], refresh=False)
            failures = failures + 1 if result.reply is None else 0
            if failures >= config.max_failures:
                raise EndpointError(f"stopped after {failures} failed calls in a row; last: {result.error}. What is "
                                    "done is kept: fix the endpoint and rerun with --resume")
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)  # calls still running are not needed any more
    return made


def _log_call(result: CallResult, ledger: dict[str, Any]) -> None:
    if result.reply is None:
        log.warning("%s: endpoint failed: %s", result.call.id, result.error)
        return
    reasons = ", ".join(sorted({o.reason for o in result.outcomes if o.reason}))
    log.info("%s: %d accepted, %d rejected%s; usage %s; %d attempt(s); %.2f s", result.call.id, ledger["accepted"],
             ledger["rejected"], f" ({reasons})" if reasons else "", ledger["usage"] or "not reported",
             ledger["attempts"], result.seconds)


def _fingerprint(captions: Sequence[Caption], demos: Sequence[list[dict]], config: SynthConfig, teacher: Teacher,
                 sources: dict[str, Any]) -> dict[str, Any]:
    """What run.json records; a resumed run must agree on spec, seed, captions and demonstrations."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    return {"spec": json.loads(json.dumps(asdict(config.spec))), "seed": config.seed,
            "captions_sha256": digest([[c.key, c.caption] for c in captions]), "demos_sha256": digest(list(demos)),
            "teacher": teacher.name, "n": config.n, "price_in": config.price_in, "price_out": config.price_out,
            **sources}


@contextlib.contextmanager
def _log_to(path: Path):
    """Every message of the synthesis folder's modules (the runner's and the store's) into the run's log file."""
    folder = logging.getLogger(__package__)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = folder.level
    folder.addHandler(handler)
    folder.setLevel(logging.INFO)
    try:
        yield
    finally:
        folder.removeHandler(handler)
        folder.setLevel(level)
        handler.close()

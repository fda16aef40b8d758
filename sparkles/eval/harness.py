"""Run an evaluation task against a responder, and the `sparkles eval` commands.

Deterministic by default (greedy, fixed seed); batched for local models, concurrent for endpoints. Answers and
results go to append-only JSON Lines in --out, so a killed run resumes without redoing a finished item; `--shard
i/n` splits a run across processes and `merge` joins the shards. Tasks: `tasks/`; judge: `judge.py`; summaries
and the HTML report: `report.py`. No torch at import time: `cli.py` imports this module to build its parser.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import SamplingParams
from ..errors import ConfigError, InputError, SparklesError
from ..jsonl import append_lines, repair_tail
from .report import latest, read_jsonl, write_atomic
from .tasks.common import Example, Task, conversation_for

log = logging.getLogger(__name__)

# Greedy with a fixed seed; 1000 new tokens as the original's evaluation.
DEFAULT_PARAMS = SamplingParams(max_new_tokens=1000, temperature=0.0, seed=0)


@dataclass(frozen=True)
class RunOptions:
    out: Path
    params: SamplingParams = DEFAULT_PARAMS
    batch_size: int = 8  # conversations per responder call: a device batch, or concurrent requests
    limit: int | None = None  # the first N items (in evaluation_id order), before sharding
    shard: tuple[int, int] = (1, 1)  # (i, n): the i-th of n contiguous parts, 1-based
    resume: bool = False
    resample: int = 0  # extra generations, at T = 1.0, for an answer the task cannot read (the original: unbounded)
    judge_workers: int = 4
    progress: bool = True
    meta: dict = field(default_factory=dict)  # extra facts for run.json (data folder, …)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: i must be between 1 and n")
    return i, n


def select(examples: Sequence[Example], *, limit: int | None, shard: tuple[int, int]) -> list[Example]:
    """The first `limit` examples, then shard i of n: contiguous parts whose sizes differ by at most one."""
    chosen = list(examples)[:limit] if limit is not None else list(examples)
    i, n = shard
    return chosen[len(chosen) * (i - 1) // n: len(chosen) * i // n]


def protocol(task: Task, responder, options: RunOptions) -> dict[str, Any]:
    """What the answers depend on; two runs with the same protocol hash generate the same answers."""
    first = task.examples()[0] if task.examples() else None
    prompt = "\n".join(m.text for m in first.turns) if first else ""
    return {"task": task.name, "extractor": getattr(task, "extractor", None), "responder": responder.describe(),
            "sampling": asdict(options.params), "resample": options.resample,
            "first_prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()}


def run_files(out: Path, shard: tuple[int, int]) -> tuple[Path, Path]:
    suffix = "" if shard == (1, 1) else f".shard{shard[0]}of{shard[1]}"
    return out / f"answers{suffix}.jsonl", out / f"results{suffix}.jsonl"


def start_run(task: Task, responder, judge, options: RunOptions) -> dict[str, Any]:
    """Write run.json, or check that the one in --out describes the same protocol (and judge)."""
    proto = protocol(task, responder, options)
    meta = {"task": task.name, "metric": task.metric, "legacy_name": task.legacy_name, "model_name": responder.name,
            "protocol": proto, "protocol_hash": _hash(proto)[:16], "judge": judge.describe() if judge else None,
            **options.meta}
    path = options.out / "run.json"
    answers, results = run_files(options.out, options.shard)
    if (answers.exists() or results.exists()) and not options.resume:
        raise ConfigError(f"{options.out} already holds results of this run; pass --resume to continue it, or "
                          "choose another --out")
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old["protocol_hash"] != meta["protocol_hash"]:
            raise ConfigError(f"{options.out} holds a run with another protocol ({old['protocol_hash']}, now "
                              f"{meta['protocol_hash']}: model, sampling or task changed); choose another --out")
        if old.get("judge") and judge and old["judge"] != meta["judge"]:
            raise ConfigError(f"{options.out} was judged by {old['judge']['model']} with other settings; mixing "
                              "judges in one run is refused: choose another --out")
        meta["judge"] = meta["judge"] or old.get("judge")
    options.out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def evaluate(task: Task, responder, options: RunOptions, judge=None) -> tuple[dict[str, Any], list[dict]]:
    """Answer, judge and score every selected item not finished yet; returns run.json and this shard's results."""
    from tqdm import tqdm

    examples = select(task.examples(), limit=options.limit, shard=options.shard)
    missing = [str(i.source) for e in examples for i in e.images
               if i.pixels is None and not (i.source and Path(i.source).is_file())]
    if missing:  # checked up front: a run of nothing but errors would look like a result
        raise InputError(f"{len(missing)} image files of {task.name} are missing, e.g. {', '.join(missing[:3])}")
    meta = start_run(task, responder, judge, options)
    answers_path, results_path = run_files(options.out, options.shard)
    for path in (answers_path, results_path):  # a kill mid-write leaves a torn last line: cut it, redo its item
        repair_tail(path)
    done = {k: r for k, r in latest(read_jsonl(results_path)).items() if r["status"] != "error"}
    answered = {k: a for k, a in latest(read_jsonl(answers_path)).items() if a.get("error") is None}
    todo = [e for e in examples if e.id not in done]
    running = [done[e.id]["value"] for e in examples if e.id in done and done[e.id]["value"] is not None]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=task.name, disable=not options.progress)
    _show(bar, task.metric, running)
    # Items answered before a kill are judged without being generated again; the rest are generated first.
    queue = [(e, answered.get(e.id)) for e in todo if e.id in answered]
    queue += [(e, None) for e in todo if e.id not in answered]
    for start in range(0, len(queue), options.batch_size):
        batch = queue[start: start + options.batch_size]
        fresh = generate(task, responder, [e for e, a in batch if a is None], options)
        append_lines(answers_path, fresh.values())
        pairs = [(e, a or fresh[e.id]) for e, a in batch]
        records = score_batch(task, judge, pairs, options.judge_workers)
        append_lines(results_path, records)
        running += [r["value"] for r in records if r["value"] is not None]
        bar.update(len(batch))  # a judged task without a judge still answers the batch
        _show(bar, task.metric, running)
    bar.close()
    final = latest(read_jsonl(results_path))
    return meta, [final[e.id] for e in examples if e.id in final]


def generate(task: Task, responder, batch: list[Example], options: RunOptions) -> dict[str, dict]:
    """Every turn of every example, turn by turn across the batch: turn k sees the model's own earlier answers."""
    if not batch:
        return {}
    started = time.perf_counter()
    answers: dict[str, list[str]] = {e.id: [] for e in batch}
    errors: dict[str, str] = {}
    count = dict.fromkeys(answers, 0)
    for turn in range(max(len(e.turns) for e in batch)):
        live = [e for e in batch if e.id not in errors and turn < len(e.turns)]
        outs = answer_all(responder, [conversation_for(e, answers[e.id]) for e in live], options.params)
        for e, out in zip(live, outs):
            count[e.id] += 1
            if isinstance(out, SparklesError):
                errors[e.id] = str(out)
            else:
                answers[e.id].append(out)
    resample(task, responder, [e for e in batch if e.id not in errors], answers, count, options)
    seconds = (time.perf_counter() - started) / len(batch)
    return {e.id: {"id": e.id, "answers": answers[e.id], "generations": count[e.id], "error": errors.get(e.id),
                   "seconds": round(seconds, 4)} for e in batch}


def answer_all(responder, conversations: list, params: SamplingParams) -> list[str | SparklesError]:
    """Answers in one call; when the batch fails, item by item, so one bad item costs only itself."""
    from .responders import PartialAnswers

    if not conversations:
        return []
    try:
        return list(responder.answer_batch(conversations, params))
    except PartialAnswers as e:
        return [a if a is not None else SparklesError(err) for a, err in zip(e.answers, e.errors)]
    except SparklesError as e:
        if len(conversations) == 1:
            return [e]
        log.warning("a batch of %d failed (%s); answering one at a time", len(conversations), e)
        return [answer_all(responder, [c], params)[0] for c in conversations]


def resample(task: Task, responder, batch: list[Example], answers: dict, count: dict, options: RunOptions) -> None:
    """Generate the last turn again, sampling as the original (T = 1.0, top-p 0.9), while its answer cannot be read;
    at most `options.resample` times. Exact tasks only: a judged answer is always readable."""
    params = replace(options.params, temperature=1.0, top_p=0.9)
    for attempt in range(1, options.resample + 1):
        bad = [e for e in batch if task.judge_prompt(e, answers[e.id]) is None
               and not task.score(e, answers[e.id]).parsed]
        if not bad:
            return
        seeded = replace(params, seed=(params.seed or 0) + attempt)
        outs = answer_all(responder, [conversation_for(e, answers[e.id][:-1]) for e in bad], seeded)
        for e, out in zip(bad, outs):
            count[e.id] += 1
            if not isinstance(out, SparklesError):
                answers[e.id][-1] = out


def score_batch(task: Task, judge, pairs: list[tuple[Example, dict]], workers: int) -> list[dict]:
    """Judge (concurrently) and score answered items; a judged task without a judge leaves them unscored."""
    prompts = [None if a["error"] else task.judge_prompt(e, a["answers"]) for e, a in pairs]
    keep = [k for k, p in enumerate(prompts) if p is None or judge is not None]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        judgments = list(pool.map(lambda k: judge.judge(prompts[k]) if prompts[k] else None, keep))
    return [result_record(task, pairs[k][0], pairs[k][1], j) for k, j in zip(keep, judgments)]


def result_record(task: Task, example: Example, answered: dict, judgment) -> dict[str, Any]:
    """One line of results.jsonl: the item, its answers, its score, the judgment, and the original's record."""
    record = {"id": example.id, "answers": answered["answers"], "generations": answered["generations"],
              "seconds": answered.get("seconds"), "target": example.target, "n_images": len(example.images),
              "turns": [m.text for m in example.turns],
              "images": [{"label": i.label, "source": i.source, "caption": i.caption} for i in example.images]}
    if answered["error"]:
        return record | {"status": "error", "error": answered["error"], "value": None, "parsed": False}
    scored = task.score(example, answered["answers"], judgment)
    status = "ok" if judgment is None else judgment.status
    return record | {"status": status, "error": judgment.error if judgment else "", "value": scored.value,
                     "parsed": scored.parsed, "prediction": scored.prediction, "parts": dict(scored.parts),
                     "judgment": judgment.to_dict() if judgment else None,
                     "legacy": task.legacy_record(example, answered["answers"], scored, judgment)}


def _show(bar, metric: str, values: list[float]) -> None:
    if values:
        bar.set_postfix({metric: f"{sum(values) / len(values):.3f}"})


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# The `sparkles eval` commands: argparse only here; models, judges and torch load when a command runs.

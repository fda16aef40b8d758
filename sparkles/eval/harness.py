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
        _append(answers_path, fresh.values())
        pairs = [(e, a or fresh[e.id]) for e, a in batch]
        records = score_batch(task, judge, pairs, options.judge_workers)
        _append(results_path, records)
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


def _append(path: Path, records) -> None:
    """Append whole lines and flush them: a kill loses at most the line being written."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if lines:
        with path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()


# The `sparkles eval` commands: argparse only here; models, judges and torch load when a command runs.


def add_cli(commands) -> None:
    from .tasks import LOADERS

    parser = commands.add_parser("eval", help="evaluate a model on SparklesEval, BISON or NLVR2; report, merge")
    sub = parser.add_subparsers(title="eval commands")
    parser.set_defaults(run=lambda args: parser.print_help() or 2)
    for name in LOADERS.names():
        _task_arguments(sub.add_parser(name, help=f"run {name} on a data folder (annotations/*.json, images/)"))
        sub.choices[name].set_defaults(run=_run_task, task=name)
    report = sub.add_parser("report", help="summaries and one HTML page for one or more runs, side by side")
    report.add_argument("runs", nargs="+", metavar="DIR")
    report.add_argument("--out", default=None, help="the HTML file (default: DIR/report.html, or ./report.html)")
    report.add_argument("--embed-images", action="store_true", help="thumbnails as data: URIs: one portable file")
    report.set_defaults(run=_run_report)
    merged = sub.add_parser("merge", help="join the shards of a run (--shard i/n) into one run folder")
    merged.add_argument("runs", nargs="+", metavar="DIR", help="folders holding the shards (or one shared folder)")
    merged.add_argument("--out", required=True)
    merged.set_defaults(run=_run_merge)
    pair = sub.add_parser("pairwise", help="compare two SparklesEval runs with a judge, positions swapped")
    pair.add_argument("runs", nargs=2, metavar="DIR")
    pair.add_argument("--out", required=True, help="where to write the verdicts (JSON)")
    _judge_arguments(pair)
    pair.set_defaults(run=_run_pairwise)


def _task_arguments(p) -> None:
    p.add_argument("--data", default=None, help="the task's folder: annotations/*.json and images/ (not for shapes)")
    p.add_argument("--n", type=int, default=50, help="shapes: items of each type, drawn fresh from --seed")
    p.add_argument("--out", required=True, type=Path, help="the run folder: results, summary, report")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", default=None, help="a Sparkles checkpoint folder, or 'default'")
    who.add_argument("--hf-model", default=None, help="an HF image-text-to-text model folder or hub id")
    who.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL, e.g. http://host:8000/v1")
    who.add_argument("--references", action="store_true", help="judge the annotation's own answers (SparklesEval)")
    p.add_argument("--endpoint-model", default=None, help="the model name to ask the endpoint for")
    p.add_argument("--endpoint-key-env", default="OPENAI_API_KEY", help="variable holding the endpoint's key")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--shard", default="1/1", help="run part i of n (1-based), e.g. 2/4; join with `eval merge`")
    p.add_argument("--resume", action="store_true", help="continue a run in --out; finished items are kept")
    p.add_argument("--batch-size", type=int, default=8, help="items per model call (local) or concurrent requests")
    p.add_argument("--resample", type=int, default=0, help="re-generate an unreadable answer up to N times at T=1")
    p.add_argument("--extractor", default="legacy", choices=["legacy", "strict"], help="BISON/NLVR2 answer reading")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_PARAMS.max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; the original sampled at 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _judge_arguments(p)


def _judge_arguments(p) -> None:
    group = p.add_argument_group("judge (SparklesEval, pairwise)")
    group.add_argument("--judge-base-url", default=None, help="an OpenAI-compatible base URL")
    group.add_argument("--judge-model", default=None, help="e.g. gpt-4-0613; pin a version")
    group.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="variable holding the judge's key")
    group.add_argument("--judge-attempts", type=int, default=3, help="asks per item while the reply does not parse")
    group.add_argument("--judge-temperature", type=float, default=0.0, help="first ask (the original: 1.0)")
    group.add_argument("--judge-cache", default=None, help="JSONL cache of judgments (default: "
                       "~/.cache/sparkles/judgments.jsonl; 'none' to turn off)")
    group.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")


def _judge(args):
    from .judge import make_judge

    if not args.judge_base_url:
        return None
    cache = args.judge_cache or str(Path.home() / ".cache" / "sparkles" / "judgments.jsonl")
    return make_judge(args.judge_base_url, args.judge_model, key_env=args.judge_key_env, attempts=args.judge_attempts,
                      temperature=args.judge_temperature, cache=None if cache.lower() == "none" else cache)


def _responder(args, task):
    import sys

    from ..model.checkpoint import is_untrained_default
    from .responders import ReferenceResponder, make_responder

    if args.references:
        if task.name != "sparkleseval":
            raise ConfigError("--references judges SparklesEval's own answers; other tasks have none")
        from .tasks.sparkleseval import references

        return ReferenceResponder(task.examples(), references)
    if not (args.endpoint or args.hf_model) and is_untrained_default(args.model):
        print("note: no trained default model is installed yet; evaluating a tiny untrained one (random answers).",
              file=sys.stderr)
    return make_responder(model=args.model, hf_model=args.hf_model, endpoint=args.endpoint,
                          endpoint_model=args.endpoint_model, key_env=args.endpoint_key_env,
                          concurrency=args.batch_size, device=args.device, dtype=args.dtype)


def _run_task(args) -> int:
    from .report import load_run, markdown_table, write_outputs
    from .tasks import load_task

    if args.task == "shapes":
        task = load_task("shapes", None, n=args.n, seed=args.seed)
        source = f"shapes world: {args.n} items of each type from seed {args.seed}"
    elif not args.data:
        raise ConfigError(f"sparkles eval {args.task} needs --data DIR (a folder with annotations/ and images/)")
    else:
        task, source = load_task(args.task, args.data, extractor=args.extractor), str(Path(args.data).resolve())
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    options = RunOptions(out=args.out, params=params, batch_size=args.batch_size, limit=args.limit,
                         shard=parse_shard(args.shard), resume=args.resume, resample=args.resample,
                         judge_workers=args.judge_workers, progress=not args.quiet,
                         meta={"data": source})
    judge = _judge(args)
    meta, results = evaluate(task, _responder(args, task), options, judge)
    if options.shard != (1, 1):
        print(f"shard {args.shard} done: {len(results)} items in {args.out}; join the shards with "
              f"`sparkles eval merge DIR... --out DIR`")
        return 0
    if judge is None and task.metric == "score":
        print(f"answers written to {args.out}/answers.jsonl; judge them with --resume --judge-base-url URL "
              "--judge-model NAME")
        return 0
    write_outputs(args.out, meta, results)
    print(markdown_table([load_run(args.out)]))
    print(f"\nsummary: {args.out}/summary.json\nreport:  {args.out}/report.html")
    return 0


def _run_report(args) -> int:
    from .report import image_src_for, load_runs, markdown_table, render_html

    runs = load_runs(args.runs)
    page = Path(args.out or (Path(args.runs[0]) / "report.html" if len(runs) == 1 else "report.html"))
    page.write_text(render_html(runs, image_src_for(page, embed=args.embed_images)), encoding="utf-8")
    print(markdown_table(runs))
    print(f"\nreport: {page}")
    return 0


def _run_merge(args) -> int:
    from .report import load_run, markdown_table, merge_runs, write_outputs

    meta, results = merge_runs(args.runs, args.out)
    write_outputs(Path(args.out), meta, results)
    print(markdown_table([load_run(args.out)]))
    return 0


def _run_pairwise(args) -> int:
    from .judge import compare_runs
    from .report import load_run

    judge = _judge(args)
    if judge is None:
        raise ConfigError("pairwise needs a judge: --judge-base-url URL --judge-model NAME")
    first, second = (load_run(folder) for folder in args.runs)
    verdicts = compare_runs(judge, list(first.results), list(second.results), workers=args.judge_workers)
    verdicts |= {"first": first.name, "second": second.name, "judge": judge.describe()}
    Path(args.out).write_text(json.dumps(verdicts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{first.name} vs {second.name}: {verdicts['counts']} win rate {verdicts['win_rate']}; "
          f"swap consistency {verdicts['swap_consistency']}\nverdicts: {args.out}")
    return 0

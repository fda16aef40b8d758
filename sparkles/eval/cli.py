"""`sparkles eval`: one subcommand per registered task, plus report, merge and pairwise. Parses arguments, builds
the task, responder and judge, and hands them to the harness (`harness.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import SamplingParams
from ..errors import ConfigError
from .harness import DEFAULT_PARAMS, RunOptions, evaluate, parse_shard


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
    p.add_argument("--grey", action="store_true", help="shapes: every image flat grey, the blind baseline to beat")
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
        references = getattr(task, "references", None)  # the shapes world knows every answer
        if task.name == "sparkleseval":
            from .tasks.sparkleseval import references
        if references is None:
            raise ConfigError(f"--references needs a task with reference answers (sparkleseval, shapes); "
                              f"{task.name} has none")
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
        if args.grey and args.references:
            raise ConfigError("--grey blinds a model, but reference answers never look at the images; drop one")
        task = load_task("shapes", None, n=args.n, seed=args.seed, grey=args.grey)
        source = f"shapes world: {args.n} items of each type from seed {args.seed}" + (
            ", every image flat grey (the blind baseline)" if args.grey else "")
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

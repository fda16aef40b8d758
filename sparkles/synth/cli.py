"""`sparkles synth`: make a SparklesDialogue dataset (`synth` or `synth run`), then look at it (`synth stats DIR`,
`synth view DIR`). Arguments in, one library call, a few printed lines out; the pipeline is `synth.py`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from ..client import EndpointConfig
from ..errors import ConfigError
from .prompts import MODES, DialogueSpec
from .run import LLMTeacher, SynthConfig, Teacher, TemplateTeacher, synthesize
from .store import DATASET, EXPORT, LOG, REJECTS, read_captions, read_demos
from .template import check_scenes


def add_cli(commands) -> None:
    synth = commands.add_parser("synth", help="make SparklesDialogue data from captions with a teacher LLM or the "
                                "template teacher; look at it with `synth stats DIR` and `synth view DIR`")
    _run_arguments(synth).set_defaults(run=_run_synth)
    actions = synth.add_subparsers(title="actions (without one: run)")
    _run_arguments(actions.add_parser("run", help="make or resume a dataset (the same as bare `sparkles synth`)"))\
        .set_defaults(run=_run_synth)
    stats = actions.add_parser("stats", help="statistics and plots of a dataset: report.md and report.html")
    stats.add_argument("dir", help="a synth output folder, or a SparklesDialogue JSON list or JSONL file")
    stats.set_defaults(run=_run_stats)
    view = actions.add_parser("view", help="view.html: dialogues with their images and captions")
    view.add_argument("dir", help="a synth output folder")
    view.add_argument("--limit", type=int, default=200, help="dialogues on the page (default 200)")
    view.set_defaults(run=_run_view)


def _run_arguments(p):
    p.add_argument("--captions", help="JSON list or JSONL of {image_id, caption, scene?, file?}, or the original's "
                   "{annotations: [{image_id, caption}]}")
    p.add_argument("--images", help="folder of the image files: only captions with a file are used")
    p.add_argument("--out", help="output folder")
    p.add_argument("--n", type=int, default=100, help="dialogues to make (default 100)")
    p.add_argument("--mode", choices=["cc", "vg"], default="cc",
                   help="the original's prompts: cc = 3 dialogues per call from 9 candidates, vg = 1 from 4")
    p.add_argument("--teacher", choices=["llm", "template"], default="llm",
                   help="llm: an OpenAI-compatible endpoint; template: from the shapes world's scenes, no LLM")
    p.add_argument("--teacher-base-url", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    p.add_argument("--teacher-model", help="the model name the endpoint expects")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the key (default OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="calls in flight (default 4)")
    p.add_argument("--rpm", type=float, default=0, help="at most this many requests per minute (default: no limit)")
    p.add_argument("--max-attempts", type=int, default=4, help="attempts per call, with back-off (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt (default 120)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="picks candidates and demonstrations (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: finished calls are skipped")
    p.add_argument("--demos", help="SparklesDialogue file of demonstration dialogues (default: built-in ones)")
    p.add_argument("--max-calls", type=int, default=0, help="stop after this many calls (default: 4 x needed + 10)")
    p.add_argument("--price-in", type=float, default=0.0, help="price per 1k prompt tokens, for the cost")
    p.add_argument("--price-out", type=float, default=0.0, help="price per 1k completion tokens, for the cost")
    p.add_argument("--turns", type=int, help="user-assistant exchanges per dialogue (default 2)")
    p.add_argument("--first-images", help="first-turn image counts, e.g. 1,2,3 (cc default) or 2,3 (vg default)")
    p.add_argument("--later-images", help="new images per later turn: 1 (cc default) or a range 1-2 (vg default)")
    p.add_argument("--candidates", type=int, help="candidates per call (default 9 cc, 4 vg)")
    p.add_argument("--user-words", help="accepted words per user message, e.g. 3-250")
    p.add_argument("--assistant-words", help="accepted words per assistant message, e.g. 5-2000")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _numbers(text: str, name: str, *, sep: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(sep))
    except ValueError:
        raise ConfigError(f"--{name}: expected integers separated by '{sep}', got {text!r}") from None


def _bounds(text: str, name: str) -> tuple[int, int]:
    values = _numbers(text, name, sep="-")
    if len(values) > 2:
        raise ConfigError(f"--{name}: expected N or LOW-HIGH, got {text!r}")
    return values[0], values[-1]


def spec_from_args(args) -> DialogueSpec:
    spec = asdict(MODES[args.mode])
    given = {"turns": args.turns, "candidates": args.candidates,
             "first_images": args.first_images and _numbers(args.first_images, "first-images", sep=","),
             "later_images": args.later_images and _bounds(args.later_images, "later-images"),
             "user_words": args.user_words and _bounds(args.user_words, "user-words"),
             "assistant_words": args.assistant_words and _bounds(args.assistant_words, "assistant-words")}
    return DialogueSpec(**spec | {k: v for k, v in given.items() if v is not None})


def _run_synth(args) -> int:
    if not args.captions or not args.out:
        raise ConfigError("sparkles synth needs --captions FILE and --out DIR")
    spec = spec_from_args(args)
    config = SynthConfig(spec, n=args.n, seed=args.seed, concurrency=args.concurrency, requests_per_minute=args.rpm,
                         max_calls=args.max_calls, price_in=args.price_in, price_out=args.price_out)
    captions = read_captions(args.captions, args.images)
    if args.teacher == "template":
        check_scenes(captions, args.captions)
        teacher: Teacher = TemplateTeacher(spec)
    elif not args.teacher_base_url or not args.teacher_model:
        raise ConfigError("the LLM teacher needs --teacher-base-url and --teacher-model (the key comes from "
                          f"${args.api_key_env}); or use --teacher template with a shapes-world captions file")
    else:
        teacher = LLMTeacher(EndpointConfig(args.teacher_base_url, args.teacher_model, args.api_key_env, args.timeout,
                                            args.max_attempts), temperature=args.temperature,
                             max_tokens=args.max_tokens)
    demos = read_demos(args.demos) if args.demos else None
    sources = {"captions": str(Path(args.captions).resolve()),
               "images": str(Path(args.images).resolve()) if args.images else None}
    s = synthesize(captions, teacher, out=args.out, config=config, demos=demos, resume=args.resume,
                   progress=not args.quiet, sources=sources)
    out, made = Path(args.out), s["this_run"]
    reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "none"
    print(f"{out / DATASET}: {s['dialogues']} dialogues (this run: {made.get('calls', 0)} calls, "
          f"{made.get('accepted', 0)} accepted, {made.get('rejected', 0)} rejected); as one JSON list: {out / EXPORT}")
    print(f"rejected in all: {s['rejected']} ({reasons}); details in {out / REJECTS}")
    print(f"tokens: {s['prompt_tokens']:,} prompt + {s['completion_tokens']:,} completion over {s['calls']} calls; "
          f"cost {s['cost']:.4f}" + (" (set --price-in/--price-out)" if not (args.price_in or args.price_out) else ""))
    if s["dialogues"] < args.n:
        print(f"note: only {s['dialogues']} of {args.n} dialogues; see {out / LOG}", file=sys.stderr)
    print(f"next: sparkles synth stats {out}  |  sparkles synth view {out}")
    return 0


def _run_stats(args) -> int:
    from .report import write_report

    stats, paths = write_report(Path(args.dir))
    print(f"{stats['dialogues']} dialogues, {stats['images_unique']} unique / {stats['images_total']} total images; "
          f"words per message: user {stats['user_words_mean']:.1f}, assistant {stats['assistant_words_mean']:.1f}")
    for note in stats["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _run_view(args) -> int:
    from .report import write_viewer

    path, shown, total = write_viewer(Path(args.dir), limit=args.limit)
    print(f"wrote {path}: {shown} of {total} dialogues")
    return 0

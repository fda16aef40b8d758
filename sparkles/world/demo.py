"""`sparkles demo`: the default model holds a multi-image, multi-turn conversation about freshly drawn images of
the shapes world, and every answer is checked against the scenes.

It writes the images and an HTML page of the dialogue next to each other, prints the dialogue as it goes, and
ends with how to chat about one's own images.
"""

from __future__ import annotations

import html
import json
import random
import sys
import time
from pathlib import Path

TURNS = 3


def add_cli(commands) -> None:
    parser = commands.add_parser("demo", help="watch the default model talk about several images over several turns")
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of the embedded default")
    parser.add_argument("--seed", type=int, default=None, help="which images to draw (default: a new set each run)")
    parser.add_argument("--out", default="sparkles-demo", help="where the images and demo.html go")
    parser.add_argument("--turns", type=int, default=TURNS, help="questions in the dialogue (2 or more)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..config import SamplingParams
    from ..errors import ConfigError
    from ..model.checkpoint import is_untrained_default, load
    from ..session import ChatSession
    from .data import WORKED_TOKENS
    from .tasks import WorldConfig, make_dialogue, score

    if args.turns < 2:
        raise ConfigError(f"--turns must be 2 or more, got {args.turns}")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    item = make_dialogue(random.Random(f"demo/{seed}"), WorldConfig(turns=args.turns, max_images=4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _save_images(item, out)
    if is_untrained_default(args.model):
        print("note: no trained default model is installed, so this is an untrained tiny one: expect noise.",
              file=sys.stderr)
    # A session, as a chat should be: each image is encoded once, and each turn prefills only its own tokens.
    session = ChatSession(*load(args.model))
    print(f"A conversation about {len(files)} images drawn for seed {seed} (saved in {out}/):\n")
    rows = []
    users = [m for m in item.conversation if m.role == "user"]
    for turn, (message, truth) in enumerate(zip(users, item.truths), start=1):
        print(f"USER: {_with_files(message, files)}")
        answer = session.answer(message, params=SamplingParams(max_new_tokens=WORKED_TOKENS))
        result = score(truth, answer)
        mark = "right" if result.correct else f"wrong, expected: {truth.answer}"
        print(f"SPARKLES: {answer}\n          ({mark})\n")
        rows.append({"turn": turn, "question": message.text, "answer": answer, "expected": truth.answer,
                     "correct": bool(result.correct)})
    right = sum(r["correct"] for r in rows)
    page = _write_page(out, seed, item, rows, files)
    print(f"{right} of {len(rows)} answers right. The dialogue with its images: {page}")
    print("\nChat about your own images:\n"
          "  sparkles chat --image a.jpg --image b.jpg \"Compare IMAGE#1 with IMAGE#2.\"\n"
          "  sparkles chat            (a REPL: /image PATH adds an image mid-dialogue)")
    (out / "demo.json").write_text(json.dumps({"seed": seed, "turns": rows}, indent=2))
    return 0


def _save_images(item, out: Path) -> dict[str, Path]:
    files = {}
    for image in item.conversation.images:
        path = out / f"IMAGE{image.label}.png"
        image.pixels.save(path)
        files[image.label] = path
    return files


def _with_files(message, files: dict[str, Path]) -> str:
    """The user's words with each image shown as its name, file and what it holds."""
    from ..conversation import Image

    out = []
    for part in message.parts:
        if isinstance(part, Image):
            out.append(f"IMAGE#{part.label} [{files[part.label]}: {part.caption}]")
        else:
            out.append(part.text)
    return "".join(out)


def _write_page(out: Path, seed: int, item, rows: list[dict], files: dict[str, Path]) -> Path:
    from ..conversation import Image

    users = [m for m in item.conversation if m.role == "user"]
    blocks = []
    for message, row in zip(users, rows):
        said = "".join(f'<b>IMAGE#{p.label}</b> <img src="{files[p.label].name}" alt="{html.escape(p.caption or "")}" '
                       f'title="{html.escape(p.caption or "")}">' if isinstance(p, Image) else html.escape(p.text)
                       for p in message.parts)
        verdict = "✓ right" if row["correct"] else f"✗ wrong — expected: {html.escape(row['expected'])}"
        blocks.append(f'<div class="user">{said}</div><div class="model">{html.escape(row["answer"])}'
                      f'<div class="verdict">{verdict}</div></div>')
    page = out / "demo.html"
    page.write_text(f"""<!doctype html><meta charset="utf-8"><title>Sparkles demo, seed {seed}</title>
<style>body{{font-family:sans-serif;max-width:46em;margin:2em auto}} img{{width:96px;image-rendering:pixelated;
vertical-align:middle;border:1px solid #ccc}} .user,.model{{padding:.6em;margin:.5em 0;border-radius:8px}}
.user{{background:#eef}} .model{{background:#efe}} .verdict{{font-size:.85em;color:#555;margin-top:.3em}}</style>
<h1>Sparkles demo <small>(seed {seed})</small></h1>{''.join(blocks)}""")
    return page

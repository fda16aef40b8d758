"""Evaluation throughput for a local model: batched vs one item at a time, as a ratio from one run.

    python bench/bench_eval.py [--items 16] [--batch 8] [--max-new-tokens 48] [--rounds 3] [--device cpu] [--threads N]

A small random Sparkles model (ViT 64 px width 128 x 4, 4-layer width-256 LM, byte vocabulary) answers synthetic
SparklesEval items (3-4 images, two turns; turn 2 sees the model's own turn-1 answer) through the evaluation
harness. "one at a time" is what the original does: batch size 1, every image read and encoded again at each
turn. "batched" is our default: the same turns, left-padded into one batch per turn. Greedy decoding, so both
modes produce the same answers; the table gives the median of several alternating rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from sparkles.config import TINY, SamplingParams
from sparkles.eval.harness import RunOptions, evaluate
from sparkles.eval.report import read_jsonl
from sparkles.eval.responders import SparklesResponder, with_pixels
from sparkles.eval.tasks import load_task
from sparkles.generate import Chat
from sparkles.model.model import build_model

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "gray", "pink"]


def make_data(root: Path, n: int) -> Path:
    """A SparklesEval folder: n items of 2-3 images in turn 1 and one more in turn 2."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    items = []
    for i in range(n):
        ids = [100000 + 10 * i + k for k in range(3 + i % 2)]
        for k, image_id in enumerate(ids):
            Image.new("RGB", (320, 240), COLORS[(i + k) % len(COLORS)]).save(root / "images" / f"{image_id}.jpg")
        images = [{"image_id": x, "caption": "A plain square."} for x in ids]
        slots = " and ".join(f"IMAGE#{x}<Img><ImageHere></Img>" for x in ids[:-1])
        items.append({"evaluation_id": i, "dialogue": [
            {"role": "user", "content": f"What differs between {slots}?", "images": images[:-1]},
            {"role": "assistant", "content": "-"},
            {"role": "user", "content": f"Does IMAGE#{ids[-1]}<Img><ImageHere></Img> fit with IMAGE#{ids[0]}?",
             "images": images[-1:]},
            {"role": "assistant", "content": "-"}]})
    (root / "annotations" / "sparkles_evaluation_sparkleseval_annotations.json").write_text(json.dumps(items))
    return root


def bench_model(device: str) -> SparklesResponder:
    config = dataclasses.replace(
        TINY, vision=dataclasses.replace(TINY.vision, config={"patch_size": 8, "width": 128, "depth": 4, "heads": 4}),
        language=dataclasses.replace(TINY.language, config={**TINY.language.config, "hidden_size": 256,
                                                            "intermediate_size": 688, "num_hidden_layers": 4}))
    torch.manual_seed(0)
    model, processor = build_model(config)
    return SparklesResponder(Chat(model.to(device).eval(), processor), "bench")


class Prefilled(SparklesResponder):
    """Every turn prefilled from the start, images encoded again: the original's way (batch 1), and ours before
    turn 2 resumed from turn 1's cache."""

    def answer_batch(self, conversations, params):
        return self.chat.answer_batch([with_pixels(c) for c in conversations], params)


def timed(task, responder, params, batch: int, out: Path) -> tuple[float, list]:
    """Seconds for the whole run (no judge: answers only), and the answers it wrote."""
    started = time.perf_counter()
    evaluate(task, responder, RunOptions(out=out, params=params, batch_size=batch, progress=False))
    seconds = time.perf_counter() - started
    return seconds, [a["answers"] for a in read_jsonl(out / "answers.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); on a "
                        "shared machine 1 avoids OpenMP threads waiting on each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resumed = bench_model(args.device)
    prefilled = Prefilled(resumed.chat, "bench")
    modes = [("one at a time (original)", 1, prefilled), ("batched, every turn prefilled", args.batch, prefilled),
             ("batched, turn 2 resumed (default)", args.batch, resumed)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        task = load_task("sparkleseval", make_data(Path(tmp) / "data", args.items))
        timed(task, resumed, params, args.batch, Path(tmp) / "warmup")  # lazy initialisation, caches
        times: dict[str, list[float]] = {mode: [] for mode, _, _ in modes}
        answers = {}
        for r in range(args.rounds):
            for n, (mode, size, responder) in enumerate(modes):
                seconds, answers[mode] = timed(task, responder, params, size, Path(tmp) / f"{n}-{r}")
                times[mode].append(seconds)
    turns = 2 * args.items
    last = modes[-1][0]
    chars = sum(len(a) for item in answers[last] for a in item)
    assert len(answers[last]) == args.items
    base = statistics.median(times[modes[0][0]])
    print(f"{args.items} SparklesEval items ({turns} turns, {chars} answer characters), max {args.max_new_tokens} "
          f"new tokens, greedy, {args.device}, torch threads {torch.get_num_threads()}; median of {args.rounds} rounds")
    print("\n| mode | batch | seconds | items/s | turns/s | speed-up |\n|---|---|---|---|---|---|")
    for mode, size, _ in modes:
        seconds = statistics.median(times[mode])
        print(f"| {mode} | {size} | {seconds:.2f} | {args.items / seconds:.2f} | {turns / seconds:.2f} | "
              f"{base / seconds:.2f}x |")
    print(f"\nsame answers in every mode: {all(a == answers[last] for a in answers.values())}")


if __name__ == "__main__":
    main()

"""The serve engine with the lean decoding step (`llama_step.py`) against the same engine on the LM's own forward.

    python bench/bench_engine_step.py [--clients 1 8] [--tokens 64] [--repeats 5] [--threads 2]

`bench_serve.py`'s random model (hidden 256, 4 layers); every client asks about two solid images and samples 64
tokens with its own seed. The two variants alternate within each of `--repeats` rounds on one engine (the step is
switched off by setting `engine._step` to None), and every round checks that both gave the same answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import bench_model  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from sparkles.config import SamplingParams  # noqa: E402
from sparkles.conversation import Conversation, Image, Message, Text  # noqa: E402
from sparkles.engine import Engine, EngineConfig  # noqa: E402

COLORS = ["red", "blue", "green", "white", "purple", "orange", "yellow", "gray"]


def conversation(i: int) -> Conversation:
    pictures = [Image(pixels=PILImage.new("RGB", (64, 64), c), sha256=c) for c in (COLORS[i % 8], "black")]
    return Conversation((Message("user", (Text(f"Request {i}: compare "), pictures[0], Text(" with "), pictures[1],
                                          Text(". Which one is brighter?"))),))


def burst(engine: Engine, clients: int, tokens: int) -> tuple[float, list[str]]:
    """Seconds until every client has its whole answer, and the answers."""
    answers = [""] * clients

    def ask(i: int) -> None:
        answers[i] = "".join(engine.stream(conversation(i), SamplingParams(max_new_tokens=tokens, temperature=0.8,
                                                                           seed=i)))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_chat(bench_model("cpu"), EngineConfig(max_batch=8))
    step = engine._step
    assert step is not None, "the bench model should take the lean step"
    print(f"{args.tokens} sampled tokens per client, torch threads {args.threads}, median of {args.repeats} rounds\n")
    print("| clients | LM forward (s) | lean step (s) | forward / lean | same answers |")
    print("|---:|---:|---:|---:|---|")
    try:
        for clients in args.clients:
            times: dict[str, list[float]] = {"forward": [], "lean": []}
            same = True
            burst(engine, clients, 4)  # warm-up
            for _ in range(args.repeats):
                answers = {}
                for variant in times:
                    engine._step = step if variant == "lean" else None
                    seconds, answers[variant] = burst(engine, clients, args.tokens)
                    times[variant].append(seconds)
                same &= answers["lean"] == answers["forward"]
            ratio = statistics.median(a / b for a, b in zip(times["forward"], times["lean"]))
            print(f"| {clients} | {statistics.median(times['forward']):.3f} | {statistics.median(times['lean']):.3f} | "
                  f"**{ratio:.2f}x** | {'yes' if same else '**NO**'} |", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()

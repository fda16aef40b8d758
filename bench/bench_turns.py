"""Turn 2 of a batched evaluation: resumed from turn 1's cache (`BatchSession`) vs prefilled again (`Chat`).

    python bench/bench_turns.py [--model default] [--items 32] [--batch 32] [--rounds 3] [--threads 1]

The shipped default model answers `--items` two-turn shapes-world dialogues (2–5 images, turn 2 after its own
turn-1 answer), `--batch` at a time, greedy, as `sparkles eval shapes` does. Each round runs turn 1 once, then
times turn 2 both ways, taking turns; the table gives medians and the ratio, and checks that both ways give the
same answers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparkles.batch_session import BatchSession
from sparkles.config import SamplingParams
from sparkles.generate import Chat
from sparkles.model.checkpoint import load
from sparkles.world.data import WORKED_TOKENS, _ask
from sparkles.world.tasks import make_eval_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chat = Chat(*load(args.model))
    params = SamplingParams(max_new_tokens=WORKED_TOKENS)
    items = [i for i in make_eval_set(args.items, seed=2024) if i.kind == "dialogue"]
    times: dict[str, list[float]] = {"prefilled again": [], "resumed": []}
    reused = prompt = 0
    for _ in range(args.rounds):
        for first in range(0, len(items), args.batch):
            chunk, session = items[first:first + args.batch], BatchSession(chat)
            answers = session.answer_batch([_ask(i, 0, []) for i in chunk], params)
            turn2 = [_ask(i, 1, [a]) for i, a in zip(chunk, answers)]
            before = session.reused
            start = time.perf_counter()
            resumed = session.answer_batch(turn2, params)
            times["resumed"].append(time.perf_counter() - start)
            start = time.perf_counter()
            again = chat.answer_batch(turn2, params)
            times["prefilled again"].append(time.perf_counter() - start)
            if resumed != again:
                print(f"MISMATCH in {sum(a != b for a, b in zip(resumed, again))} of {len(again)} answers")
            reused += session.reused - before
            prompt += sum(len(chat.processor.encode(c, generation=True).rendered) for c in turn2)
    base = statistics.median(times["prefilled again"])
    print(f"{len(items)} dialogues, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds; "
          f"turn-2 prompt positions reused: {reused / prompt:.0%}\n")
    print("| turn 2 | median (s) | vs prefilled again |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {base / statistics.median(values):.2f}x |")


if __name__ == "__main__":
    main()

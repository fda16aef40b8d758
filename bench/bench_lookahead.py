"""Prompt-lookup decoding (`lookahead.py`) against plain greedy decoding, on a trained model answering real
questions: the shipped default model on fresh shapes-world items (captions, BISON, NLVR2 and first dialogue turns).

    python bench/bench_lookahead.py [--model sparkles/assets/default] [--n 10] [--seed 77] [--lookahead 4]
                                    [--threads 1] [--engine]

Each question is answered alone (`Chat.stream`, or with `--engine` the serve engine's one-row batch; greedy, a
worked answer's room), once plainly and once with `--lookahead` guesses a step, alternating question by question
so that load on the machine falls on both.
Reported: seconds and tokens/s per variant and task type (prefill included), their ratio, whether every answer is
the same, and the tokens a lookahead step yielded on average. Random LMs are no test of this: their greedy output
repeats itself, which any n-gram guess predicts.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch

from sparkles.config import SamplingParams
from sparkles.engine import Engine, EngineConfig
from sparkles.generate import Chat
from sparkles.llama_step import LlamaStep
from sparkles.model.checkpoint import load
from sparkles.world.data import WORKED_TOKENS, _ask
from sparkles.world.tasks import make_eval_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sparkles/assets/default")
    parser.add_argument("--n", type=int, default=10, help="items of each task type")
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true",
                        help="answer through the serve engine (`EngineConfig.lookahead`), one request at a time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    chats = {"plain": Chat(model, processor), "lookahead": Chat(model, processor, lookahead=args.lookahead)}
    params = SamplingParams(max_new_tokens=WORKED_TOKENS)
    engines = {name: Engine.from_chat(chat, EngineConfig(max_batch=1, lookahead=chat.lookahead))
               for name, chat in chats.items()} if args.engine else {}

    def answer(name: str, conversation) -> str:
        if not engines:
            return chats[name].answer(conversation, params)
        engine = engines[name]
        return "".join(e.text or "" for e in engine.submit(engine.encode(conversation), params))

    steps: collections.Counter = collections.Counter()
    call = LlamaStep.__call__

    def counting(self, *a, **k):  # decoding steps after the prompt, each one pass over the weights
        steps[current] += 1
        return call(self, *a, **k)

    LlamaStep.__call__ = counting
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    tokens: dict[str, int] = collections.defaultdict(int)
    same, current = True, "warm-up"
    items = make_eval_set(args.n, args.seed)
    for name in chats:  # the step's packed weights and lazy set-up
        answer(name, _ask(items[0], 0, []))
    for item in items:
        conversation = _ask(item, 0, [])
        answers = {}
        for current in chats:
            start = time.perf_counter()
            answers[current] = answer(current, conversation)
            seconds[current, item.kind] += time.perf_counter() - start
        tokens[item.kind] += len(processor.tokenizer.encode(answers["plain"], add_special_tokens=False))
        if answers["plain"] != answers["lookahead"]:
            same = False
            print(f"!!! ANSWERS DIFFER on {item.id}:\n  {answers['plain']!r}\n  {answers['lookahead']!r}",
                  file=sys.stderr)
    for engine in engines.values():
        engine.close()
    print(f"{args.model}, {args.n} items per task type (seed {args.seed}), lookahead {args.lookahead}, "
          f"torch threads {torch.get_num_threads()}; first turns, answered one at a time"
          f"{' by the serve engine' if engines else ''}\n")
    print("| task | answer tokens | plain (s) | lookahead (s) | plain tok/s | lookahead tok/s | plain / lookahead |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    kinds = sorted(tokens)
    for kind in kinds + ["all"]:
        pick = kinds if kind == "all" else [kind]
        plain, ahead = (sum(seconds[name, k] for k in pick) for name in chats)
        n = sum(tokens[k] for k in pick)
        print(f"| {kind} | {n} | {plain:.2f} | {ahead:.2f} | {n / plain:.0f} | {n / ahead:.0f} | "
              f"**{plain / ahead:.2f}x** |")
    print(f"\ndecoding steps: plain {steps['plain']}, lookahead {steps['lookahead']} "
          f"({steps['plain'] / max(steps['lookahead'], 1):.2f} tokens a step); same answers: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

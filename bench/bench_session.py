"""Turn-3 latency of a 5-image, 3-turn chat: a `ChatSession` against re-encoding and re-prefilling everything.

    python bench/bench_session.py [--rounds 3] [--max-new-tokens 24] [--template chat_template|sparkles] [--threads 1]

A random Sparkles model shaped like the real ones, with the LM the larger part (ViT 224 px, patch 16, width 256 x 4;
resampler to 32 image tokens; 8-layer, width-768 Llama-style LM; byte vocabulary, whose one way to spell a text
keeps a random model's answers reusable as a trained model's are): turn 1 brings two images, turn 2
two more, turn 3 the fifth. "re-prefill" is what every peer does and `Chat` does: all five images encoded and the
whole history prefilled again at turn 3. "session" encodes only the fifth image and prefills only turn 3's tokens.
Each round builds a fresh session (turns 1-2 untimed), then times turn 3 both ways, alternating; greedy decoding,
so both give the same answer. "first token" is the time until the LM's first forward pass ends (images encoded,
prompt prefilled, first token's logits out); "whole turn" runs to the end of the answer.

Turns are written with a ChatML chat template by default. With `--template sparkles` a random model's answers do
not start with the space a trained model writes after "Assistant:", so the session's cache of each answer disagrees
with its rendering from the first token and the whole answer is prefilled again: a random-model artefact that
costs about 60 positions a turn here.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from PIL import Image as PILImage

from sparkles.config import TINY, SamplingParams
from sparkles.conversation import Image, user_message
from sparkles.generate import Chat
from sparkles.model.model import build_model
from sparkles.session import ChatSession
from sparkles.tokenizer import byte_tokenizer

TURNS = [("Compare IMAGE#1 with IMAGE#2: which one has more squares, and what colour are they?", 2),
         ("Now look at IMAGE#3 and IMAGE#4. Do they show the same shapes as IMAGE#1?", 2),
         ("Finally, is IMAGE#5 closer to IMAGE#2 or to IMAGE#4? Explain why.", 1)]
COLORS = ["red", "green", "blue", "yellow", "purple"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bench_model(device: str, template: str = "sparkles"):
    config = dataclasses.replace(
        TINY, tokens_per_image=32,
        vision=dataclasses.replace(TINY.vision, image_size=224,
                                   config={"patch_size": 16, "width": 256, "depth": 4, "heads": 4}),
        language=dataclasses.replace(TINY.language, config={
            **TINY.language.config, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
            "num_attention_heads": 12, "num_key_value_heads": 12}))
    torch.manual_seed(0)
    if template == "chat_template":  # ChatML, as modern chat LMs write turns
        tokenizer = byte_tokenizer(("<image>", "<|im_start|>", "<|im_end|>"))
        tokenizer.chat_template = CHATML
        model, processor = build_model(dataclasses.replace(config, template="chat_template"), tokenizer=tokenizer)
    else:
        model, processor = build_model(config)
    return model.to(device).eval(), processor


def images(turn: int) -> list[Image]:
    first = sum(n for _, n in TURNS[:turn])
    return [Image(pixels=PILImage.new("RGB", (640, 480), COLORS[first + k])) for k in range(TURNS[turn][1])]


def one_round(model, processor, params: SamplingParams, history: SamplingParams) -> dict:
    """Turns 1-2 in a fresh session (untimed), then turn 3 both ways: (first token, whole turn) seconds each."""
    session = ChatSession(model, processor)
    for turn in range(2):
        session.answer(TURNS[turn][0], images(turn), history)
    text, new = TURNS[2][0], images(2)
    conversation = session.conversation.append(user_message(text, new, known=session.labels))
    stamps: list[float] = []  # when each LM forward ends: the first one gives the first token's logits
    hook = model.lm.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    out = {"prompt": len(processor.render(conversation, generation=True))}
    before = dict(session.stats)
    for mode, ask in (("re-prefill", lambda: Chat(model, processor).answer(conversation, params)),
                      ("session", lambda: session.answer(text, new, params))):
        stamps.clear()
        started = time.perf_counter()
        answer = ask()
        out[mode] = (stamps[0] - started, time.perf_counter() - started, answer)
    hook.remove()
    out["prefilled"], out["encoded"] = (session.stats[k] - before.get(k, 0) for k in ("tokens_prefilled",
                                                                                        "images_encoded"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--history-tokens", type=int, default=64, help="answer budget of turns 1 and 2")
    parser.add_argument("--template", default="chat_template", choices=["sparkles", "chat_template"],
                        help="a ChatML chat template, or SparklesChat's ###Human: turns (see the docstring)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; on a shared machine use 1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = bench_model(args.device, args.template)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    history = SamplingParams(max_new_tokens=args.history_tokens)
    one_round(model, processor, SamplingParams(max_new_tokens=2), history)  # warm-up: lazy initialisation
    rounds = [one_round(model, processor, params, history) for _ in range(args.rounds)]
    print(f"turn 3 of a 5-image, 3-turn chat ({rounds[0]['prompt']} prompt tokens at turn 3, 5 images x 32 among "
          f"them), {args.template} template, {args.device}, torch threads {torch.get_num_threads()}; "
          f"median of {args.rounds} rounds\n")
    print("| turn 3 | re-prefill (s) | session (s) | speed-up |\n|---|---|---|---|")
    for i, name in enumerate(("first token", f"whole turn ({args.max_new_tokens} new tokens max)")):
        full, cached = (statistics.median(r[mode][i] for r in rounds) for mode in ("re-prefill", "session"))
        print(f"| {name} | {full:.3f} | {cached:.3f} | {full / cached:.1f}x |")
    print(f"\nsame answers both ways: {all(r['re-prefill'][2] == r['session'][2] for r in rounds)}; at turn 3 the "
          f"session prefilled {rounds[0]['prefilled']} of {rounds[0]['prompt']} positions and encoded "
          f"{rounds[0]['encoded']} of 5 images")


if __name__ == "__main__":
    main()

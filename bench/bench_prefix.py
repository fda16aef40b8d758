"""The server's caches across requests: time to first token with `--prefix-cache-mb` and `--image-cache-mb` at their
defaults against 0 (off), over real HTTP and SSE, on a replayed 4-turn conversation and on 16 concurrent clients
that share a system prompt and images.

    python bench/bench_prefix.py [--repeats 3] [--max-tokens 8] [--clients 16] [--threads 1] [--json PATH]
                                 [--model sparkles/assets/default] [--photos]

The prefix cache spares the KV of what a request shares with an earlier one; the image cache spares decoding and
preprocessing the images it resends. The images are 96 px PNG drawings, or with `--photos` 1024 x 768 JPEGs (what
a phone sends), whose decoding and resizing cost some 30 ms each on one core.

1. **Conversation.** A system prompt and four user turns; turns 1-3 bring new images (2, 2, 1; 96 px PNGs as data:
   URLs), turn 4 none. It is replayed as a client replays it: request k carries the whole history, the earlier
   user turns with their images and the answers the server streamed back, so without a cache the server encodes
   every image and prefills everything again at every turn. Time to first token is the time from sending the
   request to the first SSE chunk with content. Turn 1 has nothing to reuse (about 1x); later turns should reuse
   all but the new turn.
2. **Shared prefix.** `--clients` clients at once, each one request: the same system prompt and two images, a
   different question each. A first burst lands on an empty cache; a second burst (new questions) finds the
   system prompt and images held from the first. TTFT median and p90, the burst's wall time, and /health's
   prefix-cache hits and misses after each burst.

Each round starts fresh servers (an empty cache) in this process, cache on and off in turns (the order flips each
round, so a machine that gets busier or quieter skews both alike); medians over `--repeats` rounds. Servers use
the defaults but for the cache (`--max-batch 8`). Decoding is greedy, so both variants must give the same answers;
a mismatch is printed loudly. Every time is also given as this process's CPU time (all its threads: client,
server, engine): on a machine shared with other jobs, wall time is mostly waiting for a core, CPU time the work.

The model is random and shaped like bench_session.py's, with the LM the larger part so that prefill dominates:
ViT 224 px, patch 16, width 256 x 4; a resampler to 32 image tokens; an 8-layer, width-768 Llama-style LM; byte
vocabulary. Turns are written with a ChatML chat template by default, as in bench_session.py: under SparklesChat's
`###` template (`--template sparkles`) a random model's answer does not start with the space a trained model writes
after "Assistant:". Here that choice does not save the answers: this model's answers (seed 0) start with a form
feed, and the server strips an answer's leading blanks, so the answer a client sends back renders to other tokens
than the ones the server generated and cached, under either template. The cache still reuses the whole previous
prompt, but each answer (8 tokens here) is prefilled again at the next turn, and the first visible token is the
2nd or 3rd generated one (a lone byte of a UTF-8 sequence is held back), so every TTFT includes a decode step or
two: artefacts of random weights that lower every ratio. A byte vocabulary keeps text reusable where a merge-heavy
one could tokenize it another way.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# The same random model as bench_session.py and the same in-process server as bench_serve.py (run as scripts, the
# benchmarks in bench/ import each other by name).
from bench_serve import Server, chunks  # noqa: E402
from bench_session import bench_model  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from PIL import ImageDraw  # noqa: E402

from sparkles.generate import Chat  # noqa: E402
from sparkles.image import to_data_uri  # noqa: E402
from sparkles.serve.server import ServeConfig, create_app  # noqa: E402

SYSTEM = ("You are a careful visual assistant. Look at every image before answering, name images as IMAGE#k, "
          "and answer in one short sentence.")
TURNS = [("Compare IMAGE#1 with IMAGE#2: which one has more shapes, and what colour are they?", 2),
         ("Now look at IMAGE#3 and IMAGE#4. Do they show the same shapes as IMAGE#1?", 2),
         ("Is IMAGE#5 closer to IMAGE#2 or to IMAGE#4? Explain why.", 1),
         ("Which of the five images would you pick as the odd one out, and why?", 0)]
QUESTIONS = ["What colour is the big shape in IMAGE#1?", "How many shapes are in IMAGE#2?",
             "Do IMAGE#1 and IMAGE#2 share a colour?", "Which image is brighter?", "Describe IMAGE#1 in five words.",
             "Is there a circle in IMAGE#2?", "What is in the top left corner of IMAGE#1?",
             "Are the backgrounds the same colour?", "Name every shape you see.", "Which image has a square?",
             "What differs between IMAGE#1 and IMAGE#2?", "Is any shape red?", "Count the triangles.",
             "Where is the smallest shape?", "Which shape in IMAGE#2 is largest?", "Give IMAGE#1 a title."]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "teal"]
def serve(chat: Chat, caches: tuple[float, float]) -> Server:
    """A server in this process with its caches across requests on (prefix, image: sizes in MB) or off (0, 0)."""
    prefix_cache_mb, image_cache_mb = caches
    return Server(create_app(chat, ServeConfig(prefix_cache_mb=prefix_cache_mb, image_cache_mb=image_cache_mb)))


PHOTOS = False  # --photos: 1024 x 768 JPEGs, as a phone or camera sends them, instead of 96 px PNG drawings


def image_url(i: int) -> str:
    """A 96 px PNG with two shapes, or with --photos a 1024 x 768 JPEG (quality 90, noisy gradients and the same
    shapes, about 280 kB), different for every `i`."""
    return _image_url(i, PHOTOS)


@functools.cache  # a client holds its images' URLs; making a photo takes longer than sending it
def _image_url(i: int, photos: bool) -> str:
    scale = 1024 / 96 if photos else 1
    size = (1024, 768) if photos else (96, 96)
    image = PILImage.new("RGB", size, COLORS[i % len(COLORS)])
    if photos:
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:size[1], 0:size[0]]
        light = np.stack([(x / 4 + 30 * i) % 256, (y / 3) % 256, ((x + y) / 5) % 256], -1)
        image = PILImage.fromarray((0.5 * np.asarray(image) + 0.5 * light + rng.normal(0, 12, light.shape))
                                   .clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle(tuple(round(v * scale) for v in (8 + 3 * i, 10, 40 + 3 * i, 44)), fill=COLORS[(i + 3) % len(COLORS)])
    draw.ellipse(tuple(round(v * scale) for v in (50, 48 - 2 * i, 86, 84 - 2 * i)), fill=COLORS[(i + 5) % len(COLORS)])
    return to_data_uri(image, "JPEG" if photos else "PNG")


def user_turn(text: str, images: list[str]) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                                        {"type": "text", "text": text}]}


async def ask(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed, greedy request: seconds to the first content chunk, the answer's text, and its usage."""
    body = {"model": "sparkles", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, cpu, first, pieces, usage = time.perf_counter(), time.process_time(), None, [], {}
    async for chunk in chunks(client, url, body):
        if "error" in chunk:
            raise RuntimeError(f"the server failed the request: {chunk['error']}")
        if chunk["choices"] and (text := chunk["choices"][0]["delta"].get("content")):
            if first is None:
                first, cpu = time.perf_counter() - start, time.process_time() - cpu
            pieces.append(text)
        usage = chunk.get("usage") or usage
    # An answer with no visible text (all blanks) has no first content chunk: its end stands in for one.
    if first is None:
        first, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"ttft": first, "cpu": cpu, "text": "".join(pieces), "prompt_tokens": usage.get("prompt_tokens", 0)}


async def cache_stats(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(url + "/health")).json()["prefix_cache"]


async def conversation(url: str, max_tokens: int) -> list[dict]:
    """The 4-turn chat replayed turn by turn; per turn: TTFT, answer, prompt tokens, positions the cache reused."""
    messages, seen, out = [{"role": "system", "content": SYSTEM}], 0, []
    async with httpx.AsyncClient(timeout=600) as client:
        for text, count in TURNS:
            messages.append(user_turn(text, [image_url(seen + k) for k in range(count)]))
            seen += count
            before = await cache_stats(client, url)
            result = await ask(client, url, messages, max_tokens)
            after = await cache_stats(client, url)
            result["reused"] = after["tokens_reused"] - before["tokens_reused"]
            out.append(result)
            messages.append({"role": "assistant", "content": result["text"]})
    return out


async def burst(url: str, clients: int, max_tokens: int, offset: int) -> dict:
    """`clients` requests at once: one system prompt, the same two images, a different question each."""
    images = [image_url(0), image_url(1)]

    def messages(i: int) -> list[dict]:
        question = QUESTIONS[(offset + i) % len(QUESTIONS)]
        return [{"role": "system", "content": SYSTEM}, user_turn(f"Question {offset + i}: {question}", images)]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*[ask(client, url, messages(i), max_tokens) for i in range(clients)])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        stats = await cache_stats(client, url)
    ttfts = sorted(r["ttft"] for r in results)
    return {"ttft_median": statistics.median(ttfts), "ttft_p90": statistics.quantiles(ttfts, n=10)[-1],
            "wall": wall, "cpu": cpu, "answers": [r["text"] for r in results],
            "prompt_tokens": results[0]["prompt_tokens"],
            "hits": stats["hits"], "misses": stats["misses"], "tokens_reused": stats["tokens_reused"]}


def one_round(chat: Chat, caches: tuple[float, float], args) -> dict:
    """A fresh server: the conversation, then on another fresh one the two bursts (each with an empty cache)."""
    with serve(chat, caches) as url:
        turns = asyncio.run(conversation(url, args.max_tokens))
    with serve(chat, caches) as url:
        cold = asyncio.run(burst(url, args.clients, args.max_tokens, 0))
        cold_stats = {k: cold[k] for k in ("hits", "misses", "tokens_reused")}
        warm = asyncio.run(burst(url, args.clients, args.max_tokens, args.clients))
        # /health counts from the server's start: the second burst's own share is the difference
        for k, v in cold_stats.items():
            warm[k] -= v
    return {"turns": turns, "bursts": {"first burst (empty cache)": cold, "second burst (new questions)": warm}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds, cache on and off in each; medians reported")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length (short: TTFT is the point)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the shared-prefix bursts")
    parser.add_argument("--prefix-cache-mb", type=float, default=ServeConfig.prefix_cache_mb,
                        help="the cache-on variant's size (the cache-off one has 0)")
    parser.add_argument("--image-cache-mb", type=float, default=ServeConfig.image_cache_mb,
                        help="the cache-on variant's image cache (the cache-off one has 0)")
    parser.add_argument("--photos", action="store_true", help="1024 x 768 JPEG photos instead of 96 px drawings")
    parser.add_argument("--template", default="chat_template", choices=["chat_template", "sparkles"],
                        help="ChatML turns, or SparklesChat's ###Human: turns (see the docstring)")
    parser.add_argument("--model", metavar="DIR", help="a trained checkpoint (say sparkles/assets/default) instead "
                        "of the random model, with its own template; its answers are real text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; on a shared machine use 1")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    global PHOTOS
    PHOTOS = args.photos
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from sparkles.model.checkpoint import load

        model, processor = load(args.model, device=args.device)
        args.template = f"{args.model}'s own"
    else:
        model, processor = bench_model(args.device, args.template)
    chat = Chat(model, processor)
    variants = {"on": (args.prefix_cache_mb, args.image_cache_mb), "off": (0.0, 0.0)}
    with serve(chat, (0.0, 0.0)) as url:  # warm-up: the first forward passes of a process pay for lazy initialisation
        asyncio.run(conversation(url, 2))
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    started = time.perf_counter()
    for r in range(args.repeats):
        for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
            runs[name].append(one_round(chat, variants[name], args))
    results = summarise(runs)
    results["config"] = {"template": args.template, "device": args.device, "threads": torch.get_num_threads(),
                         "repeats": args.repeats, "max_tokens": args.max_tokens, "clients": args.clients,
                         "prefix_cache_mb": args.prefix_cache_mb, "image_cache_mb": args.image_cache_mb,
                         "images": "1024 x 768 JPEG photos" if args.photos else "96 px PNG drawings",
                         "seconds": round(time.perf_counter() - started)}
    table = report(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "table": table}, f, indent=1)


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds, ratios off/on, and whether the two variants ever answered differently."""
    def med(values):
        return statistics.median(values)

    turns = []
    for t in range(len(TURNS)):
        row = {"turn": t + 1, "new_images": TURNS[t][1], "prompt_tokens": runs["on"][0]["turns"][t]["prompt_tokens"],
               "reused_on": med(r["turns"][t]["reused"] for r in runs["on"])}
        for name in ("on", "off"):
            row[f"ttft_{name}_ms"] = 1000 * med(r["turns"][t]["ttft"] for r in runs[name])
            row[f"cpu_{name}_ms"] = 1000 * med(r["turns"][t]["cpu"] for r in runs[name])
        row["speedup"] = row["ttft_off_ms"] / row["ttft_on_ms"]
        row["cpu_speedup"] = row["cpu_off_ms"] / row["cpu_on_ms"]
        turns.append(row)
    bursts = []
    for kind in runs["on"][0]["bursts"]:
        row = {"burst": kind, "prompt_tokens": runs["on"][0]["bursts"][kind]["prompt_tokens"]}
        for name in ("on", "off"):
            for key in ("ttft_median", "ttft_p90", "wall", "cpu", "hits", "misses", "tokens_reused"):
                row[f"{key}_{name}"] = med(r["bursts"][kind][key] for r in runs[name])
        for key in ("ttft_median", "ttft_p90", "wall", "cpu"):
            row[f"{key}_speedup"] = row[f"{key}_off"] / row[f"{key}_on"]
        bursts.append(row)
    mismatches = []
    for i, (on, off) in enumerate(zip(runs["on"], runs["off"])):
        for t, (a, b) in enumerate(zip(on["turns"], off["turns"])):
            if a["text"] != b["text"]:
                mismatches.append(f"round {i + 1}, turn {t + 1}: on {a['text']!r} / off {b['text']!r}")
        for kind in on["bursts"]:
            for c, (a, b) in enumerate(zip(on["bursts"][kind]["answers"], off["bursts"][kind]["answers"])):
                if a != b:
                    mismatches.append(f"round {i + 1}, {kind}, client {c}: on {a!r} / off {b!r}")
    answers = [t["text"] for t in runs["on"][0]["turns"]]
    return {"turns": turns, "bursts": bursts, "mismatches": mismatches, "answers": answers}


def report(results: dict) -> str:
    c = results["config"]
    lines = [f"caches on (prefix {c['prefix_cache_mb']:g} MB, images {c['image_cache_mb']:g} MB) vs off (0), "
             f"{c['images']}, {c['template']} template, {c['device']}, "
             f"torch threads {c['threads']}, greedy, {c['max_tokens']} tokens per answer, median of {c['repeats']} "
             f"rounds (variants alternating), {c['seconds']} s in all", "",
             "| turn | new images | prompt tokens | reused (cache on) | TTFT off (ms) | TTFT on (ms) | off / on | "
             "CPU to first token off / on (ms) | off / on |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in results["turns"]:
        lines.append(f"| {t['turn']} | {t['new_images']} | {t['prompt_tokens']} | {t['reused_on']:.0f} | "
                     f"{t['ttft_off_ms']:.0f} | {t['ttft_on_ms']:.0f} | **{t['speedup']:.1f}×** | "
                     f"{t['cpu_off_ms']:.0f} / {t['cpu_on_ms']:.0f} | {t['cpu_speedup']:.1f}× |")
    lines += ["", f"{c['clients']} concurrent clients, one request each: one system prompt, the same two images, "
              "different questions (server defaults: --max-batch 8)", "",
              "| burst | prompt tokens | TTFT median off / on (ms) | TTFT p90 off / on (ms) | wall off / on (s) | "
              "CPU off / on (s) | off / on: median, p90, wall, CPU | cache on: hits / misses, tokens reused |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in results["bursts"]:
        lines.append(f"| {b['burst']} | {b['prompt_tokens']} | {1000 * b['ttft_median_off']:.0f} / "
                     f"{1000 * b['ttft_median_on']:.0f} | {1000 * b['ttft_p90_off']:.0f} / "
                     f"{1000 * b['ttft_p90_on']:.0f} | {b['wall_off']:.2f} / {b['wall_on']:.2f} | "
                     f"{b['cpu_off']:.2f} / {b['cpu_on']:.2f} | {b['ttft_median_speedup']:.1f}×, "
                     f"{b['ttft_p90_speedup']:.1f}×, {b['wall_speedup']:.1f}×, {b['cpu_speedup']:.1f}× | "
                     f"{b['hits_on']:.0f} / {b['misses_on']:.0f}, {b['tokens_reused_on']:.0f} |")
    lines.append("")
    if results["mismatches"]:
        lines.append(f"!!! ANSWERS DIFFER between cache on and off in {len(results['mismatches'])} place(s):")
        lines += [f"!!!   {m}" for m in results["mismatches"]]
    else:
        lines.append("same answers with the cache on and off: every turn, every client, every round")
    lines.append(f"answers (cache on, round 1): {results['answers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

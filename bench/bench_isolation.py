"""Isolation: how much longer one normal request takes while hostile traffic runs than it takes alone.

The target (issue 15): no request waits more than a second longer than it would alone. A normal request (two
64x64 images, a question, `--tokens` generated tokens, streamed) is timed to its last chunk, alone and then under
each kind of hostile traffic, alternating, `--repeat` times; the median of each phase's `--samples` requests is
compared. The hostile clients run in a child process, so that their own work (building 60 MiB bodies, reading
answers) does not take the server's interpreter lock: only what the server does for them counts. The server is
the in-process one of bench_serve.py (same random model), with its default limits unless a flag says otherwise.

    python bench/bench_isolation.py [--repeat 3] [--samples 3] [--tokens 8] [--huge-mb 60] [--png 4096]

The cases: `plain load (control)` (16 clients asking for 64 tokens each, as the last two do but with nothing
hostile: what ordinary load of that size costs), `sampling load (control)` (the same clients sampling with ordinary
values, temperature 1 and top_p 0.9: the control for poisoned sampling), `huge bodies` (8 clients, each sending
valid bodies of --huge-mb MiB, whitespace-padded, one after another), `slow drip` (8 clients that state a --huge-mb
MiB Content-Length, send 1 KiB and stall; the server answers 408 at its --body-timeout, which a client still sending
never reads, so the server's counts show it), `large PNGs` (16 clients, each a request with one --png² PNG), `max
stop strings` (the control's clients with 4 stop strings of 256 characters), `poisoned sampling` (the control's
clients with the extreme values that pass validation: temperature 2, top_p 1e-9, repetition_penalty 10, seed
2**64-1).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import statistics
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

# The in-process server, random model and SSE reader of bench_serve.py (run as scripts, the benchmarks in bench/
# import each other by name).
from bench_serve import Server, bench_model, chunks, request_body  # noqa: E402

from sparkles.serve.server import ServeConfig, create_app  # noqa: E402

ATTACKS = ("plain load (control)", "sampling load (control)", "huge bodies", "slow drip", "large PNGs",
           "max stop strings", "poisoned sampling")


# The hostile clients (in the child process)


def _huge(mb: int) -> bytes:
    small = {"model": "sparkles", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    return json.dumps(small).encode() + b" " * (mb * 2**20)  # valid JSON: trailing whitespace


def _png_body(size: int, i: int) -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (i * 37 % 256, 90, 160)).save(buffer, "PNG")
    url = "data:image/png;base64," + __import__("base64").b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in IMAGE#1?"}]
    return {"model": "sparkles", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


def _plain_body(i: int, **extra) -> dict:
    return {"model": "sparkles", "max_tokens": 64, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Tell me a long story {i}"}], **extra}


def _stops_body(i: int) -> dict:
    stops = [chr(0x4E00 + i + k) * 256 for k in range(4)]  # never produced: every check runs to the end
    return _plain_body(i, stop=stops)


def _sampling_body(i: int) -> dict:
    return _plain_body(i, temperature=1.0, top_p=0.9, seed=i)


def _poison_body(i: int) -> dict:
    return _plain_body(i, temperature=2, top_p=1e-9, repetition_penalty=10, seed=2**64 - 1)


def _jobs(kind: str, huge_mb: int, png: int) -> list:
    """Per client, what it sends: keyword arguments for `client.post`, or "drip". Built before the attack starts."""
    if kind == "huge bodies":
        body = _huge(huge_mb)
        return [{"content": body}] * 8
    if kind == "slow drip":
        return ["drip"] * 8
    if kind == "large PNGs":
        return [{"json": _png_body(png, i)} for i in range(16)]
    make = {"plain load (control)": _plain_body, "sampling load (control)": _sampling_body,
            "max stop strings": _stops_body, "poisoned sampling": _poison_body}
    return [{"json": make[kind](i)} for i in range(16)]


async def _attack(url: str, jobs: list, huge_mb: int, statuses) -> None:
    async def stall():
        yield b'{"model": "sparkles", "messages": ' + b" " * 1024
        await asyncio.sleep(3600)

    async def client_loop(client, job):
        while True:
            try:
                if job == "drip":
                    response = await client.post(url + "/v1/chat/completions", content=stall(),
                                                 headers={"Content-Length": str(huge_mb * 2**20)})
                else:
                    response = await client.post(url + "/v1/chat/completions", **job)
                statuses[response.status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(*[client_loop(client, job) for job in jobs])


def attacker(url: str, kind: str, huge_mb: int, png: int, ready, report) -> None:
    """The child process: runs `kind` until terminated, sending its answers' statuses every half second."""
    statuses: Counter = Counter()
    jobs = _jobs(kind, huge_mb, png)

    async def main():
        task = asyncio.create_task(_attack(url, jobs, huge_mb, statuses))
        ready.set()
        while True:
            await asyncio.sleep(0.5)
            report.put(dict(statuses))
            if task.done():
                task.result()

    asyncio.run(main())


# The normal client and the measurement (in this process)


async def normal_latency(url: str, samples: int, tokens: int, start: int) -> list[float]:
    times = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(samples):
            begin = time.perf_counter()
            async for _ in chunks(client, url, request_body(start + i, tokens)):
                pass
            times.append(time.perf_counter() - begin)
    return times


def wait_idle(url: str, timeout: float = 120) -> None:
    """Until the server holds no body bytes, prepares nothing and decodes nothing: the next phase starts clean."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=30).json()
        if not (health["bodies"]["bytes"] or health["preparing"]["busy"] or health["running"] or health["waiting"]):
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="alone / under attack pairs per attack")
    parser.add_argument("--samples", type=int, default=3, help="normal requests per phase (their median counts)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens each normal request generates")
    parser.add_argument("--huge-mb", type=int, default=60, help="MiB of each huge body (the limit is 64)")
    parser.add_argument("--png", type=int, default=4096, help="side of each large PNG")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds the attack runs before the first sample")
    parser.add_argument("--hold", type=float, default=12.0,
                        help="seconds each attack runs at least, so that slow answers (408, 503) are counted too")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="the server's, for the slow-drip clients")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated, from: " + ", ".join(ATTACKS))
    args = parser.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",")]
    chat = bench_model("cpu")
    config = ServeConfig(body_timeout=args.body_timeout, max_queue=64)
    context = multiprocessing.get_context("spawn")
    results: dict = {a: {"alone": [], "attack": [], "statuses": Counter(), "server": [], "refused": []}
                     for a in attacks}
    with Server(create_app(chat, config)) as url:
        asyncio.run(normal_latency(url, 2, args.tokens, 10_000))  # warm-up
        for r in range(args.repeat):
            for kind in attacks:
                wait_idle(url)
                results[kind]["alone"].append(statistics.median(asyncio.run(
                    normal_latency(url, args.samples, args.tokens, 100 * r))))
                before = httpx.get(url + "/health", timeout=60).json()["bodies"]
                ready, report = context.Event(), context.Queue()
                child = context.Process(target=attacker, args=(url, kind, args.huge_mb, args.png, ready, report),
                                        daemon=True)
                child.start()
                ready.wait(120)
                began = time.monotonic()
                time.sleep(args.ramp)
                health = httpx.get(url + "/health", timeout=60).json()
                results[kind]["server"].append((health["bodies"]["bytes"] / 2**20, health["preparing"]["busy"],
                                                health["running"] + health["waiting"]))
                results[kind]["attack"].append(statistics.median(asyncio.run(
                    normal_latency(url, args.samples, args.tokens, 100 * r + 50))))
                time.sleep(max(0.0, began + args.hold - time.monotonic()))
                after = httpx.get(url + "/health", timeout=60).json()["bodies"]
                results[kind]["refused"].append((after["refused"] - before["refused"],
                                                 after["timed_out"] - before["timed_out"]))
                child.terminate()
                child.join(10)
                last = {}
                while not report.empty():
                    last = report.get()
                results[kind]["statuses"].update(last)
                print(f"pass {r + 1}, {kind}: alone {results[kind]['alone'][-1]:.3f} s, under attack "
                      f"{results[kind]['attack'][-1]:.3f} s, attack answers {last}, server (MiB of bodies, busy "
                      f"workers, engine rows) {results[kind]['server'][-1]}, bodies refused (503) and timed out (408) "
                      f"{results[kind]['refused'][-1]}", flush=True)
        wait_idle(url)
    report_table(results, args)


def report_table(results: dict, args) -> None:
    print(f"\ntorch threads {torch.get_num_threads()}, normal request: two 64x64 images, {args.tokens} tokens "
          f"streamed; medians of {args.samples} requests per phase, {args.repeat} alternating passes; each attack "
          f"ran {args.hold:g} s, its answers summed over the passes\n")
    print("| hostile traffic | alone (s) | under attack (s) | extra wait (s) | ratio | server under attack: MiB "
          "of bodies, busy workers, engine rows | bodies refused (503) / timed out (408) | hostile answers |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for kind, r in results.items():
        extras = [b - a for a, b in zip(r["alone"], r["attack"])]
        alone, attack = statistics.median(r["alone"]), statistics.median(r["attack"])
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items(), key=str))
        server = "; ".join(f"{mib:.0f}, {busy}, {rows}" for mib, busy, rows in r["server"])
        refused = f"{sum(a for a, _ in r['refused'])} / {sum(b for _, b in r['refused'])}"
        print(f"| {kind} | {alone:.3f} | {attack:.3f} | {statistics.median(extras):+.3f} | {attack / alone:.2f}x | "
              f"{server} | {refused} | {answers or '-'} |")


if __name__ == "__main__":
    main()

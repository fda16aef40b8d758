"""Serving throughput: requests/s, generated tokens/s and time to first token at 1, 4 and 16 concurrent clients,
batched (continuous batching, up to 16 rows) against one request at a time, over real HTTP with SSE.

Both servers run in this process, taking turns, on the same random model (hidden 256, 4 layers: big enough
that batching matters), so the ratios compare like with like. Absolute numbers depend on the machine; on a shared
2-core VM they move by 2x between runs, the ratios much less.

    python bench/bench_serve.py [--clients 1,4,16] [--tokens 64] [--rounds 2] [--repeat 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from sparkles.config import LanguageConfig, ModelConfig, VisionConfig  # noqa: E402
from sparkles.generate import Chat  # noqa: E402
from sparkles.image import to_data_uri  # noqa: E402
from sparkles.model.model import build_model  # noqa: E402
from sparkles.serve.server import ServeConfig, create_app  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def bench_model(device: str) -> Chat:
    config = ModelConfig(
        vision=VisionConfig(kind="tiny", image_size=64, config={"patch_size": 8, "width": 128, "depth": 2, "heads": 4}),
        language=LanguageConfig(kind="tiny", config={"hidden_size": 256, "intermediate_size": 1024,
                                                     "num_hidden_layers": 4, "num_attention_heads": 4,
                                                     "num_key_value_heads": 4, "max_position_embeddings": 2048}),
        connector="resampler", tokens_per_image=16, max_seq_len=2048)
    torch.manual_seed(0)
    model, processor = build_model(config)
    return Chat(model.to(device).eval(), processor)


class Server:
    """uvicorn on 127.0.0.1 in a thread, stopped on exit (forced if it lingers)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.server.force_exit = True


def request_body(i: int, tokens: int) -> dict:
    """Two images and a question, different for every request; `ignore_eos` makes every answer `tokens` long."""
    images = [to_data_uri(PILImage.new("RGB", (64, 64), COLORS[(i + k) % len(COLORS)])) for k in (0, 3)]
    content = [{"type": "text", "text": f"Request {i}: compare "},
               {"type": "image_url", "image_url": {"url": images[0]}}, {"type": "text", "text": " with "},
               {"type": "image_url", "image_url": {"url": images[1]}},
               {"type": "text", "text": ". Which one is brighter, IMAGE#1 or IMAGE#2?"}]
    return {"model": "sparkles", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def chunks(client: httpx.AsyncClient, url: str, body: dict):
    """The JSON chunks of one streamed chat completion, as they arrive."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:])


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    async for chunk in chunks(client, url, body):
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    return (first if first is not None else time.perf_counter() - start), tokens


async def load(url: str, clients: int, rounds: int, tokens: int) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests one after another."""
    ttfts, counts = [], []

    async def client_loop(c: int, client: httpx.AsyncClient):
        for r in range(rounds):
            ttft, n = await one_request(client, url, request_body(c * rounds + r, tokens))
            ttfts.append(ttft)
            counts.append(n)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, request_body(10_000, 4))  # warm-up: first-call costs stay out of the figures
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(c, client) for c in range(clients)])
        elapsed = time.perf_counter() - start
    return {"requests": len(counts), "seconds": elapsed, "req_s": len(counts) / elapsed,
            "tok_s": sum(counts) / elapsed, "ttft_ms": 1000 * statistics.median(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--repeat", type=int, default=3, help="passes over every level; medians are reported")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    chat = bench_model(args.device)
    modes = {"one at a time": 1, "batched": max(levels)}
    runs: dict = {}
    servers = {mode: Server(create_app(chat, ServeConfig(max_batch=batch, max_queue=2 * max(levels))))
               for mode, batch in modes.items()}
    urls = {mode: server.__enter__() for mode, server in servers.items()}
    try:
        # Modes alternate within each pass, so a machine that gets busier or quieter skews both alike.
        for _ in range(args.repeat):
            for clients in levels:
                for mode in modes:
                    runs.setdefault((mode, clients), []).append(asyncio.run(load(urls[mode], clients, args.rounds,
                                                                                   args.tokens)))
    finally:
        for server in servers.values():
            server.__exit__()
    results = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    report(results, levels, args)


def report(results: dict, levels: list[int], args) -> None:
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.tokens} tokens per answer, "
          f"{args.rounds} requests per client, two 64x64 images per request, median of {args.repeat} passes\n")
    print("| clients | mode | requests | req/s | generated tok/s | TTFT median (ms) |")
    print("|---:|---|---:|---:|---:|---:|")
    for (mode, clients), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] == "batched")):
        print(f"| {clients} | {mode} | {r['requests']:.0f} | {r['req_s']:.2f} | {r['tok_s']:.0f} | "
              f"{r['ttft_ms']:.0f} |")
    print("\n| clients | batched / one at a time: req/s | tok/s | TTFT |")
    print("|---:|---:|---:|---:|")
    for clients in levels:
        b, s = results["batched", clients], results["one at a time", clients]
        print(f"| {clients} | {b['req_s'] / s['req_s']:.2f}x | {b['tok_s'] / s['tok_s']:.2f}x | "
              f"{b['ttft_ms'] / s['ttft_ms']:.2f}x |")


if __name__ == "__main__":
    main()

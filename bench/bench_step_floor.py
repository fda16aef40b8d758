"""Where one decoding step's time goes, and how fast a step could be: the floor behind `bench_decode.py`'s ratios.

    python bench/bench_step_floor.py [--repeats 9] [--prompt 200] [--sizes 4M 28M] [--threads 1]

For `bench_decode.py`'s random Llama LMs at batch 1, after a `--prompt`-token prompt and 3 generated tokens, times
one decoding step of each variant, alternating them round by round (medians over `--repeats` rounds of 50 steps;
each step's position is cut back after it, so every step sees the same cache):

- **HF step**: the LM's own forward on one new token with transformers' DynamicCache, as HF `generate` runs it;
- **ours**: `LlamaStep` on `generate`'s in-place slab cache;
- **ours, no attention**: the same with attention replaced by a no-op (its output is q), so the difference is what
  attention costs in place (it reads the whole KV cache, cold after the weights);
- **products alone**: only the step's matrix products, on its packed weights, in its order: reading every weight
  once, which on a CPU is bound by memory bandwidth.

"ceiling" is the HF step over (products + attention): how much faster than HF's a step could be if it did nothing
but read its weights and its cache. The rest of our step ("other") is its small operations and their dispatch.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from bench_decode import SIZES, build  # noqa: E402 (run as a script: bench/ is on the path)

import sparkles.llama_step as step_module
from sparkles.config import SamplingParams
from sparkles.generate import KVCache, cache_kwargs, generate
from sparkles.llama_step import LlamaStep


def variants(lm, prompt: int) -> dict:
    """name -> a function running one step at a fixed position and cutting its cache back."""
    from transformers import DynamicCache

    ids = torch.randint(1, lm.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    embeds = lm.get_input_embeddings()(ids)
    cache = KVCache()
    tokens = generate(lm, embeds, SamplingParams(max_new_tokens=10_000), cache=cache)
    for _ in range(4):  # the prompt and 3 tokens in the cache
        next(tokens)
    held = cache.length
    x, position = embeds[:, :1], torch.tensor([[held]])
    step = LlamaStep(lm)
    dynamic = DynamicCache()  # as long as ours: the prompt and 3 more positions
    lm(inputs_embeds=torch.cat([embeds, embeds[:, :held - prompt]], dim=1), use_cache=True,
       **cache_kwargs(lm, dynamic))

    def ours():
        step(x, position, None, cache.past)
        for layer in cache.past.layers:
            layer.hold(held)

    def hf():
        lm(inputs_embeds=x, position_ids=position, use_cache=True, **cache_kwargs(lm, dynamic))
        dynamic.crop(-1)

    def products():
        h, m = torch.randn(1, lm.config.hidden_size), torch.randn(1, lm.config.intermediate_size)
        for w in step.layers:
            torch.mm(h, w.qkv[0])
            torch.addmm(h, h, w.o[0])
            torch.mm(h, w.gate_up[0])
            torch.addmm(h, m, *(w.down_one or w.down)[:1])
        torch.mm(h, step.head[0])

    return {"HF step": hf, "ours": ours, "ours, no attention": ours, "products alone": products}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads; on a shared machine use 1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    print(f"one decoding step at batch 1 after {args.prompt} + 3 positions, cpu, torch threads "
          f"{torch.get_num_threads()}; ms a step, median of {args.repeats} rounds of 50 steps, variants alternating\n")
    print("| LM | HF step | ours | ours, no attention | products alone | attention | other | HF / ours | ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    real_flash = step_module._flash
    for name in args.sizes:
        lm = build(SIZES[name], "cpu")
        with torch.inference_mode():
            runs = variants(lm, args.prompt)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(args.repeats + 1):  # round 0 warms up
                for k, fn in runs.items():
                    step_module._flash = (lambda q, k, v, scale: (q,)) if k == "ours, no attention" else real_flash
                    start = time.perf_counter()
                    for _ in range(50):
                        fn()
                    if r:
                        times[k].append((time.perf_counter() - start) / 50 * 1e3)
            step_module._flash = real_flash
        t = {k: statistics.median(v) for k, v in times.items()}
        attention, other = t["ours"] - t["ours, no attention"], t["ours, no attention"] - t["products alone"]
        print(f"| {name} | {t['HF step']:.2f} | {t['ours']:.2f} | {t['ours, no attention']:.2f} | "
              f"{t['products alone']:.2f} | {attention:.2f} | {other:.2f} | {t['HF step'] / t['ours']:.2f}x | "
              f"{t['HF step'] / (t['products alone'] + attention):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

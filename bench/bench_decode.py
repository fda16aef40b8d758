"""Decoding speed: our token iterator (`generate.generate`) against Hugging Face `generate` on the same weights.

    python bench/bench_decode.py [--repeats 5] [--prompt 200] [--new 64] [--batches 1 8] [--threads 1] [--clock cpu]
                                 [--check N]

Two random Llama LMs (about 4 M and 28 M parameters, float32, CPU by default), a random prompt of `--prompt` ids
per row, greedy, exactly `--new` new tokens (no stop id on either side). HF gets the ids (`lm.generate`, its own
DynamicCache); ours gets their embeddings, as a Sparkles model hands them over after the images are spliced in,
and is timed until its last token is out, drained from the iterator as a front end would. The two variants
alternate ABAB within each of `--repeats` rounds, so load on a shared machine falls on both alike; the table
shows medians and tokens/s (rows x new tokens / seconds, prefill included), and the ratio is the median of the
rounds' own ratios, each taken between two runs a second apart, with their range beside it: on a machine whose
speed drifts with its neighbours' load that pairing is what keeps the drift out of the ratio. Seconds are this
process's CPU time by default (`--clock cpu`): with `--threads 1` that is the work done, while wall time on a
shared machine also counts the time other processes held the core (`--clock wall` for it; the last column gives
the wall-time ratio either way). Every round checks that both give the same tokens; a mismatch is printed loudly
and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from sparkles.config import SamplingParams
from sparkles.generate import generate

SIZES = {  # name -> LlamaConfig fields
    "4M": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 2048},
    "28M": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 8192},
}


def build(fields: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**fields, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    lm = LlamaForCausalLM(config).to(device).eval()
    # HF's defaults would stop on an end-of-sequence id; both sides must run exactly `new` tokens.
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = 0
    return lm


def hf(lm, ids: torch.Tensor, new: int) -> torch.Tensor:
    """(B, new) tokens from HF generate, greedy."""
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, num_beams=1)
    return out[:, ids.shape[1]:]


def ours(lm, ids: torch.Tensor, new: int) -> torch.Tensor:
    """(B, new) tokens from our iterator, greedy, drained one step at a time."""
    embeds = lm.get_input_embeddings()(ids)
    tokens = list(generate(lm, embeds, SamplingParams(max_new_tokens=new)))
    return torch.stack(tokens, dim=1)


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """(CPU seconds, wall seconds, output) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="ABAB rounds per case")
    parser.add_argument("--prompt", type=int, default=200, help="prompt ids per row")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; on a shared machine use 1")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="what the seconds columns measure")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="before timing, compare the tokens of N more random prompts per case (untimed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    warnings.filterwarnings("ignore", module="transformers")  # HF's generation-config notes, once per call
    print(f"greedy, {args.prompt}-token prompt, {args.new} new tokens, {args.device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}; {args.clock} time, "
          f"median of {args.repeats} ABAB rounds\n")
    print("| LM | params | batch | HF generate (s) | ours (s) | HF tok/s | ours tok/s | ours / HF | rounds' range "
          "| ours / HF (wall) | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    mismatches = 0
    for name in args.sizes:
        lm = build(SIZES[name], args.device)
        params = sum(p.numel() for p in lm.parameters())
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(1, SIZES[name]["vocab_size"], (batch, args.prompt), generator=generator)
            ids = ids.to(args.device)
            for seed in range(args.check):  # more prompts, untimed: the same tokens is the point
                more = torch.randint(1, SIZES[name]["vocab_size"], (batch, args.prompt),
                                     generator=torch.Generator().manual_seed(1000 + seed)).to(args.device)
                with torch.inference_mode():
                    if not torch.equal(hf(lm, more, args.new), ours(lm, more, args.new)):
                        mismatches += 1
                        print(f"!!! TOKEN MISMATCH: {name}, batch {batch}, checked prompt {seed}", file=sys.stderr)
            timed(hf, lm, ids, 4)  # warm-up: lazy initialisation on both sides
            timed(ours, lm, ids, 4)
            times: dict[str, list[float]] = {"hf": [], "ours": []}
            walls: dict[str, list[float]] = {"hf": [], "ours": []}
            same = True
            for _ in range(args.repeats):
                for variant, fn in (("hf", hf), ("ours", ours)):
                    cpu, wall, tokens = timed(fn, lm, ids, args.new)
                    times[variant].append(cpu if args.clock == "cpu" else wall)
                    walls[variant].append(wall)
                    if variant == "hf":
                        reference = tokens
                    elif not torch.equal(tokens, reference):
                        same = False
                        where = (tokens != reference).nonzero()[0].tolist()
                        print(f"!!! TOKEN MISMATCH: {name}, batch {batch}: first at row {where[0]}, step {where[1]}",
                              file=sys.stderr)
            mismatches += not same
            t_hf, t_ours = statistics.median(times["hf"]), statistics.median(times["ours"])
            ratios = [a / b for a, b in zip(times["hf"], times["ours"])]
            wall = statistics.median(a / b for a, b in zip(walls["hf"], walls["ours"]))
            rate = batch * args.new
            print(f"| {name} | {params / 1e6:.1f} M | {batch} | {t_hf:.3f} | {t_ours:.3f} | {rate / t_hf:.0f} | "
                  f"{rate / t_ours:.0f} | **{statistics.median(ratios):.2f}x** | {min(ratios):.2f}–{max(ratios):.2f} | "
                  f"{wall:.2f}x | {'yes' if same else '**NO**'} |", flush=True)
    if mismatches:
        print(f"\n!!! {mismatches} case(s) gave different tokens from HF generate", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The peers' variants side by side on the shapes world: one recipe, one sample budget, one table.

    python bench/compare_variants.py --tower runs/default/1-perception/model --out runs/variants \
        [--variants default,mlp,resampler,...] [--steps 300] [--batch 16] [--n 50] [--seed 4321]

Every variant is the default model with one switch (`VARIANTS`), and starts where the default recipe's second stage
starts: the tower pretrained on the world's object labels (stage 1 of `--preset default`, read from `--tower`) and
frozen, the connector and LM new. Each then learns the same `--steps` batches of the default recipe's captions
stage and is scored on `--n` fresh one-image scenes from `--seed` (exact captions, and the precision and recall of
the objects they claim), on its images and on grey ones (the blind baseline). Captions are the task type a budget
this small teaches (the default recipe's comparisons need its third stage, `README.md`). Also measured on this
machine: training samples/s (median over the run's steps), greedy tokens/s (one conversation, 32 new tokens, its
prefill included, median of 3), parameters (total; trainable: all but the frozen tower) and LM positions per image.

Writes `<out>/<variant>/` (the run), `<out>/variants.json` and `<out>/variants.md` (the table in the README).
A finished variant (its `result.json` exists) is not run again, so a killed comparison resumes; two processes may
share `--out` with different `--variants` (one core each), and each writes the table of all finished so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from sparkles.config import DataSource, SamplingParams, override
from sparkles.train.recipes import DEFAULT_MODEL, PRESETS

# One switch each; values are `override` paths into ModelConfig. A switch this checkout does not have is reported
# and left out, so the table fills in as the variants land.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},  # 2x2 pixel shuffle + MLP: 16 positions per image, causal attention
    "mlp": {"connector": "mlp", "tokens_per_image": 64},  # LLaVA's MLP over every patch token
    "resampler": {"connector": "resampler"},  # 16 learned queries, one cross-attention layer
    "mmca": {"attention": "mmca"},  # DeepSpeed-VisualChat's multi-modal causal attention
    "tiles": {"tiles.grid": "2,2"},  # SPHINX: a global view plus 2x2 sub-image tiles, empty tiles as one skip token
    "imagebind": {"adapter.kind": "imagebind"},  # ImageBind-LLM: gated injection into every layer, 1 position
    "llama-adapter": {"adapter.kind": "llama-adapter"},  # LLaMA-Adapter: gated adaption prompts, 1 position
    # MultiModal-GPT / OpenFlamingo: a resampler and a gated cross-attention block before every layer, each text
    # token seeing every image so far (captions of several images come after all of them)
    "xattn": {"connector": "resampler", "cross_attention.every": 1, "cross_attention.sees": "all"},
}


def variant_config(name: str):
    fields = VARIANTS[name]
    known = {f.name for f in dataclasses.fields(DEFAULT_MODEL)}
    missing = sorted(k for k in fields if k.split(".")[0] not in known)
    if missing:
        return None, f"this checkout has no model.{', model.'.join(missing)}"
    return override(DEFAULT_MODEL, fields), None


def starting_point(config, tower: Path, folder: Path) -> Path:
    """A checkpoint of the variant whose tower holds the pretrained weights; the rest is new."""
    from safetensors.torch import load_file

    from sparkles.model.checkpoint import save_checkpoint
    from sparkles.model.model import build_model

    torch.manual_seed(0)
    model, processor = build_model(config)
    weights = {k: v for k, v in load_file(str(tower / "model.safetensors")).items() if k.startswith("vision.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(k.startswith("vision.") for k in missing):
        raise SystemExit(f"{tower}: its tower does not fit this variant ({unexpected[:3]} {missing[:3]})")
    save_checkpoint(model, processor, folder)
    return folder


def decode_speed(chat, conversation, tokens: int = 32) -> float:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    rates = []
    for _ in range(3):
        start, n = time.perf_counter(), 0
        for _ in chat.stream(conversation, params):
            n += 1
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def run_variant(name: str, args) -> dict:
    from sparkles.generate import Chat
    from sparkles.model.checkpoint import load_checkpoint
    from sparkles.train.loop import train
    from sparkles.world.tasks import make_eval_set

    folder = args.out / name
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    config, why = variant_config(name)
    if config is None:
        return {"variant": name, "skipped": why}
    start = starting_point(config, args.tower, folder / "start")
    default = PRESETS["default"]
    recipe = dataclasses.replace(
        default, stages=(), init=str(start), out=str(folder / "run"), eval_every=0, save_every=100,
        data=dataclasses.replace(default.data, sources=(DataSource("world:caption"),)),
        optim=dataclasses.replace(default.optim, max_steps=args.steps, batch_size=args.batch,
                                  warmup_steps=min(50, args.steps // 5)))
    model_dir = train(recipe, resume=True)
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    speed = statistics.median(r["samples_per_s"] for r in rows if "samples_per_s" in r)
    model, processor = load_checkpoint(model_dir)
    chat = Chat(model, processor)
    real, grey = captions(chat, args.n, args.seed), captions(chat, args.n, args.seed, blank=True)
    item = next(i for i in make_eval_set(1, args.seed) if i.kind == "caption")
    positions = _positions_per_image(processor, item)
    result = {"variant": name, "switch": VARIANTS[name], "accuracy": real, "grey": grey,
              "params": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision.")),
              "positions_per_image": positions, "train_samples_per_s": speed,
              "decode_tokens_per_s": decode_speed(chat, _first_turn(item)),
              "steps": args.steps, "batch": args.batch, "samples": args.steps * args.batch}
    done.write_text(json.dumps(result, indent=1))
    return result


def captions(chat, n: int, seed: int, *, blank: bool = False) -> dict[str, float]:
    """Exact one-image captions and their per-object precision and recall (micro-averaged), on n fresh scenes."""
    from sparkles.world.data import blanked
    from sparkles.world.scoring import object_counts
    from sparkles.world.tasks import make_eval_set, score

    items = [blanked(i) if blank else i for i in make_eval_set(n, seed) if i.kind == "caption"]
    answers = chat.answer_batch([_first_turn(i) for i in items], SamplingParams(max_new_tokens=64))
    counts = [object_counts(i.truths[0], a) for i, a in zip(items, answers)]
    matched, claimed, present = (sum(c) for c in zip(*counts))
    return {"caption": sum(score(i.truths[0], a).correct for i, a in zip(items, answers)) / len(items),
            "caption precision": matched / claimed if claimed else 0.0,
            "caption recall": matched / present if present else 0.0}


def _first_turn(item):
    from sparkles.conversation import Conversation

    return Conversation((item.turns[0],))


def _positions_per_image(processor, item) -> int:
    """LM positions the item's one image takes (with tiles: every view's tokens, and one per skipped tile)."""
    rendered = processor.render(_first_turn(item), generation=True)
    return processor.image_span(rendered.input_ids, rendered.image_starts[0])[0]


TASKS = [("caption", "caption exact"), ("caption precision", "object precision"),
         ("caption recall", "object recall")]


def table(results: list[dict]) -> str:
    head = ["variant", *[label for _, label in TASKS], "params (trainable)", "positions / image",
            "train samples/s", "decode tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | not run: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        cells = [f"{100 * r['accuracy'].get(k, 0):.0f} ({100 * r['grey'].get(k, 0):.0f})" for k, _ in TASKS]
        params = f"{r['params'] / 1e6:.2f} M ({r['trainable'] / 1e6:.2f} M)"
        lines.append("| " + " | ".join([r["variant"], *cells, params, str(r["positions_per_image"]),
                                        f"{r['train_samples_per_s']:.1f}", f"{r['decode_tokens_per_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n\nAccuracy in %, grey-image baseline in brackets.\n"


def remeasure_decoding(args, rounds: int = 5) -> None:
    """Decoding tokens/s of every finished variant again, in one process, the variants taking turns for `rounds`
    rounds (medians): speeds measured while other work shared the machine do not compare."""
    from sparkles.generate import Chat
    from sparkles.model.checkpoint import load_checkpoint
    from sparkles.world.tasks import make_eval_set

    done = [name for name in VARIANTS if (args.out / name / "result.json").exists()]
    chats = {name: Chat(*load_checkpoint(args.out / name / "run" / "model")) for name in done}
    item = next(i for i in make_eval_set(1, args.seed) if i.kind == "caption")
    rates: dict[str, list[float]] = {name: [] for name in done}
    for _ in range(rounds):
        for name in done:
            rates[name].append(decode_speed(chats[name], _first_turn(item)))
    for name in done:
        path = args.out / name / "result.json"
        result = json.loads(path.read_text()) | {"decode_tokens_per_s": statistics.median(rates[name])}
        path.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", type=Path, required=True, help="a checkpoint whose tower every variant starts from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--remeasure-decoding", action="store_true",
                        help="measure every finished variant's decoding again, taking turns, then write the table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.remeasure_decoding:
        remeasure_decoding(args)
    else:
        for name in args.variants.split(","):
            run_variant(name, args)
    # Every variant finished in --out so far, also by other processes running other --variants at the same time.
    results = [json.loads((args.out / name / "result.json").read_text()) for name in VARIANTS
               if (args.out / name / "result.json").exists()]
    (args.out / "variants.json").write_text(json.dumps(results, indent=1))
    (args.out / "variants.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()

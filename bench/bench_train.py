"""Training throughput in two parts, each as ratios against a baseline measured in the same process:

1. the data path alone: samples/s out of the DataLoader with 0, 1 and 2 workers, length grouping by rendering
   every sample in the main process (how it was) against grouping by estimated lengths (how it is);
2. the training step: padding only vs length grouping vs packing.

    python bench/bench_train.py [--repeats 3] [--batches 20] [--steps 3] [--batch 16] [--train-batch 8]
                                [--source files|world] [--skip-train]

A small model (ViT 64 px, 4-layer width-256 LM, byte vocabulary) trains on synthetic dialogues whose answers vary
from a few words to a few sentences, as real instruction data does (`--source world`: the shapes world's caption
and dialogue streams instead). Variants take turns, ABCABC…, for `--repeats` rounds, and each reports its median
round, so a machine that speeds up or slows down during the run does not decide the ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from sparkles.config import TINY, DataConfig, DataSource, LanguageConfig, OptimConfig, TrainConfig
from sparkles.train.data import BlendSampler, LengthEstimate, TrainDataset, collate
from sparkles.train.loop import build_model_for, make_loader, param_groups
from sparkles.train.records import read_source
from sparkles.train.resume import Dist

WORDS = "red blue green circle square triangle big small left right above below image shows has".split()


def make_data(folder: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        ids = [f"{i}-{k}" for k in range(rng.randint(1, 3))]
        for image_id in ids:
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (64, 64), colour).save(folder / "images" / f"{image_id}.png")
        slots = " and ".join(f"IMAGE#{x}<Img><ImageHere></Img>" for x in ids)
        answer = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(2.5, 0.9)) + 2))
        records.append({"dialogue": [{"role": "user", "content": f"Describe {slots}.",
                                      "images": [{"image_id": x} for x in ids]},
                                     {"role": "assistant", "content": answer}]})
    (folder / "d.json").write_text(json.dumps(records))
    return folder / "d.json"


def data_path(config: TrainConfig, processor, *, workers: int, lengths: str, batches: int) -> Callable[[], tuple]:
    """One round: `batches` batches out of a fresh DataLoader, after its first (which pays for starting workers).

    `lengths` is how grouping learns lengths: "render" renders every sample in the main process (the old way),
    "estimate" uses `LengthEstimate` (built once, as `make_loader` does when the run starts).
    """
    sources = [read_source(s, seed=config.seed)[0] for s in config.data.sources]
    dataset = TrainDataset(sources, processor, max_len=config.data.max_len)
    key = dataset.length if lengths == "render" else LengthEstimate(sources, processor, max_len=config.data.max_len)

    def one_round() -> tuple[float, float]:
        sampler = BlendSampler([len(s) for s in sources], [1.0] * len(sources), batch_size=config.optim.batch_size,
                               seed=config.seed, lengths=key)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                             collate_fn=partial(collate, pad_id=0))
        it = iter(loader)
        next(it)
        samples, started = 0, time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            samples += batch.samples + len(batch.skipped)
        rate = samples / (time.perf_counter() - started)
        del it  # stops the workers before the next variant runs
        return rate, 0.0
    return one_round


def train_step(config: TrainConfig, steps: int) -> Callable[[], tuple]:
    """One round: `steps` optimizer steps of a model and loader built once (and warmed up by one step)."""
    dist = Dist()
    model, processor = build_model_for(config, dist)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim))
    batches = iter(make_loader(config, processor, dist, start=0))

    def step():
        batch = next(batches)
        loss = model(batch.input_ids, batch.pixel_values, batch.attention_mask, batch.labels, batch.position_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return batch

    step()  # the first step pays for lazy initialisation

    def one_round() -> tuple[float, float]:
        samples = tokens = 0
        started = time.perf_counter()
        for _ in range(steps):
            batch = step()
            samples, tokens = samples + batch.samples, tokens + batch.tokens
        seconds = time.perf_counter() - started
        return samples / seconds, tokens / seconds
    return one_round


def alternate(rounds: dict[str, Callable[[], tuple]], repeats: int) -> dict[str, tuple[float, float]]:
    """Run the variants in turn, ABCABC…, and keep each one's median round."""
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in rounds}
    for _ in range(repeats):
        for name, one_round in rounds.items():
            seen[name].append(one_round())
    return {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for name, runs in seen.items()}


def table(title: str, results: dict[str, tuple[float, float]], baseline: str, tokens: bool) -> None:
    ref = results[baseline]
    print(f"\n{title} (median of the rounds; × against {baseline})")
    head = "| variant | samples/s |" + (" tokens/s |" if tokens else "") + " × samples/s |"
    print(f"{head}\n|---|---|{'---|' * tokens}---|")
    for name, (s, t) in results.items():
        print(f"| {name} | {s:.1f} |" + (f" {t:.0f} |" if tokens else "") + f" {s / ref[0]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant (default 3)")
    parser.add_argument("--batches", type=int, default=20, help="data-path batches per round (default 20)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round (default 3)")
    parser.add_argument("--batch", type=int, default=16, help="samples per batch on the data path (default 16)")
    parser.add_argument("--train-batch", type=int, default=8, help="samples per training step (default 8)")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--source", choices=("files", "world"), default="files")
    parser.add_argument("--skip-train", action="store_true", help="measure the data path only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        sources = ((DataSource("world:caption"), DataSource("world:dialogue")) if args.source == "world"
                   else (DataSource(str(make_data(Path(tmp), args.samples))),))
        model = dataclasses.replace(TINY, language=LanguageConfig(kind="tiny", config={
            "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 8, "max_position_embeddings": 2048}), max_seq_len=1024)
        base = TrainConfig(model=model, data=DataConfig(sources=sources, max_len=768, group_by_length=False),
                           optim=OptimConfig(lr_connector=1e-3, lr_lm=1e-3, batch_size=args.batch))
        _, processor = build_model_for(base, Dist())
        loaders = {f"{workers} workers, lengths by {how}": data_path(base, processor, workers=workers, lengths=how,
                                                                     batches=args.batches)
                   for workers in (0, 1, 2) for how in ("render", "estimate")}
        table("Data path: samples/s out of the DataLoader, grouping by length", alternate(loaders, args.repeats),
              "0 workers, lengths by render", tokens=False)
        if args.skip_train:
            return
        base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, batch_size=args.train_batch))
        with_data = lambda **kw: dataclasses.replace(base, data=dataclasses.replace(base.data, **kw))
        steps = {"padding only": train_step(base, args.steps),
                 "length grouping": train_step(with_data(group_by_length=True), args.steps),
                 "packing": train_step(with_data(pack=True), args.steps)}
        table("Training step", alternate(steps, args.repeats), "padding only", tokens=True)


if __name__ == "__main__":
    main()

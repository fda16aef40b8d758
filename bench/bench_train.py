"""Training throughput: padding only vs length grouping vs packing, as ratios from one run in one process.

    python bench/bench_train.py [--steps 20] [--batch 16]

A small model (ViT 64 px, 4-layer width-256 LM, byte vocabulary) trains on synthetic dialogues whose answers vary
from a few words to a few sentences, as real instruction data does. Each variant gets the same number of steps
on the same data; samples/s and real (non-padding) tokens/s are reported, with ratios against padding only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from sparkles.config import TINY, DataConfig, DataSource, LanguageConfig, OptimConfig, TrainConfig
from sparkles.train.loop import build_model_for, make_loader, param_groups
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


def run(config: TrainConfig, steps: int) -> tuple[float, float]:
    dist = Dist()
    model, processor = build_model_for(config, dist)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim))
    batches = iter(make_loader(config, processor, dist, start=0))
    next(batches)  # warm-up: the first batch pays for lazy initialisation
    samples = tokens = 0
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        loss = model(batch.input_ids, batch.pixel_values, batch.attention_mask, batch.labels, batch.position_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        samples, tokens = samples + batch.samples, tokens + batch.tokens
    seconds = time.perf_counter() - started
    return samples / seconds, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_data(Path(tmp), args.samples)
        model = dataclasses.replace(TINY, language=LanguageConfig(kind="tiny", config={
            "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 8, "max_position_embeddings": 2048}), max_seq_len=1024)
        base = TrainConfig(model=model, data=DataConfig(sources=(DataSource(str(path)),), max_len=768,
                                                        group_by_length=False),
                           optim=OptimConfig(lr_connector=1e-3, lr_lm=1e-3, batch_size=args.batch))
        with_data = lambda **kw: dataclasses.replace(base, data=dataclasses.replace(base.data, **kw))
        variants = {"padding only": base, "length grouping": with_data(group_by_length=True),
                    "packing": with_data(pack=True)}
        results = {name: run(cfg, args.steps) for name, cfg in variants.items()}
    ref_samples, ref_tokens = results["padding only"]
    print("| variant | samples/s | tokens/s | × samples/s | × tokens/s |\n|---|---|---|---|---|")
    for name, (s, t) in results.items():
        print(f"| {name} | {s:.1f} | {t:.0f} | {s / ref_samples:.2f} | {t / ref_tokens:.2f} |")


if __name__ == "__main__":
    main()

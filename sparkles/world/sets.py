"""The shapes world's datasets on disk, in the original schemas (spec §7.1, §7.4-§7.6): `generate` writes
captions, SparklesDialogue, SparklesEval, BISON and NLVR2 sets with their truths; `sparkles world generate`.

Items come from `tasks.py`; item i of a set depends only on (seed, set, i), so a second run resumes.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from ..conversation import Conversation, Image, Message
from ..formats import to_sparkles_dialogue
from . import shapes
from .shapes import caption
from .tasks import MAKERS, Item, WorldConfig, _rng

__all__ = ["SETS", "generate", "make_record"]


SETS = {"captions": ("caption", "captions.json"),  # set -> (item kind, annotation file)
        "SparklesDialogue": ("dialogue", "SparklesDialogue/annotations/SparklesDialogueShapes.json"),
        "SparklesEval": ("dialogue", "SparklesEval/annotations/sparkles_evaluation_sparkleseval_annotations.json"),
        "BISON": ("bison", "BISON/annotations/sparkles_evaluation_bison_annotations.json"),
        "NLVR2": ("nlvr2", "NLVR2/annotations/sparkles_evaluation_nlvr2_annotations.json")}


def make_record(name: str, item: Item, i: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Item i of set `name` in its schema: (annotation record, {file path under the set's folder: PIL image})."""
    pixels = [image.pixels for image in item.conversation.images]
    if name == "captions":
        image_id = f"w{seed}-{i:06d}"
        file = f"images/{image_id}.png"
        return ({"image_id": image_id, "caption": caption(item.scenes[0]), "scene": shapes.describe(item.scenes[0]),
                 "file": file}, {file: pixels[0]})
    if name in ("SparklesDialogue", "SparklesEval"):
        # SparklesEval images are read as <image_id>.jpg (spec §7.4), so they are JPEGs; the training set's PNGs.
        ids = [f"w{seed}-{'d' if name == 'SparklesDialogue' else 'e'}{i:05d}{k}" for k in range(len(pixels))]
        named = Conversation(tuple(Message(m.role, tuple(replace(p, image_id=ids[int(p.label) - 1], pixels=None)
                                                         if isinstance(p, Image) else p for p in m.parts))
                                   for m in item.conversation))
        record = to_sparkles_dialogue(named, on_loss="ignore")  # pixels go to files, not the record
        ext = "jpg" if name == "SparklesEval" else "png"
        return (({"evaluation_id": i} if name == "SparklesEval" else {}) | record,
                {f"images/{x}.{ext}": p for x, p in zip(ids, pixels)})
    if name == "BISON":
        ids = [2 * i, 2 * i + 1]
        files = [f"w{seed}-b{x:06d}.png" for x in ids]
        return ({"evaluation_id": i, "caption": item.conversation.meta["caption"],
                 "true_image_id": ids[int(item.truths[0].images[0]) - 1],
                 "image_candidates": [{"image_id": x, "image_filename": f} for x, f in zip(ids, files)]},
                {f"images/{f}": p for f, p in zip(files, pixels)})
    identifier = f"w{seed}-{i}-0-0"  # the images drop its last 2 characters, as in NLVR2 (spec §7.6)
    return ({"evaluation_id": i, "identifier": identifier, "sentence": item.conversation.meta["sentence"],
             "label": str(item.truths[0].value)}, {f"images/{identifier[:-2]}-img{k}.png": p for k, p in
                                                   enumerate(pixels)})


def generate(out: str | os.PathLike, *, n: int = 100, seed: int = 0, image_size: int = 64,
             progress: bool = True) -> dict[str, int]:
    """Write every set under `out` (see the README); returns how many new images each set wrote.

    Item i of a set depends only on (seed, set, i), so a second run resumes: images already there are kept,
    annotations and truth.jsonl are rewritten whole. Each file appears complete or not at all.
    """
    from tqdm import tqdm

    root, config = Path(out), WorldConfig(image_size=image_size)
    written, truths = dict.fromkeys(SETS, 0), []
    with tqdm(total=n * len(SETS), desc="world", unit="item", disable=not progress) as bar:
        for name, (kind, annotations) in SETS.items():
            folder, records = root if name == "captions" else root / name, []
            for i in range(n):
                item = MAKERS[kind](_rng(seed, name, i), config, item_id=f"{name}-{i}")
                record, files = make_record(name, item, i, seed)
                records.append(record)
                truths += [{"set": name, "id": i, "turn": t + 1} | asdict(truth)
                           for t, truth in enumerate(item.truths) if name != "captions"]
                written[name] += sum(_save_image(folder / path, image) for path, image in files.items())
                bar.update()
            # One record per line: still one JSON list, and easy to read and diff.
            _write_atomic(root / annotations, ("[\n" + ",\n".join(map(json.dumps, records)) + "\n]\n").encode())
    _write_atomic(root / "truth.jsonl", "".join(json.dumps(t) + "\n" for t in truths).encode())
    return written


def _save_image(path: Path, image) -> bool:
    if path.exists():
        with PILImage.open(path) as old:  # an id holds the seed, not the size: a file of another size is redone
            if old.size == image.size:
                return False
    buffer = io.BytesIO()
    # SparklesEval's .jpg files are JPEGs at full chroma and high quality, so that colours stay true.
    image.save(buffer, **{"format": "JPEG", "quality": 95, "subsampling": 0} if path.suffix == ".jpg" else
               {"format": "PNG"})
    _write_atomic(path, buffer.getvalue())
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic on POSIX: a reader sees the old file or the new one, never half of one


# The command line


def add_cli(commands) -> None:
    world = commands.add_parser("world", help="the shapes world: datasets whose answers are known")
    sub = world.add_subparsers(title="world commands")
    gen = sub.add_parser("generate", help="write captions, SparklesDialogue, SparklesEval, BISON and NLVR2 sets")
    gen.add_argument("--out", required=True, help="folder to write; an existing one is resumed")
    gen.add_argument("--n", type=int, default=100, help="items per set (default 100)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--image-size", type=int, default=64, help="pixels per side (default 64)")
    gen.set_defaults(run=_run_generate)
    world.set_defaults(run=lambda args: world.print_help() or 2)


def _run_generate(args) -> int:
    written = generate(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    for name, images in written.items():
        print(f"{name}: {args.n} items, {images} new images -> {Path(args.out) / SETS[name][1]}")
    return 0

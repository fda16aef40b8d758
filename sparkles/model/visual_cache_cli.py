"""`sparkles visual-cache`: `build` a cache file from a folder of images with a model's tower, and `use` one, which
writes a copy of a checkpoint folder with the cache switched on in its config (`ModelConfig.visual_cache`). The
cache itself is `visual_cache.py`; this module is apart because it reads checkpoints, and checkpoints import the
model, which imports the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import VisualCacheConfig, to_dict
from ..errors import ConfigError
from .visual_cache import build_visual_cache, load_visual_cache, save_visual_cache


def add_cli(commands) -> None:
    parser = commands.add_parser("visual-cache", help="ImageBind-LLM's visual cache: build one from a folder of "
                                 "images, or switch it on in a copy of a checkpoint")
    sub = parser.add_subparsers(title="visual-cache commands")
    parser.set_defaults(run=lambda args: parser.print_help() or 2)
    build = sub.add_parser("build", help="encode every image under a folder with a model's vision tower")
    build.add_argument("--model", required=True, help="a checkpoint folder, or 'default'")
    build.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    build.add_argument("--out", required=True, help="the cache file to write, e.g. cache.pt")
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--skip-unreadable", action="store_true", help="leave unreadable images out, and list them")
    build.add_argument("--device", default="cpu")
    build.set_defaults(run=_run_build)
    use = sub.add_parser("use", help="copy a checkpoint folder with the cache switched on in its config")
    use.add_argument("--model", required=True, help="a checkpoint folder, or 'default'")
    use.add_argument("--cache", required=True, help="a file from `sparkles visual-cache build`")
    use.add_argument("--out", required=True, help="the new checkpoint folder")
    defaults = VisualCacheConfig()
    use.add_argument("--k", type=int, default=defaults.k, help="neighbours blended in")
    use.add_argument("--weight", type=float, default=defaults.weight, help="their share; 0 = off")
    use.add_argument("--temperature", type=float, default=defaults.temperature, help="on cosine similarities")
    use.set_defaults(run=_run_use)


def _run_build(args) -> int:
    from .checkpoint import load

    model, _ = load(args.model, device=args.device)
    skipped: list[str] = []
    data = build_visual_cache(model, args.images, batch_size=args.batch_size, skip_unreadable=args.skip_unreadable,
                              skipped=skipped)
    for line in skipped:
        print(f"skipped: {line}")
    path = save_visual_cache(data, args.out)
    shape = "×".join(map(str, data["values"].shape[1:]))
    print(f"wrote {path}: {len(data['sources'])} images, features {shape} each"
          + (f"; {len(skipped)} unreadable skipped" if skipped else ""))
    return 0


def _run_use(args) -> int:
    from .checkpoint import DEFAULT_CHECKPOINT, read_config

    source = DEFAULT_CHECKPOINT if args.model == "default" else Path(args.model)
    out, cache = Path(args.out), Path(args.cache).resolve()
    read_config(source)  # refuses a folder that is no checkpoint
    config = VisualCacheConfig(path=str(cache), k=args.k, weight=args.weight, temperature=args.temperature)
    load_visual_cache(config)  # refuses a file that is no cache, before anything is written
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new folder for the checkpoint with the cache")
    shutil.copytree(source, out)
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["visual_cache"] = to_dict(config)
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out}: {args.model} with the visual cache {cache} (k={args.k}, weight={args.weight}, "
          f"temperature={args.temperature}); chat with: sparkles chat --model {out} --image a.png \"…\"")
    return 0

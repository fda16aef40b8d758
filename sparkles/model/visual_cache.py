"""ImageBind-LLM's visual cache (spec/peers.md §3.3), training-free: at inference, an image's tower features are
blended with those of its k nearest images in a cache built from a folder of images.

What is blended: the tower's output, i.e. the connector's input, as ImageBind-LLM blends its encoder's embedding
before the bind network. The connector learnt on the tower's feature distribution, and the point of the cache is to
pull an unusual image back towards it; and one cache then serves every connector and LM trained on the same tower.
Retrieval is per image, as in ImageBind-LLM, whose features are one vector per image: the key is the image's mean
feature (unit length), the value its whole (P, C) feature map, so the blend is
f' = (1 - w)·f + w·Σᵢ softmax(t·sᵢ)·fᵢ over the k most cosine-similar cached images. Unlike ImageBind-LLM nothing is
renormalised: our features are not unit vectors, and the connector expects their scale.

Here: building the cache from a folder, saving and loading the cache file, and the blend; the switch is
`ModelConfig.visual_cache`, and `VisionLanguageModel.encode_images` applies it whenever the model is not training.
The `sparkles visual-cache` command is in `visual_cache_cli.py` (it reads checkpoints, which import the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import VisualCacheConfig
from ..errors import ConfigError, ImageLoadError, InputError
from ..image import load_image
from ..processor import image_to_tensor

FORMAT, VERSION = "sparkles-visual-cache", 1
SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
SAME_TOWER = 0.99  # cosine of the probe's features, built against used: lower means another tower (or weights)


def blend(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, k: int, weight: float,
          temperature: float) -> torch.Tensor:
    """(N, P, C) tower features blended with their k nearest cached images' (keys (M, C), values (M, P, C))."""
    if weight == 0:
        return features
    query = F.normalize(features.float().mean(1), dim=-1)  # (N, C)
    top, index = (query @ keys.T).topk(min(k, len(keys)), dim=-1)  # (N, k) cosine similarities and their images
    weights = torch.softmax(top * temperature, dim=-1)  # (N, k)
    neighbours = torch.einsum("nk,nkpc->npc", weights, values[index].float())  # (N, P, C)
    return ((1 - weight) * features.float() + weight * neighbours).to(features.dtype)


def probe_pixels(size: int) -> torch.Tensor:
    """(1, 3, S, S): a fixed pattern whose features tell one tower (and its weights) from another."""
    grid = torch.linspace(-1.5, 1.5, size)
    return torch.stack([grid[None].expand(size, size), grid[:, None].expand(size, size),
                        torch.sin(4 * grid)[None] * torch.cos(3 * grid)[:, None]])[None]


class VisualCache:
    """Cached features and the blend's settings; the model holds one as a plain attribute, not a module, so that the
    cache never enters a checkpoint's weights."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, sources: tuple[str, ...], probe: torch.Tensor,
                 image_size: int, k: int = 10, weight: float = 0.5, temperature: float = 20.0):
        if k < 1 or not 0 <= weight <= 1:
            raise ConfigError(f"visual_cache needs k >= 1 and 0 <= weight <= 1, got k={k}, weight={weight}")
        self.keys, self.values, self.sources, self.probe = keys, values, sources, probe
        self.image_size, self.k, self.weight, self.temperature = image_size, k, weight, temperature
        self.checked = False

    def __call__(self, features: torch.Tensor, tower) -> torch.Tensor:
        """Blend (N, P, C) features of `tower`; the first call checks that the cache was built with this tower."""
        if not self.checked:
            self.check(tower, features)
        if self.keys.device != features.device:
            self.keys, self.values = self.keys.to(features.device), self.values.to(features.device)
        return blend(features, self.keys, self.values, k=self.k, weight=self.weight, temperature=self.temperature)

    def check(self, tower, features: torch.Tensor) -> None:
        # Checked on first use, not when attached: a checkpoint's weights are loaded after the model is built.
        if features.shape[1:] != self.values.shape[1:]:
            raise ConfigError(f"the visual cache holds features of shape {list(self.values.shape[1:])}, this "
                              f"model's tower gives {list(features.shape[1:])}: build the cache with this model")
        param = next(tower.parameters())
        with torch.no_grad():
            now = tower(probe_pixels(self.image_size).to(param.device, param.dtype)).float().flatten().cpu()
        if F.cosine_similarity(now, self.probe.flatten(), dim=0) < SAME_TOWER:
            raise ConfigError("the visual cache was built with another vision tower (or other tower weights) than "
                              "this model's: build it again with this model (sparkles visual-cache build)")
        self.checked = True


def build_visual_cache(model, folder: str | Path, *, batch_size: int = 32, skip_unreadable: bool = False,
                       skipped: list[str] | None = None) -> dict:
    """The cache file's contents for the images under `folder` (recursively), encoded by `model`'s tower.

    An unreadable image stops the build with an error naming the file, unless `skip_unreadable`: then it is left out
    and its error appended to `skipped`, for the caller to report."""
    vision_config, tower = model.config.vision, model.vision
    param = next(tower.parameters())
    sources, values = [], []
    with torch.inference_mode():
        for names, pixels in _batches(Path(folder), batch_size, skip_unreadable, skipped):
            features = tower(torch.stack([image_to_tensor(p, vision_config) for p in pixels]).to(param.device,
                                                                                                param.dtype))
            values.append(features.float().cpu())  # (n, P, C)
            sources += names
        if not sources:
            raise InputError(f"no readable images ({', '.join(SUFFIXES)}) under {folder}")
        probe = tower(probe_pixels(vision_config.image_size).to(param.device, param.dtype)).float().cpu()
    values = torch.cat(values)  # (M, P, C)
    return {"format": FORMAT, "version": VERSION, "keys": F.normalize(values.mean(1), dim=-1), "values": values,
            "probe": probe, "image_size": vision_config.image_size, "sources": sources}


def _batches(folder: Path, size: int, skip_unreadable: bool, skipped: list[str] | None) -> Iterator[tuple[list, list]]:
    """(names, RGB images) in batches of `size`, read one batch at a time so a large folder never sits in memory."""
    if not folder.is_dir():
        raise InputError(f"no image folder at {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    names, pixels = [], []
    for path in files:
        try:
            pixels.append(load_image(path).pixels)
        except ImageLoadError as e:
            reason = str(e) if str(path) in str(e) else f"{path}: {e}"  # the loader's messages mostly name it
            if not skip_unreadable:
                raise ImageLoadError(f"cannot build the visual cache: {reason} (pass --skip-unreadable to leave "
                                     "it out)") from None
            if skipped is not None:
                skipped.append(reason)
            continue
        names.append(str(path.relative_to(folder)))
        if len(pixels) == size:
            yield names, pixels
            names, pixels = [], []
    if pixels:
        yield names, pixels


def save_visual_cache(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def load_visual_cache(config: VisualCacheConfig) -> VisualCache:
    """The cache file `config.path`, with the blend's settings from `config`."""
    try:
        data = torch.load(config.path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"visual_cache.path: no cache file at {config.path}") from None
    except Exception as e:  # unpickling fails in many types; all mean "not a cache file" to the user
        raise ConfigError(f"visual_cache.path: cannot read {config.path} as a visual cache ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"visual_cache.path: {config.path} is not a Sparkles visual cache")
    return VisualCache(data["keys"], data["values"], sources=tuple(data["sources"]), probe=data["probe"],
                       image_size=data["image_size"], k=config.k, weight=config.weight,
                       temperature=config.temperature)

"""Mixed visual embeddings (SPHINX §2.1): two or more towers read the same image, and their features are
concatenated along channels, token by token, before the connector.

`VisionConfig.extra` names the second tower (its own `extra` a third, and so on). Each tower keeps its own image
size and normalisation: the pixels the processor made for the first tower are un-normalised, re-normalised and
resized for the others, as SPHINX feeds DINOv2 ImageNet statistics from CLIP-normalised input. The towers must give
the same number of tokens per image, since token i of one is concatenated with token i of the other; the out_dim
is the sum of their widths.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..config import VisionConfig
from ..errors import ConfigError
from .vision import build_vision


class MixedTower(nn.Module):
    """`main` and `extra` side by side: (N, 3, H, W) -> (N, P, C_main + C_extra)."""

    def __init__(self, main: nn.Module, extra: nn.Module, *, main_config: VisionConfig, extra_config: VisionConfig):
        super().__init__()
        if main.num_tokens != extra.num_tokens:
            raise ConfigError(
                f"mixed towers must give the same number of tokens per image, as token i of one is joined with "
                f"token i of the other: vision ({main_config.kind}) gives {main.num_tokens}, vision.extra "
                f"({extra_config.kind}) gives {extra.num_tokens}; change an image_size, a patch size or drop_cls")
        self.main, self.extra = main, extra
        self.num_tokens, self.out_dim = main.num_tokens, main.out_dim + extra.out_dim
        self.hf_config = main.hf_config  # the extra tower's is recorded in `vision.extra.config` (`resolve`)
        self.size = extra_config.image_size if extra_config.image_size != main_config.image_size else None
        self.renormalise = (main_config.image_mean, main_config.image_std) != (extra_config.image_mean,
                                                                                extra_config.image_std)
        # Not weights: the statistics come from the config, so they stay out of the checkpoint.
        for name, values in (("mean_in", main_config.image_mean), ("std_in", main_config.image_std),
                             ("mean_out", extra_config.image_mean), ("std_out", extra_config.image_std)):
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.main(pixel_values), self.extra(self._for_extra(pixel_values))], dim=-1)

    def _for_extra(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = ((x * self.std_in + self.mean_in) - self.mean_out) / self.std_out
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return x


def build_towers(config: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """The tower a config names, or, with `extra`, the mixed towers; a lone tower is built exactly as before."""
    if config.extra is None:
        return build_vision(config, load_weights=load_weights, dtype=dtype)
    main_config = dataclasses.replace(config, extra=None)
    main = build_vision(main_config, load_weights=load_weights, dtype=dtype)
    extra = build_towers(config.extra, load_weights=load_weights, dtype=dtype)
    return MixedTower(main, extra, main_config=main_config, extra_config=config.extra)


def resolve(config: VisionConfig, tower: nn.Module) -> VisionConfig:
    """The config with each tower's HF config recorded, so that a full checkpoint rebuilds without their folders."""
    if isinstance(tower, MixedTower):
        return dataclasses.replace(config, config=tower.main.hf_config or config.config,
                                   extra=resolve(config.extra, tower.extra))
    return dataclasses.replace(config, config=tower.hf_config or config.config)


def towers(config: VisionConfig) -> list[VisionConfig]:
    """Each tower's own config, first to last (one for a lone tower)."""
    return [dataclasses.replace(config, extra=None)] + (towers(config.extra) if config.extra else [])

"""Connectors: what turns a tower's P tokens per image into the K tokens the LM sees, each a small module in one
dict keyed by the `vision.connector` config value.

Shape notation as in `model.py`: N images, P tower tokens, C tower width, K tokens per image in the LM, D LM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


class LinearConnector(nn.Module):
    """One projection per token: SparklesChat's `llama_proj` (768 -> 4096). Keeps P tokens."""

    def __init__(self, in_dim: int, out_dim: int, *, num_tokens: int, tokens_per_image: int):
        super().__init__()
        _check_same(num_tokens, tokens_per_image, "linear")
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPConnector(nn.Module):
    """LLaVA-1.5's two-layer GELU MLP. Keeps P tokens."""

    def __init__(self, in_dim: int, out_dim: int, *, num_tokens: int, tokens_per_image: int):
        super().__init__()
        _check_same(num_tokens, tokens_per_image, "mlp")
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Resampler(nn.Module):
    """K learned queries cross-attend to the P tower tokens (Flamingo/Qwen-VL style): any P becomes K tokens."""

    def __init__(self, in_dim: int, out_dim: int, *, num_tokens: int, tokens_per_image: int, heads: int = 4):
        super().__init__()
        if out_dim % heads:
            heads = 1
        self.queries = nn.Parameter(torch.randn(tokens_per_image, out_dim) * 0.02)
        self.position = nn.Parameter(torch.zeros(num_tokens, out_dim))
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm_q, self.norm_kv, self.norm_out = nn.LayerNorm(out_dim), nn.LayerNorm(out_dim), nn.LayerNorm(out_dim)
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(out_dim, 4 * out_dim), nn.GELU(), nn.Linear(4 * out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.proj(x) + self.position)  # (N, P, D)
        q = self.norm_q(self.queries).expand(x.shape[0], -1, -1)  # (N, K, D)
        h = q + self.attn(q, kv, kv, need_weights=False)[0]
        return self.norm_out(h + self.mlp(h))  # (N, K, D)


class ShuffleConnector(nn.Module):
    """2×2 pixel-shuffle, then LLaVA's MLP: each token carries four neighbouring patches whole, so P tokens become
    P/4 without the resampler's bottleneck, and what a patch holds reaches the LM intact."""

    def __init__(self, in_dim: int, out_dim: int, *, num_tokens: int, tokens_per_image: int):
        super().__init__()
        self.grid = math.isqrt(num_tokens)
        if self.grid * self.grid != num_tokens or self.grid % 2 or tokens_per_image != num_tokens // 4:
            raise ConfigError(f"the shuffle connector needs a square, even grid of tower tokens and "
                              f"tokens_per_image = {num_tokens // 4} (a quarter of {num_tokens}); got a "
                              f"{num_tokens}-token tower and tokens_per_image={tokens_per_image}")
        self.net = nn.Sequential(nn.Linear(4 * in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, c = x.shape
        g = self.grid
        x = x.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * c)
        return self.net(x)  # (N, P/4, D), in raster order of the 2×2 blocks


CONNECTORS = {"linear": LinearConnector, "mlp": MLPConnector, "resampler": Resampler, "shuffle": ShuffleConnector}


def _check_same(num_tokens: int, tokens_per_image: int, name: str) -> None:
    if num_tokens != tokens_per_image:
        raise ConfigError(f"the {name} connector keeps the tower's {num_tokens} tokens per image, but "
                          f"tokens_per_image is {tokens_per_image}: set tokens_per_image={num_tokens} or use "
                          "connector=resampler")

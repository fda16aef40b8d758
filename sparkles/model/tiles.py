"""SPHINX's sub-image tiles and SPHINX-X's skip tokens, on the model's side: encoding each image's views and reading
the LM's image positions from them. The geometry (which tiles hold only padding, the views' pixels, the ids of an
image slot) is the processor's; the switch is `ModelConfig.tiles`.

An image is V = 1 + rows·cols views: the global view, then the tiles row by row. Each view the tower encodes
becomes K image tokens; a tile that holds only padding is never encoded and becomes one skip token, whose vector
is a learned parameter of the connector (so it trains, saves and merges with the connector). Shape notation as in
`model.py`, with V views per image and S image positions (image and skip tokens) in a batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InputError


def add_skip_token(connector: nn.Module, config: ModelConfig, width: int) -> None:
    """Give the connector the learned skip vector when the config skips empty tiles (SPHINX-X does not say how it
    starts; small random, as the resampler's queries)."""
    rows, cols = config.tiles.grid
    if not (rows and cols and config.tiles.skip_empty):
        return
    if config.tokens_per_image < 2:
        # A skip token saves K - 1 positions; with K = 1 there is nothing to save, and `merge_views` reads a
        # skipped view's second row to tell it from an encoded one.
        raise ConfigError("tiles.skip_empty needs tokens_per_image >= 2 (a skip token saves K - 1 positions); "
                          "set tiles.skip_empty=false")
    connector.register_parameter("skip_token", nn.Parameter(torch.randn(width) * 0.02))


def encode_views(encode: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor,
                 skip_token: torch.Tensor | None) -> torch.Tensor:
    """(N, V, 3, H, W) -> (N, V·K, D): `encode` runs on every view that is not all NaN (a skipped tile) at once.

    A skipped view's K rows hold the skip vector in row 0 and NaN in the rest, rows no consistent rendering reads:
    a rendering that puts K image tokens where the tile was skipped reads NaN, and `merge_views` says so.
    """
    n, v = pixel_values.shape[:2]
    views = pixel_values.flatten(0, 1)  # (N·V, 3, H, W)
    empty = views.flatten(1).isnan().all(1)  # (N·V,)
    assert not empty.view(n, v)[:, 0].any(), "a global view is empty: pixel values not made by the processor"
    if empty.any() and skip_token is None:
        raise InputError("the pixel values skip empty tiles, but this model has no skip token "
                         "(tiles.skip_empty is off): the processor and the model disagree")
    features = encode(views[~empty])  # (M, K, D): the tower never sees an empty tile
    table = features.new_full((n * v, *features.shape[1:]), float("nan"))  # (N·V, K, D)
    table[~empty] = features
    if skip_token is not None:
        table[empty, 0] = skip_token.to(table.dtype)
    return table.view(n, v * features.shape[1], features.shape[2])


def merge_views(text: torch.Tensor, is_image: torch.Tensor, skips: torch.Tensor, image_embeds: torch.Tensor | None,
                *, views: int, k: int) -> torch.Tensor:
    """Text embeddings (B, T, D) with the views' rows written over the image positions (`is_image`, (B, T); `skips`,
    (S,), marks the skip tokens among them in order), or an InputError when tokens and images disagree."""
    n = 0 if image_embeds is None else image_embeds.shape[0]
    view, row = view_rows(skips, k)
    found = int(view[-1]) + 1 if len(view) else 0
    # Each view is K image tokens or one skip token; a rendering cut inside an image leaves a shorter one.
    sizes = torch.bincount(view, minlength=found) if len(view) else view
    first = torch.zeros(found, dtype=torch.bool, device=skips.device).index_put_((view,), skips)
    whole = bool((sizes == torch.where(first, 1, k)).all())
    if found != n * views or not whole:
        raise InputError(f"image tokens: {len(skips)} ({found} views{'' if whole else ', some cut short'}), image "
                         f"features: {n} images × {views} views (global + tiles; {k} tokens a view, 1 a skipped tile)")
    if not n:
        return text
    table = image_embeds.reshape(n * views, k, -1)  # (N·V, K, D)
    picked = table[view, row]  # (S, D)
    # A skipped view has NaN in rows 1..K-1 (see `encode_views`): a skip token must point at one, an image token
    # never may. Either failure means the rendering did not know which tiles were empty.
    if bool(picked.isnan().any()) or not bool(table[view[skips], 1].isnan().all()):
        raise InputError("the image tokens do not match the images' tiles: a tile the pixels skip has image tokens, "
                         "or one they encode has a skip token (was the conversation rendered without its images?)")
    return text.masked_scatter(is_image[..., None], picked.to(text.dtype))


def view_rows(skips: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image position in order (True = a skip token): its view, counted over the batch, and its row in the
    view. Image tokens come in whole views of K; a skip token is a view of its own."""
    i = torch.arange(len(skips), device=skips.device)
    # The first position of the run of image tokens each position sits in; runs are split only by skip tokens,
    # since every view before them is whole.
    run_start = torch.cummax(torch.where(skips, i + 1, 0), 0).values if len(skips) else i
    offset = i - run_start
    starts = skips | (offset % k == 0)
    return torch.cumsum(starts, 0) - 1, torch.where(skips, 0, offset % k)

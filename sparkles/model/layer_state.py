"""What the switches that read images inside the LM's layers share: `model.adapter` (`adapters.py`) and
`model.cross_attention` (`cross_attention.py`).

Under either, an image is one marker position in the text, and its connector tokens reach the LM not as input
positions but through a per-position state that the LM's forward takes as a keyword and its hooked layers read.
Generation, sessions and batches handle that state through `LayerState` alone, so neither switch needs its own
decoding path; a reader bank (the `Reader` in the connector) makes the markers and the state.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..errors import ConfigError, InputError


class LayerState(Protocol):
    """Per-position state of the positions an LM call feeds (B rows, Q positions)."""

    keyword: str  # the LM forward's keyword that carries it to the layers

    def tail(self, n: int) -> LayerState:
        """The last n positions: what a cached call over them reads."""

    def grow(self) -> LayerState:
        """One more position, reading what the last one reads: a generated token is text, after every image."""

    @staticmethod
    def left_padded(states: list, width: int) -> LayerState:
        """One-row states stacked into a batch, left-padded to `width` with positions that read no image."""


class Reader(Protocol):
    """The bank of parameters a switch keeps in the connector: its marker vector and the state it builds."""

    def embed(self, text: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) text embeddings with a marker at each image's one position."""

    def signal(self, is_image: torch.Tensor, image_embeds: torch.Tensor | None,
               starts: torch.Tensor | None = None) -> LayerState:
        """The state of every (B, T) position; `starts` marks where each sample of a packed row begins."""


def state_kwargs(state: LayerState | None) -> dict:
    """The LM forward's extra keyword for a state: none without one."""
    return {} if state is None else {state.keyword: state}


def write_markers(text: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor | None,
                  marker: torch.Tensor) -> torch.Tensor:
    """(B, T, D) text embeddings with `marker` written at each image's one position."""
    slots, have = int(is_image.sum()), 0 if image_embeds is None else image_embeds.shape[0]
    if slots != have:
        raise InputError(f"image markers: {slots} (each image is one position in the text), images: {have}")
    return torch.where(is_image[..., None], marker.to(text.dtype), text)


def images_so_far(is_image: torch.Tensor, starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) images of the row at or before t, and (B, T) images of the row before t's sample began (0 but in
    packed rows, where no sample reads an image of the one before)."""
    count = is_image.long().cumsum(-1)
    if starts is None:
        return count, torch.zeros_like(count)
    return count, torch.where(starts, count - is_image.long(), 0).cummax(-1).values


def decoder_layers(lm: nn.Module, switch: str) -> nn.ModuleList:
    """The LM's decoder layers, where a switch hooks in."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{switch}: cannot find the decoder layers of {type(lm).__name__} (expected .model.layers)")
    return layers

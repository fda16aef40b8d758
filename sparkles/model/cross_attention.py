"""Flamingo's gated cross-attention as MultiModal-GPT uses it on OpenFlamingo (spec/peers.md §4.1–4.3), switched by
`ModelConfig.cross_attention`: images reach the LM through blocks between its layers instead of as K tokens in
its input.

An image costs one position, whose input is a learned marker vector; its K connector tokens are the "media" the
blocks attend to. A GATED XATTN-DENSE block runs before every `every`-th decoder layer (Flamingo's
cross_attn_every_n_layers, counted as OpenFlamingo does: layers k-1, 2k-1, …):

    x ← x + tanh(α) · XAttn(LN(x), media)        x ← x + tanh(β) · FFW(LN(x))

with α = β = 0 at first, so a new model computes exactly what its LM did. Text position t attends to the media of
the images whose marker is at or before t: the most recent one (`sees="previous"`, Flamingo's
only_attend_immediate_media) or all of them (`sees="all"`). A position that has no image to see gets nothing from
the block, the feed-forward included: text before the first image, and a text-only conversation, run the LM
unchanged, as OpenFlamingo bypasses its blocks for language-only data, wherever in a row the first image falls.

Either way the blocks are causal: a position's state depends on nothing after it, so a cached turn's keys never
change when a later turn adds an image. The state (`Media`: the row's media and which images each position sees)
is a `layer_state.LayerState` and travels to the blocks as a keyword of the LM's forward, so generation carries it
over the KV cache to every generated token. MultiModal-GPT's own generation does not (§4.3): its generated tokens
recompute their media from themselves alone and see no image.

The parameters (marker, blocks) live in `connector.cross`: they train, save and load with the connector
(`trainable` holds "connector"; `optim.lr_connector`) while the LM stays frozen. The blocks' linear layers are
named to_q, to_kv, to_out, ff_in and ff_out, so `model.lora.targets` can reach them as MultiModal-GPT's LoRA does
(`model._with_lora`). Shape notation as in `model.py`; Q query positions, M images of a row, H heads, d head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .layer_state import decoder_layers, images_so_far, write_markers

CROSS = "sparkles_cross"  # LM forward keyword: a `Media` covering the positions fed in that call


@dataclass(frozen=True)
class Media:
    """Each row's media (B, M, K, D), and per position (B, Q) the images it sees: numbers lo ≤ j < hi of its row."""

    media: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    bank: CrossAttention
    keyword: ClassVar[str] = CROSS

    def visible(self) -> torch.Tensor:
        """(B, Q, M) bool: which of its row's images each position sees."""
        image = torch.arange(self.media.shape[1], device=self.lo.device)
        return (image >= self.lo[..., None]) & (image < self.hi[..., None])

    def tail(self, n: int) -> Media:
        """The last n positions; they may see any image of the row, so the media stay whole."""
        return Media(self.media, self.lo[:, -n:], self.hi[:, -n:], self.bank)

    def grow(self) -> Media:
        return Media(self.media, torch.cat([self.lo, self.lo[:, -1:]], 1), torch.cat([self.hi, self.hi[:, -1:]], 1),
                     self.bank)

    @staticmethod
    def left_padded(states: list[Media], width: int) -> Media:
        """Rows stacked, their media padded to the most images of a row; a padding position sees no image."""
        most = max(s.media.shape[1] for s in states)
        media = torch.cat([F.pad(s.media, (0, 0, 0, 0, 0, most - s.media.shape[1])) for s in states])

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.new_zeros(1, width - x.shape[1]), x], 1)

        return Media(media, torch.cat([pad(s.lo) for s in states]), torch.cat([pad(s.hi) for s in states]),
                     states[0].bank)


class GatedCrossAttention(nn.Module):
    """One GATED XATTN-DENSE block (OpenFlamingo's GatedCrossAttentionBlock, without bias as there)."""

    def __init__(self, width: int, *, heads: int, head_dim: int, ff_mult: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm, self.ff_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)
        self.ff_in = nn.Linear(width, ff_mult * width, bias=False)
        self.ff_out = nn.Linear(ff_mult * width, width, bias=False)
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, state: Media) -> torch.Tensor:
        """hidden (B, Q, D) -> (B, Q, D), exactly `hidden` where a position sees no image."""
        sees = (state.hi > state.lo).to(hidden.device)  # (B, Q)
        if not bool(sees.any()):  # text only: nothing to add, and no media to attend to
            return hidden
        dtype = self.norm.weight.dtype  # the blocks' own: LoRA may wrap the linear layers, never the norms
        x = hidden.to(dtype)
        (b, q, _), (_, m, k, _) = x.shape, state.media.shape
        queries = self.to_q(self.norm(x)).view(b, q, self.heads, -1).transpose(1, 2)  # (B, H, Q, d)
        keys, values = (t.view(b, m * k, self.heads, -1).transpose(1, 2)  # (B, H, M·K, d)
                        for t in self.to_kv(state.media.flatten(1, 2).to(dtype)).chunk(2, -1))
        allowed = state.visible().repeat_interleave(k, -1).to(x.device)  # (B, Q, M·K): an image's K tokens alike
        # A position that sees nothing would give SDPA a row without keys (NaN): it attends to all, and its output
        # is zeroed below, explicitly.
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=(allowed | ~sees[..., None])[:, None])
        attended = self.to_out(out.transpose(1, 2).reshape(b, q, -1))
        x = x + torch.tanh(self.attn_gate) * torch.where(sees[..., None], attended, 0)
        fed = self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))
        x = x + torch.tanh(self.ff_gate) * torch.where(sees[..., None], fed, 0)
        return x.to(hidden.dtype)


class CrossAttention(nn.Module):
    """The marker vector and one gated block per chosen LM layer; a `layer_state.Reader`."""

    def __init__(self, width: int, layers: tuple[int, ...], *, sees: str, tokens: int, heads: int, head_dim: int,
                 ff_mult: int):
        super().__init__()
        self.layers, self.sees, self.tokens = layers, sees, tokens
        self.index = {layer: i for i, layer in enumerate(layers)}  # LM layer -> its block
        # Small random, as the adapters' marker: a vector that differs from any text embedding.
        self.marker = nn.Parameter(torch.randn(width) * 0.02)
        self.blocks = nn.ModuleList(GatedCrossAttention(width, heads=heads, head_dim=head_dim, ff_mult=ff_mult)
                                    for _ in layers)

    def embed(self, text: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        return write_markers(text, is_image, image_embeds, self.marker)

    def signal(self, is_image: torch.Tensor, image_embeds: torch.Tensor | None,
               starts: torch.Tensor | None = None) -> Media:
        """Each row's media and what every position sees. is_image (B, T) bool; image_embeds (N, K, D), the
        images in order of appearance, row after row; `starts` (B, T) bool marks where each sample of a packed row
        begins: no sample sees an image of the one before."""
        count, seen = images_so_far(is_image, starts)  # (B, T) each
        lo = seen if self.sees == "all" else torch.where(count > seen, count - 1, count)
        per_row = is_image.sum(-1)  # (B,)
        rows = is_image.shape[0]
        most = int(per_row.max()) if rows else 0
        if image_embeds is None:
            media = self.marker.new_zeros(rows, most, self.tokens, self.marker.shape[0])
        else:
            media = image_embeds.new_zeros(rows, most, *image_embeds.shape[1:])
            row = torch.repeat_interleave(torch.arange(rows, device=per_row.device), per_row)  # (N,)
            slot = torch.arange(len(row), device=row.device) - (per_row.cumsum(0) - per_row)[row]
            media[row.to(media.device), slot.to(media.device)] = image_embeds
        return Media(media, lo, count, self)


def _cross_hook(layer: int, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a decoder layer with a block before it: the block runs on the layer's input."""
    state = kwargs.get(CROSS)
    if state is None:
        raise ValueError(f"this LM has cross-attention (model.cross_attention): pass {CROSS}=Media to its forward "
                         "(VisionLanguageModel.forward, generate.generate and ChatSession do)")
    block = state.bank.blocks[state.bank.index[layer]]
    if args:
        return (block(args[0], state), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"], state)}


def add_cross_attention(lm: nn.Module, connector: nn.Module, config: ModelConfig, width: int) -> nn.Module | None:
    """Give the connector the blocks and the chosen LM layers the hooks that run them; the blocks, or None."""
    cross = config.cross_attention
    if not cross.every:
        return None
    layers = decoder_layers(lm, "cross_attention")
    if not 0 < cross.every <= len(layers) or min(cross.heads, cross.head_dim, cross.ff_mult) < 1:
        raise ConfigError(f"cross_attention.every must be 0 (off) or 1..{len(layers)} (the LM's layers), and heads, "
                          f"head_dim and ff_mult >= 1; got {cross}")
    chosen = tuple(i for i in range(len(layers)) if (i + 1) % cross.every == 0)
    connector.cross = CrossAttention(width, chosen, sees=cross.sees, tokens=config.tokens_per_image,
                                     heads=cross.heads, head_dim=cross.head_dim, ff_mult=cross.ff_mult)
    for index in chosen:
        layers[index].register_forward_pre_hook(partial(_cross_hook, index), with_kwargs=True)
    return connector.cross

"""LLaMA-Adapter's and ImageBind-LLM's zero-init gated adapters (spec/peers.md §3.1–3.3, §7.3), switched by
`ModelConfig.adapter`: images reach the LM through its layers instead of through K tokens in its input.

An image costs one position, whose input is a learned marker vector. Every position t gets a visual signal s_t:
the connector's K tokens of the most recent image whose marker is at or before t, averaged to one vector, or zero
before the first image. Peers take one image per request; "most recent" is our multi-image choice because it keeps
the model causal: a position's signal depends on nothing after it, so a cached turn's keys never change when a
later turn adds an image, and sessions reuse their cache as they do without adapters. The signal is projected once
(u_t = W s_t, W shared by every adapted layer) and travels to the layers as a keyword of the LM's forward
(`ADAPTER`), as MMCA's image mask does; generation carries a row's last u to the tokens it generates.

- imagebind (ImageBind-LLM's attention-free injection): an adapted layer's input hidden states get tanh(g_l) ⊙ u_t
  added, g_l a zero-initialised per-channel gate (a forward pre-hook on the decoder layer). Text before any image
  is never touched, gates or not.
- llama-adapter (LLaMA-Adapter V1's gated prefix attention, with its multimodal form's global image feature added
  to every adaption prompt): the layer's queries, after RoPE, also attend to prompt_len learned prompt tokens
  P_l + u_t, keyed and valued by the layer's own k_proj and v_proj without RoPE, in a separate softmax whose output
  is scaled by tanh(g_l) per head (g_l = 0 at first) and added to the layer's attention output before o_proj. The
  layer's attention function is wrapped (an AttentionInterface entry that calls the LM's own), so it gets exactly
  the queries the layer computes, for any HF LM with k_proj and v_proj.

The parameters (marker, W, gates, prompts) live in `connector.adapter`: they train, save and load with the
connector (`trainable` holds "connector"; `optim.lr_connector`), as LLaMA-Adapter trains its prompts and gates
together with its visual projection while the LM stays frozen. Shape notation as in `model.py`; Q query positions,
H heads, d head width, P prompt tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .layer_state import decoder_layers, images_so_far, state_kwargs, write_markers

ADAPTER = "sparkles_adapter"  # LM forward keyword: a `Signal` covering the positions fed in that call
KINDS = ("llama-adapter", "imagebind")


@dataclass(frozen=True)
class Signal:
    """The projected visual signal u (B, Q, D) of the positions an LM call feeds, and the adapters that read it:
    a `layer_state.LayerState`."""

    u: torch.Tensor
    bank: Adapters
    keyword: ClassVar[str] = ADAPTER

    def tail(self, n: int) -> Signal:
        """The last n positions: what a cached call over them reads."""
        return Signal(self.u[:, -n:], self.bank)

    def grow(self) -> Signal:
        """One more position reading the last one's image: a generated token is text, and no image comes after."""
        return Signal(torch.cat([self.u, self.u[:, -1:]], dim=1), self.bank)

    @staticmethod
    def left_padded(signals: list[Signal], width: int) -> Signal:
        """One-row signals stacked into a batch, left-padded with zeros (padding reads no image)."""
        rows = [torch.cat([s.u.new_zeros(1, width - s.u.shape[1], s.u.shape[2]), s.u], dim=1) for s in signals]
        return Signal(torch.cat(rows), signals[0].bank)


adapter_kwargs = state_kwargs  # the LM forward's extra keyword for adapters: none without them


class Adapters(nn.Module):
    """The marker vector, the shared projection W and each adapted layer's gate (and, for llama-adapter, prompts)."""

    def __init__(self, kind: str, width: int, layers: tuple[int, ...], *, heads: int, prompt_len: int):
        super().__init__()
        self.kind, self.layers = kind, layers
        self.index = {layer: i for i, layer in enumerate(layers)}  # LM layer -> row of the gates (and prompts)
        # Small random, as the resampler's queries and the skip token: a marker that differs from any text vector.
        self.marker = nn.Parameter(torch.randn(width) * 0.02)
        # No bias: zero signal (before any image) projects to zero, so text before an image reads nothing.
        self.proj = nn.Linear(width, width, bias=False)
        if kind == "imagebind":
            self.gate = nn.Parameter(torch.zeros(len(layers), width))  # per channel
        else:
            self.gate = nn.Parameter(torch.zeros(len(layers), heads))  # per head, as LLaMA-Adapter's g_l
            # LLaMA-Adapter's prompts are an nn.Embedding (unit normal); ours start small like the marker, since
            # frozen k_proj of unit-scale prompts would give scores far from the LM's own.
            self.prompt = nn.Parameter(torch.randn(len(layers), prompt_len, width) * 0.02)

    def embed(self, text: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) text embeddings with the marker written at each image's one position."""
        return write_markers(text, is_image, image_embeds, self.marker)

    def signal(self, is_image: torch.Tensor, image_embeds: torch.Tensor | None,
               starts: torch.Tensor | None = None) -> Signal:
        """Per position the projected mean of the most recent image at or before it; zero before the first.

        is_image (B, T) bool; image_embeds (N, K, D), the images in order of appearance, row after row; `starts`
        (B, T) bool marks where each sample of a packed row begins: no sample reads an image of the one before."""
        weight = self.proj.weight
        pooled = weight.new_zeros(1, weight.shape[1])  # row 0: no image yet
        if image_embeds is not None:
            pooled = torch.cat([pooled, image_embeds.mean(1).to(weight.dtype)])  # (1 + N, D)
        count, seen = images_so_far(is_image, starts)  # (B, T) each
        before = is_image.sum(-1).cumsum(0) - is_image.sum(-1)  # (B,) images in earlier rows
        index = torch.where(count > seen, before[:, None] + count, 0)  # (B, T) row of `pooled`
        return Signal(self.proj(pooled)[index.to(pooled.device)], self)  # projected once, for every layer

    def inject(self, layer: int, hidden: torch.Tensor, signal: Signal) -> torch.Tensor:
        """imagebind: hidden (B, Q, D) + tanh(g_l) ⊙ u."""
        return hidden + (torch.tanh(self.gate[self.index[layer]]) * signal.u).to(hidden.dtype)

    def prompt_attention(self, module: nn.Module, query: torch.Tensor, signal: Signal, scaling: float) -> torch.Tensor:
        """llama-adapter: the gated prompt branch of one layer, (B, Q, H, d), the layout attention functions return.

        The prompts of query t are P_l + u_t: the same vector u_t moves every prompt key by k_proj(u_t) - k_proj(0)
        (k_proj is affine), which adds q·that to each of the query's scores alike and leaves its softmax unchanged;
        the values move by v_proj(u_t) - v_proj(0), which the softmax's weights (summing to 1) pass on whole. So
        the branch is softmax(q K_pᵀ) V_p over the bare prompts plus that value shift: exact, and no (Q, P) keys.
        """
        i, (b, h, q, d) = self.index[module.layer_idx], query.shape
        prompt = self.prompt[i].to(query.dtype)  # (P, D)
        keys, values = (proj(prompt).view(prompt.shape[0], -1, d).transpose(0, 1)  # (Hkv, P, d)
                        for proj in (module.k_proj, module.v_proj))
        groups = h // keys.shape[0]  # grouped-query attention: each key head serves `groups` query heads
        keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)  # (H, P, d)
        weights = (query @ keys.transpose(-1, -2) * scaling).softmax(-1)  # (B, H, Q, P)
        u = signal.u.to(query.dtype)
        shift = module.v_proj(u) - module.v_proj(u.new_zeros(1, u.shape[-1]))  # (B, Q, Hkv·d)
        shift = shift.view(b, q, -1, d).repeat_interleave(groups, 2)  # (B, Q, H, d)
        out = (weights @ values).transpose(1, 2) + shift  # (B, Q, H, d)
        return out * torch.tanh(self.gate[i]).to(out.dtype)[:, None]


def _signal(kwargs: dict) -> Signal:
    signal = kwargs.get(ADAPTER)
    if signal is None:
        raise ValueError(f"this LM has adapters (model.adapter): pass {ADAPTER}=Signal to its forward "
                         "(VisionLanguageModel.forward, generate.generate and ChatSession do)")
    return signal


def _inject_hook(layer: int, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an adapted decoder layer (imagebind): its input hidden states get the gated signal."""
    signal = _signal(kwargs)
    if args:
        return (signal.bank.inject(layer, args[0], signal), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": signal.bank.inject(layer, kwargs["hidden_states"], signal)}


def adapter_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *, base: str, **kwargs):
    """The LM's own attention function (`base`), plus the gated prompt branch on adapted layers (llama-adapter)."""
    signal = _signal(kwargs)
    del kwargs[ADAPTER]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # Eager attention is each model file's own function, not a registered one.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    out, weights = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)(module, query, key, value, attention_mask,
                                                                      **kwargs)
    if module.layer_idx not in signal.bank.index:
        return out, weights
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    return out + signal.bank.prompt_attention(module, query, signal, scaling).to(out.dtype), weights


def add_adapters(lm: nn.Module, connector: nn.Module, config: ModelConfig, width: int) -> None:
    """Give the connector the adapters and the LM's top layers the hooks (or attention) that read them."""
    adapter = config.adapter
    if adapter.kind == "none":
        return
    if adapter.kind not in KINDS:
        raise ConfigError(f"unknown adapter.kind {adapter.kind!r}; expected one of {['none', *KINDS]}")
    layers = decoder_layers(lm, "adapters")
    top = adapter.layers or len(layers)
    if not 0 < top <= len(layers) or adapter.prompt_len < 1:
        raise ConfigError(f"adapter.layers must be 0 (all) or 1..{len(layers)} and adapter.prompt_len >= 1, got "
                          f"{adapter.layers} and {adapter.prompt_len}")
    chosen = tuple(range(len(layers) - top, len(layers)))
    heads = lm.config.get_text_config().num_attention_heads
    connector.adapter = Adapters(adapter.kind, width, chosen, heads=heads, prompt_len=adapter.prompt_len)
    if adapter.kind == "imagebind":
        for index in chosen:
            layers[index].register_forward_pre_hook(partial(_inject_hook, index), with_kwargs=True)
        return
    for index in chosen:
        attention = getattr(layers[index], "self_attn", None)
        if not all(hasattr(attention, a) for a in ("k_proj", "v_proj", "layer_idx")):
            raise ConfigError(f"adapter.kind=llama-adapter needs attention layers with k_proj and v_proj; "
                              f"{type(lm).__name__} layer {index} has {type(attention).__name__}")
    _use_adapter_attention(lm)


def _use_adapter_attention(lm: nn.Module) -> None:
    """Register `adapter_attention` around the LM's current attention (sdpa, eager, flash, MMCA) and switch to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    # A rebuilt LM whose recorded config already names our wrapper wraps the function beneath it, not itself.
    base = (lm.config._attn_implementation or "eager").removeprefix("sparkles_adapter_")
    if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ConfigError(f"adapter.kind=llama-adapter cannot wrap attention {base!r}: it has no mask function")
    name = f"sparkles_adapter_{base}"
    AttentionInterface.register(name, partial(adapter_attention, base=base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])  # the LM's own masks, unchanged
    lm.config._attn_implementation = name

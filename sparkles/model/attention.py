"""Attention variants of the LM, switched by `ModelConfig.attention`: DeepSpeed-VisualChat's multi-modal causal
attention (MMCA, spec/peers.md §1.3, §7.2), as functions registered with transformers' AttentionInterface.

The LM keeps its layers and weights; only the function its attention layers call changes. Which positions hold
image tokens reaches that function as a keyword of the LM's forward (`IMAGE_MASK`), which transformers passes down
to the attention function; callers that decode on a KV cache carry it for the cached positions too (generate.py,
prefix.py). Not here: which positions are real and causal, which transformers' own mask says, as for any LM.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

IMAGE_MASK = "mmca_image_mask"  # LM forward keyword: (B, L) bool, True where key position j holds an image token
# ModelConfig.attention -> the registered implementation; "causal" leaves the LM's own (sdpa, flash, ...) alone.
IMPLEMENTATIONS = {"mmca": "sparkles_mmca", "mmca-image-sees-text": "sparkles_mmca_image_sees_text"}


def mmca_masks(allowed: torch.Tensor, key_is_image: torch.Tensor, *,
               image_sees_text: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the pairs a query may attend to, (B, 1, Q, L) bool, into MMCA's text branch and image branch.

    The Q queries are the last Q of the L key positions (a prefill, or new positions on a KV cache). Text rows get
    earlier text in one branch and earlier image tokens in the other; image rows get image tokens, and earlier text
    only with `image_sees_text` (DeepSpeed-VisualChat's code; its blog says image tokens see images only).
    """
    keys = key_is_image[:, None, None, :]  # (B, 1, 1, L)
    queries = key_is_image[:, None, -allowed.shape[-2]:, None]  # (B, 1, Q, 1)
    text = allowed & ~keys
    if not image_sees_text:
        text = text & ~queries
    return text, allowed & keys


def mmca_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, scaling: float | None = None, dropout: float = 0.0,
                   image_sees_text: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """Two masked softmaxes, over text keys and over image keys, whose outputs are added (row mass 2, as in DSVC).

    query (B, H, Q, d), key and value (B, Hkv, L, d) -> (B, Q, H, d), the layout transformers' sdpa returns.
    """
    is_image = kwargs.get(IMAGE_MASK)
    if is_image is None:
        raise ValueError(f"MMCA attention needs the image positions: pass {IMAGE_MASK}=(B, L) bool to the LM's "
                         "forward (VisionLanguageModel.forward and generate.generate do)")
    # Logit soft-capping (Gemma 2) and attention sinks (gpt-oss) change each softmax; SDPA has neither, and quietly
    # dropping them would run another model than the one trained.
    unsupported = sorted(k for k in ("softcap", "s_aux") if kwargs.get(k) is not None)
    if unsupported:
        raise ValueError(f"MMCA attention cannot apply this LM's {', '.join(unsupported)}; use attention=causal")
    q_len, k_len = query.shape[-2], key.shape[-2]
    if is_image.shape[-1] != k_len:
        raise ValueError(f"{IMAGE_MASK} covers {is_image.shape[-1]} positions, the keys are {k_len} (a cache whose "
                         "image positions were not carried along?)")
    if attention_mask is None:  # no padding: plain causal, queries at the end of the keys
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :k_len]
    else:  # an additive mask: 0 where allowed
        allowed = attention_mask[..., :k_len] == 0
    text, image = mmca_masks(allowed, is_image.to(query.device, torch.bool), image_sees_text=image_sees_text)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key head serves `groups` query heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.zeros_like(query)
    for branch in (text, image):
        some = branch.any(dim=-1, keepdim=True)  # (B, 1, Q, 1)
        # A row with nothing to attend to in a branch (a text row before any image) contributes zero. Letting it
        # attend everywhere and zeroing it afterwards keeps the softmax finite and its gradient clean; DSVC's
        # finfo.min mask instead spreads such a row evenly over the masked keys.
        part = F.scaled_dot_product_attention(query, key, value, attn_mask=branch | ~some, scale=scaling,
                                              dropout_p=dropout if module.training else 0.0)
        out = out + part.masked_fill(~some, 0.0)
    return out.transpose(1, 2).contiguous(), None


def _materialised_mask(*args, **kwargs):
    """transformers' boolean sdpa mask, always built: its shortcut of no mask for plain causal rows would hide the
    causal offset of the queries from `mmca_attention` (it handles None too, but a real mask also carries padding)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for attention, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, partial(mmca_attention, image_sees_text=attention == "mmca-image-sees-text"))
        AttentionMaskInterface.register(name, _materialised_mask)


def use_attention(lm, attention: str) -> None:
    """Switch a built HF LM to `attention` ("causal" keeps what it has)."""
    from ..errors import ConfigError

    if attention == "causal":
        return
    if attention not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention {attention!r}; expected one of {['causal', *IMPLEMENTATIONS]}")
    _register()
    lm.config._attn_implementation = IMPLEMENTATIONS[attention]


def lm_kwargs(image_mask: torch.Tensor | None) -> dict:
    """The LM forward's extra keyword for MMCA: none when there is no image mask (causal attention)."""
    return {} if image_mask is None else {IMAGE_MASK: image_mask}

"""The lean decoding step of a plain Llama: transformers' forward without its modules' Python machinery, on weights
laid out for one-token products.

After the prompt, a decoding step multiplies one row by every weight matrix: on a CPU that reads all the weights
from memory once per token, and the Python around the products costs as much as the small ones do. The step looks
each layer's tensors up once and runs only the torch operations of the forward. On a CPU it also keeps a copy of the
linear weights transposed to (in, out), contiguous, with q/k/v and gate/up side by side: a one-row product streams
such a matrix about 10 % faster than transformers' (out, in) one, and one product replaces three (or two). The copy
costs the memory of those weights once more; it is made once per model, and again only when a weight changes (a
training step between evaluations).

Past the products, a one-row step is a few hundred small operations, each costing microseconds of dispatch whatever
its size (more in place than alone: the weights streamed in between evict the dispatcher's own code and data). So
the packed step also does fewer of them: each RMSNorm's weight is folded into the rows of the product after it (the
norm is then three operations instead of ten), RoPE's cos and sin come from a table, q, k and v are turned in one
pass (v by a cos of 1 and a sin of 0) and written to a slab (`slab.py`) with one copy, and sdpa's CPU kernel is
called directly where sdpa would pick it. On the 28 M-parameter Llama of `bench/bench_decode.py` (one thread) the
step takes about 7.6-8.2 ms in its products, 1.1 ms in attention (reading the KV cache, cold after the weights) and
1.5 ms in everything else, some 160 operations.

The sums of those products run in another order than transformers' own, so logits may differ from the forward's
in the last bits of float32 (`tests/test_decode_fast.py` bounds it); greedy and seeded tokens are the forward's and
HF `generate`'s in every test and benchmark case (`bench/bench_decode.py` checks each round).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .slab import slab_class

# A CPU model whose linear weights take more than this keeps using them as they are: the copy would cost as much
# memory again, and for such sizes the products, not the Python around them, are the step's time.
PACK_LIMIT_BYTES = 1 << 30

_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> (weights' identity, packed layers)


class _Layer(NamedTuple):
    attention: object  # the LlamaAttention module, which transformers' sdpa wrapper reads its GQA groups from
    norm1: tuple[torch.Tensor, float]
    qkv: tuple[torch.Tensor, ...]  # one (in, out) matrix and bias when packed, else the three (out, in).T views
    o: tuple[torch.Tensor, torch.Tensor | None]
    norm2: tuple[torch.Tensor, float]
    act: object
    gate_up: tuple[torch.Tensor, ...]
    down: tuple[torch.Tensor, torch.Tensor | None]
    # For one row: the model's own (out, in) down weight, as its (in, out) view, where it narrows (in > out): a
    # one-row product streams such a matrix 10-15 % faster in that layout, and any other in the (in, out) one.
    down_one: tuple[torch.Tensor, None] | None = None


class LlamaStep:
    """One decoding step of a LlamaForCausalLM (sdpa attention) on a cache whose layers take `update(k, v)`: the
    slabs of `generate`, or the serve engine's DynamicCache. Several new positions at once (the guesses of
    `lookahead.py`) need an explicit mask. See the module's note."""

    def __init__(self, lm):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.lm, self.attend = lm, ALL_ATTENTION_FUNCTIONS["sdpa"]
        first = lm.model.layers[0].self_attn
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.heads, self.kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
        self.layers, self.head, self.norm, self.packed = _weights(lm)
        self._table = (None, None)  # (what it was made from, (cos, sin) of positions 0...)

    @staticmethod
    def fits(lm) -> bool:
        """Whether the step computes what `lm`'s forward would: a plain Llama, in eval mode, nothing hooked into it
        or patched (a LoRA layer, a forward hook, a kernel swapped in), sdpa attention; else the forward runs."""
        from torch.nn.modules import module
        from transformers import LlamaForCausalLM
        from transformers.models.llama import modeling_llama as llama

        if (type(lm) is not LlamaForCausalLM or lm.training or lm.config._attn_implementation != "sdpa"
                or module._global_forward_hooks or module._global_forward_pre_hooks):
            return False
        plain = (llama.LlamaModel, llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm,
                 llama.LlamaRotaryEmbedding, torch.nn.Linear, torch.nn.Embedding, torch.nn.ModuleList)
        for m in lm.modules():
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                return False
            if m is not lm and type(m) not in plain and not any(m is x.mlp.act_fn for x in lm.model.layers):
                return False
        return True

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, past, *,
                 every: bool = False) -> torch.Tensor:
        """(B, T, D) new positions at (B, T) positions on top of `past` -> (B, V) logits of the last one, or with
        `every` (B, T, V) of each. `mask`: (B, 1, T, L) bool, or None where every position is real and T is 1 (what
        transformers' sdpa mask gives then)."""
        b, t, _ = x.shape
        assert t == 1 or mask is not None, "several new positions need a mask: sdpa's own causal one is top-left"
        cos, sin = self._rope(x, positions)
        half, dim, heads, kv = cos.shape[-1] // 2, self.head_dim, self.heads, self.kv
        if self.packed:  # q, k and v heads turned in one pass, v's by nothing: its cos is 1 and its sin 0
            cos, sin = (torch.cat((c.expand(b, heads + kv, t, dim), c.new_full((1, 1, 1, 1), f).expand(b, kv, t, dim)),
                                  dim=1) for c, f in ((cos, 1.0), (sin, 0.0)))
        direct = mask is None and x.device.type == "cpu" and x.dtype == torch.float32
        slab, flash = slab_class(), _flash if direct else None
        x = x.reshape(b * t, -1)  # 2-D rows: a product on them skips the reshapes of the 3-D path
        for layer, w in zip(past.layers, self.layers):
            h = _rms(x, *w.norm1)
            if self.packed:
                both = _linear(h, *w.qkv)
                both = both.view(b, -1, 1, dim) if t == 1 else both.view(b, t, -1, dim).transpose(1, 2)
                both = torch.addcmul(both * cos, both.roll(half, -1), sin)
                q, new = both.narrow(1, 0, heads), both.narrow(1, heads, 2 * kv)
                k, v = layer.append(new, kv) if type(layer) is slab else layer.update(*new.split(kv, dim=1))
            else:
                q, k, v = _split(h, w.qkv, dim, b, t, cos, sin, half)
                k, v = layer.update(k, v)
            if w.attention.num_key_value_groups != 1:
                out, _ = self.attend(w.attention, q, k, v, mask, dropout=0.0, scaling=self.scaling)
            elif flash is not None:  # the kernel sdpa picks on a CPU, without its dispatch
                out = flash(q, k, v, scale=self.scaling)[0]
                out = out if t == 1 else out.transpose(1, 2)  # (B, heads, 1, dim) rows are (B, 1, heads, dim) rows
            else:  # what transformers' sdpa wrapper calls then, minus its checks
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                     is_causal=False).transpose(1, 2)
            x = _linear(out.reshape(b * t, -1), *w.o, add=x, fuse=self.packed)
            h = _rms(x, *w.norm2)
            if len(w.gate_up) == 2:
                gate, up = _linear(h, *w.gate_up).chunk(2, dim=-1)
            else:
                gate, up = _linear(h, *w.gate_up[:2]), _linear(h, *w.gate_up[2:])
            down = w.down if w.down_one is None or b * t > 1 else w.down_one
            x = _linear(w.act(gate).mul_(up), *down, add=x, fuse=self.packed)
        if every:
            return _linear(_rms(x, *self.norm), *self.head).view(b, t, -1)
        return _linear(_rms(x if t == 1 else x.view(b, t, -1)[:, -1], *self.norm), *self.head)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T, dim) cos and sin of `positions`, sin with its first half negated: rotate_half(q) * sin is then
        roll(q) * that sin, exactly. Looked up in a table made by the model's own rotary embedding (the same
        values: each is the cos or sin of one product), on a CPU (elsewhere, reading the largest position would wait
        for the device) and except for the kinds of RoPE that change with length."""
        rotary = self.lm.model.rotary_emb
        if x.device.type != "cpu" or "dynamic" in rotary.rope_type or rotary.rope_type == "longrope":
            return _negated(*(e.unsqueeze(1) for e in rotary(x, positions)))
        made_from, table = self._table
        source = (rotary.inv_freq.data_ptr(), rotary.inv_freq._version, x.dtype, x.device)
        top = int(positions.max()) + 1
        if made_from != source or table[0].shape[0] < top:
            cos, sin = rotary(x, torch.arange(max(2 * top, 256), device=x.device)[None])
            table = _negated(cos[0], sin[0])
            self._table = (source, table)
        return table[0][positions].unsqueeze(1), table[1][positions].unsqueeze(1)


def _negated(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


# sdpa's CPU kernel, called directly where sdpa would pick it (no mask): its choosing costs ~20 us a layer.
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split(h: torch.Tensor, qkv: tuple, dim: int, b: int, t: int, cos, sin, half: int):
    """q and k rotated, and v, as (B, heads, T, dim), from the three separate products."""
    q, k, v = (_linear(h, *qkv[i:i + 2]).view(b, t, -1, dim).transpose(1, 2) for i in (0, 2, 4))
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, v


def _weights(lm) -> tuple[list[_Layer], tuple, tuple, bool]:
    """Each layer's tensors, the head's and the last norm's; packed (module note) where the model is on a CPU and
    small enough, each norm's weight then folded into the product after it."""
    linears = [m for x in lm.model.layers for m in (x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj,
                                                     x.self_attn.o_proj, x.mlp.gate_proj, x.mlp.up_proj,
                                                     x.mlp.down_proj)] + [lm.lm_head]
    weights = [m.weight for m in linears]
    # float32 only: in bfloat16 a product rounds its sum once more than float32 does, and another order of the sum
    # could move a token; such models decode with transformers' own products.
    pack = (weights[0].device.type == "cpu" and all(w.dtype == torch.float32 for w in weights)
            and sum(w.numel() * w.element_size() for w in weights) <= PACK_LIMIT_BYTES)
    norms = [n for x in lm.model.layers for n in (x.input_layernorm, x.post_attention_layernorm)] + [lm.model.norm]
    identity = _identity([t for m in linears + norms for t in (m.weight, getattr(m, "bias", None))]) if pack else None
    held = _packed.get(lm)
    if identity is not None and held is not None and _same(held[0], identity):
        return held[1]
    from transformers.activations import SiLUActivation

    layers = []
    for x in lm.model.layers:
        a, mlp, act = x.self_attn, x.mlp, x.mlp.act_fn
        one, two = (_norm(n, pack) for n in (x.input_layernorm, x.post_attention_layernorm))
        qkv = _join(a.q_proj, a.k_proj, a.v_proj, scale=x.input_layernorm) if pack else _views(a.q_proj, a.k_proj,
                                                                                                 a.v_proj)
        gate_up = (_join(mlp.gate_proj, mlp.up_proj, scale=x.post_attention_layernorm) if pack
                   else _views(mlp.gate_proj, mlp.up_proj))
        o, down = (_join(m) if pack else _views(m) for m in (a.o_proj, mlp.down_proj))
        act = F.silu if type(act) in (SiLUActivation, torch.nn.SiLU) else act  # the same op, without a module call
        narrows = pack and mlp.down_proj.bias is None and mlp.down_proj.in_features > mlp.down_proj.out_features
        layers.append(_Layer(a, one, qkv, o, two, act, gate_up, down,
                             (mlp.down_proj.weight.detach().t(), None) if narrows else None))
    head = _join(lm.lm_head, scale=lm.model.norm) if pack else _views(lm.lm_head)
    result = (layers, head, _norm(lm.model.norm, pack), pack)
    if pack and identity is not None:
        _packed[lm] = (identity, result)
    return result


def _norm(norm, folded: bool) -> tuple[torch.Tensor | None, float | torch.Tensor]:
    """An RMSNorm's (weight, eps); where its weight is folded into the next product, (None, sqrt(n eps) as a
    tensor): see `_rms`."""
    eps, n = norm.variance_epsilon, norm.weight.shape[-1]
    return (None, torch.tensor((n * eps) ** 0.5, dtype=norm.weight.dtype)) if folded else (norm.weight, eps)


def _identity(tensors) -> list | None:
    """What tells whether any weight changed: each tensor (weakly held, so a replaced one is seen as gone, never
    mistaken for a new one at the same address), its in-place version and its storage (a `.data` swapped under the
    same Parameter); None where a tensor keeps no version (made under inference mode), so that a packed copy is
    never trusted for it."""
    try:
        return [(weakref.ref(t), t._version, t.data_ptr()) for t in tensors if t is not None]
    except RuntimeError:
        return None


def _same(held: list, now: list) -> bool:
    return len(held) == len(now) and all(a() is b() and v == w and p == q for (a, v, p), (b, w, q) in zip(held, now))


def _join(*linears, scale=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(in, sum of outs) contiguous weight and the joined bias of linears that read the same input; with `scale`
    (an RMSNorm before them) its weight, times sqrt(n), multiplies the rows, so that the norm's own product falls
    away."""
    weight = torch.cat([m.weight.detach().t() for m in linears], dim=1)
    if scale is not None:  # times sqrt(n): `_rms` leaves it out of the norm
        weight = weight * (scale.weight.detach() * scale.weight.shape[-1] ** 0.5)[:, None]
    weight = weight.contiguous()
    biases = [m.bias for m in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    return weight, bias


def _views(*linears) -> tuple:
    """(weight.T, bias) of each linear, flattened: transformers' own products."""
    return tuple(x for m in linears for x in (m.weight.t(), m.bias))


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None = None,
            fuse: bool = False) -> torch.Tensor:
    """x @ weight_t (+ bias) (+ add) on 2-D rows, without F.linear's dispatch and transpose. With `fuse` the product
    sums the residual `add` itself (packed float32 weights); else it is added after, as transformers does."""
    if fuse and bias is None and add is not None:
        return torch.addmm(add, x, weight_t)
    out = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    return out if add is None else add + out


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps) -> torch.Tensor:
    """LlamaRMSNorm's forward: in float32, torch's fused rms_norm (the same values); else operation for operation.
    Without a weight (folded into the next product, times sqrt(n)) x sqrt(n) / rms(x), in three operations instead
    of rms_norm's ten: on a one-row step each costs more than its arithmetic."""
    if weight is None:  # x sqrt(n) / sqrt(sum x^2 + n eps): `eps` holds sqrt(n eps), the products the sqrt(n)
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)

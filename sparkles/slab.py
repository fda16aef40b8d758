"""The KV cache layer that `generate` decodes on: keys and values written in place into one roomy buffer.

transformers' DynamicLayer grows by `torch.cat` of the whole cache at every step. A slab keeps a buffer with room
ahead, (B, 2 x kv heads, capacity, head dim): the keys' heads, then the values' heads. A step writes its positions
in place, and `keys`/`values` are views of exactly the positions held, so attention sees what a DynamicLayer would.
Keys and values side by side let the lean step (`llama_step.py`) write both with one copy, from the product that
made them.

Cropping by slicing `keys`/`values` works (what `KVCache.crop` does); tensors put in their place (a batch selection)
are copied into a new buffer at the next write.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def slab_class() -> type:
    """The Slab class, made on first use: transformers is imported only when a model is."""
    from transformers.cache_utils import DynamicLayer

    class Slab(DynamicLayer):
        """A DynamicLayer whose keys and values are views of one buffer with room ahead (see the module's note)."""

        reserve = 0  # positions to make room for at the next allocation

        def update(self, key_states, value_states, *args, **kwargs):
            heads, new = key_states.shape[1], key_states.shape[-2]
            buffer, held = self._room(key_states, 2 * heads, new)
            buffer[:, :heads, held:held + new], buffer[:, heads:, held:held + new] = key_states, value_states
            return self._view(buffer, heads, held + new)

        def append(self, states: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Write (B, 2 x heads, T, dim) new keys then values after the positions held -> keys, values."""
            buffer, held = self._room(states, states.shape[1], states.shape[-2])
            end = held + states.shape[-2]
            buffer.narrow(2, held, states.shape[-2]).copy_(states)
            return self._view(buffer, heads, end)

        def hold(self, length: int) -> None:
            """Hold the first `length` positions of the buffer, written past the held ones too (a step's guesses)."""
            self._view(self._buffer, self.keys.shape[1], length)

        def _view(self, buffer: torch.Tensor, heads: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            # as_strided: one operation a view, where slicing two dimensions takes two (a step makes 12 of them)
            size, stride = (buffer.shape[0], heads, end, buffer.shape[-1]), buffer.stride()
            offset = buffer.storage_offset()
            self.keys = buffer.as_strided(size, stride, offset)
            self.values = buffer.as_strided(size, stride, offset + heads * stride[1])
            return self.keys, self.values

        def _room(self, like: torch.Tensor, both: int, new: int) -> tuple[torch.Tensor, int]:
            """The buffer, made anew (the held positions copied in) where it is missing, too small, of another
            batch, or no longer what `keys` and `values` view; and the number of positions held."""
            keys, buffer = getattr(self, "keys", None), getattr(self, "_buffer", None)
            held = 0 if keys is None or keys.numel() == 0 else keys.shape[-2]
            end, batch = held + new, like.shape[0]
            ours = buffer is not None and buffer.shape[:2] == (batch, both)
            if ours and held:  # keys and values still the views of it made at the last write (not a crop's copy)
                start, half = buffer.data_ptr(), both // 2 * buffer.stride(1) * buffer.element_size()
                ours = (keys.stride() == self.values.stride() == buffer.stride() and keys.data_ptr() == start
                        and self.values.data_ptr() == start + half)
            if not ours or end > buffer.shape[-2]:
                # Growing a buffer of ours: room past what this call needs for half the positions held (a long
                # answer copies it a few times only) or for as many as it brings (a chat's next turn, most often
                # like this one, finds room: a session grows every turn, each growth a copy of all it holds).
                room = max(end, self.reserve) + (max(held // 2, new) if ours else 0)
                buffer = like.new_empty(batch, both, room, like.shape[-1])
                if held:
                    buffer[:, :both // 2, :held], buffer[:, both // 2:, :held] = keys, self.values
                self._buffer = buffer
            self.is_initialized, self.device, self.dtype = True, like.device, like.dtype
            return buffer, held

    return Slab


def slabs(lm, past, reserve: int):
    """`past`, or a new cache of slabs; each slab gets room for `reserve` positions at its next allocation."""
    from transformers import DynamicCache

    slab = slab_class()
    if past is None:
        past = DynamicCache()
        past.layer_class_to_replicate = slab  # else transformers' DynamicLayer: a torch.cat of the whole cache a step
        past.layers = [slab() for _ in range(getattr(lm.config.get_text_config(), "num_hidden_layers", 0))]
    for layer in (x for x in past.layers if type(x) is slab):
        layer.reserve = reserve
    return past


def holding(lm, pairs: list[tuple[torch.Tensor, torch.Tensor]] | None, reserve: int):
    """A new cache of slabs holding each layer's (keys, values) in `pairs` as they are (None: nothing): the first
    write copies them into a buffer with room for `reserve` positions, and never writes into them."""
    past = slabs(lm, None, reserve)
    for layer, (keys, values) in zip(past.layers, pairs or ()):
        layer.keys, layer.values = keys, values
        layer.is_initialized, layer.device, layer.dtype = True, keys.device, keys.dtype
    return past

"""The fast decoding path (a lean Llama step on packed weights and an in-place KV cache) gives the logits of the
LM's forward to float32 rounding and exactly the tokens of the plain path and of Hugging Face `generate`: greedy and
seeded sampling, one row and a left-padded batch; its packed weights follow every change of the model's; and no
FutureWarning."""

import warnings

import pytest
import torch

from sparkles import generate as gen
from sparkles import llama_step as step_module
from sparkles.config import SamplingParams
from sparkles.generate import KVCache, generate


def llama(kv_heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=300, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    lm = LlamaForCausalLM(config).eval()
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = None, 0
    return lm


def ids(batch, length, seed=1):
    return torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(lm, embeds, params, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (`past_key_values`) or any other fails the test
        return torch.stack(list(generate(lm, embeds, params, **kwargs)), dim=1)


@pytest.fixture
def plain(monkeypatch):
    """Run `generate` the plain way: the LM's own forward every step, on transformers' DynamicCache."""
    def use():
        monkeypatch.setattr(gen.LlamaStep, "fits", staticmethod(lambda lm: False))
        monkeypatch.setattr(gen, "slabs", lambda lm, past, reserve: past if past is not None else _dynamic())
    return use


def _dynamic():
    from transformers import DynamicCache

    return DynamicCache()


@pytest.mark.parametrize("padded", [True, False])  # False: no mask, sdpa's CPU kernel called directly
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention
def test_the_step_gives_the_forward_logits(kv_heads, packed, padded, monkeypatch):
    monkeypatch.setattr(step_module, "PACK_LIMIT_BYTES", step_module.PACK_LIMIT_BYTES if packed else 0)
    lm = llama(kv_heads)
    assert gen.LlamaStep.fits(lm)
    prompt = lm.get_input_embeddings()(ids(2, 20))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0 if padded else 1  # row 1 is left-padded
    with torch.inference_mode():
        caches = [gen.slabs(lm, None, 64), _dynamic()]
        for past in caches:
            start = (mask[:, :20].cumsum(-1) - 1).clamp(min=0)
            lm(inputs_embeds=prompt, attention_mask=mask[:, :20], position_ids=start, use_cache=True,
               **gen.cache_kwargs(lm, past))
        token = lm.get_input_embeddings()(ids(2, 1, seed=7))
        positions = mask.sum(-1, keepdim=True) - 1
        step = gen.LlamaStep(lm)
        fast = step(token, positions, mask[:, None, None, :].bool() if padded else None, caches[0])
        slow = lm(inputs_embeds=token, attention_mask=mask, position_ids=positions, use_cache=True,
                  **gen.cache_kwargs(lm, caches[1])).logits[:, -1]
    assert (len(step.layers[0].qkv) == 2) == packed  # one (in, out) matrix and its bias, or three views
    # The packed products sum in another order: the last bits of float32 may differ, nothing more.
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_equal_hugging_face_generate(batch):
    lm = llama(kv_heads=2)
    prompt = ids(batch, 40)
    with torch.inference_mode():
        theirs = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30,
                             do_sample=False)[:, 40:]
        ours = run(lm, lm.get_input_embeddings()(prompt), SamplingParams(max_new_tokens=30))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=40),
                                    SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.9, seed=3),
                                    SamplingParams(max_new_tokens=40, temperature=1.2, top_k=20,
                                                   repetition_penalty=1.3, seed=11)])
def test_fast_path_equals_plain_path_for_one_row_and_a_left_padded_batch(params, plain):
    lm = llama()
    table = lm.get_input_embeddings()
    with torch.inference_mode():
        one = table(ids(1, 33))
        rows = table(ids(3, 25, seed=5))
        mask = torch.ones(3, 25, dtype=torch.long)
        mask[0, :9], mask[2, :3] = 0, 0
        rows = rows * mask[..., None]
        seen = ids(3, 10, seed=9)
        full = table(ids(2, 20, seed=4))  # a mask given, but nothing padded

        def both():
            return [run(lm, one, params, suppress_ids=(5, 7, 999)),
                    run(lm, rows, params, attention_mask=mask, seen=seen, stop_ids=(3, 4)),
                    run(lm, full, params, attention_mask=torch.ones(2, 20, dtype=torch.long))]
        fast = both()
        plain()
        slow = both()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_a_held_cache_continues_cropped_and_extended_as_the_plain_path_does(plain):
    """A session's cache: prefill, decode, crop back, go on with a new suffix; twice over, both ways."""
    lm = llama()
    table = lm.get_input_embeddings()
    params = SamplingParams(max_new_tokens=12)

    def turns():
        cache, out = KVCache(), []
        with torch.inference_mode():
            out.append(run(lm, table(ids(1, 30)), params, cache=cache, input_ids=ids(1, 30)))
            cache.crop(cache.length - 4)
            out.append(run(lm, table(ids(1, 9, seed=2)), params, cache=cache, input_ids=ids(1, 9, seed=2)))
        assert cache.length == len(cache.token_ids) == 30 + 11 - 4 + 9 + 11 and cache.croppable
        assert cache.past.get_seq_length() == cache.length
        return out

    fast = turns()
    plain()
    for a, b in zip(fast, turns()):
        assert torch.equal(a, b)


def test_a_hooked_lm_runs_its_own_forward_every_step():
    """A forward hook (a profiler, a test counting calls) must see every step: the lean step steps aside."""
    lm = llama()
    calls = []
    hook = lm.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    assert not gen.LlamaStep.fits(lm)
    with torch.inference_mode():
        hooked = run(lm, lm.get_input_embeddings()(ids(1, 10)), SamplingParams(max_new_tokens=6))
    hook.remove()
    assert len(calls) == 6
    with torch.inference_mode():
        assert torch.equal(hooked, run(lm, lm.get_input_embeddings()(ids(1, 10)), SamplingParams(max_new_tokens=6)))


def test_packed_weights_follow_every_change_of_the_model():
    """Packed once per model; a weight changed in place (an optimizer step), replaced (a reload), or a model moved
    to another dtype is packed again, so decoding after training never uses stale weights."""
    lm = llama()
    prompt = lm.get_input_embeddings()(ids(1, 12)).detach()
    params = SamplingParams(max_new_tokens=8)

    def both():
        with torch.inference_mode():
            fast = run(lm, prompt, params)
            slow = run(lm, prompt, params, use_cache=False)
        return fast, slow

    fast, slow = both()
    assert torch.equal(fast, slow)
    first = step_module._weights(lm)
    assert step_module._weights(lm) is first  # the same model, unchanged: the same packed tensors
    with torch.no_grad():
        lm.lm_head.weight[int(fast[0, 0])] -= 10  # the first token is now the least likely one
        lm.model.layers[1].mlp.up_proj.weight.mul_(3)
    changed, slow = both()
    assert torch.equal(changed, slow) and changed[0, 0] != fast[0, 0]
    assert step_module._weights(lm) is not first
    lm.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.randn_like(lm.model.layers[0].self_attn
                                                                                     .q_proj.weight))
    replaced, slow = both()
    assert torch.equal(replaced, slow)
    packed = step_module._weights(lm)
    with torch.no_grad():  # a norm's weight is folded into the packed product after it
        lm.model.layers[2].input_layernorm.weight.mul_(-2)
    normed, slow = both()
    assert torch.equal(normed, slow) and not torch.equal(normed, replaced) and step_module._weights(lm) is not packed
    down = lm.model.layers[2].mlp.down_proj.weight
    down.data = torch.randn_like(down)  # a new tensor under the same Parameter, as some merges do
    swapped, slow = both()
    assert torch.equal(swapped, slow) and step_module._weights(lm) is not first


def test_one_step_kept_across_calls_follows_positions_past_its_rope_table_and_a_changed_rope():
    """The engine keeps one step for its life: RoPE looked up in a table made on first use must grow with the
    positions and be made again when the model's frequencies change; the logits stay the forward's."""
    lm = llama()
    step = gen.LlamaStep(lm)
    with torch.inference_mode():
        for length, scale in ((20, 1.0), (300, 1.0), (40, 0.5)):  # 300: past the first table's 256 positions
            lm.model.rotary_emb.inv_freq.mul_(scale)
            prompt = lm.get_input_embeddings()(ids(1, length))
            caches = [gen.slabs(lm, None, length + 1), _dynamic()]
            for past in caches:
                lm(inputs_embeds=prompt, use_cache=True, **gen.cache_kwargs(lm, past))
            token = lm.get_input_embeddings()(ids(1, 1, seed=7))
            position = torch.tensor([[length]])
            fast = step(token, position, None, caches[0])
            slow = lm(inputs_embeds=token, position_ids=position, use_cache=True,
                      **gen.cache_kwargs(lm, caches[1])).logits[:, -1]
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)

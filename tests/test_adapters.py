"""LLaMA-Adapter's and ImageBind-LLM's zero-init gated adapters (spec/peers.md §3.1–3.3, §7.3), `model.adapters`:
one marker position per image, the signal each position reads, zero gates = the base LM exactly, cached decoding,
sessions, batches, what refuses them, checkpoints and training."""


import pytest
import torch
from conftest import logits, solid, steps_on_one_answer, tiny_config, two_images

from sparkles.config import AdapterConfig, LoraConfig, SamplingParams, TileConfig
from sparkles.conversation import Conversation, user_message
from sparkles.errors import CheckpointError, ConfigError
from sparkles.generate import generate
from sparkles.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparkles.model.model import build_model

KINDS = ["imagebind", "llama-adapter"]
GREEDY = SamplingParams(max_new_tokens=8)


def build(kind="imagebind", gates=0.0, **changes):
    torch.manual_seed(0)
    adapter = changes.pop("adapter", AdapterConfig(kind=kind))
    model, processor = build_model(tiny_config(adapter=adapter, **changes))
    if gates:  # a trained model's gates: without them the adapters add exactly nothing and most tests prove little
        with torch.no_grad():
            model.adapters.gate.uniform_(-gates, gates)
    return model.eval(), processor




# (a) An image is one position; what each position reads


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_is_one_marker_position(kind):
    (model, processor), (_, plain) = build(kind), build("none")
    adapted, full = (p.encode(two_images(), generation=True).rendered for p in (processor, plain))
    k = plain.config.tokens_per_image
    assert len(full) - len(adapted) == 2 * (k - 1)
    assert [adapted.input_ids[s] for s in adapted.image_starts] == [processor.image_token_id] * 2
    assert adapted.input_ids.count(processor.image_token_id) == 2
    assert processor.image_span(adapted.input_ids, adapted.image_starts[0]) == (1, ())
    assert "⟨image 1 × 1 at" in processor.visualize(adapted)
    ids = torch.tensor([adapted.input_ids])
    embeds = model.embed(ids, model.encode_images(processor.pixel_values(list(two_images().slots))))
    assert torch.equal(embeds[0, adapted.image_starts[1]], model.adapters.marker.detach())
    with pytest.raises(Exception, match="image markers: 2"):
        model.embed(ids, None)


def test_a_conversation_too_long_with_k_tokens_an_image_fits_with_one():
    many = Conversation((user_message(" ".join(f"IMAGE#{i}" for i in range(1, 9)), [solid("red")] * 8),))
    _, processor = build("imagebind", max_seq_len=180, system_prompt="")
    _, plain = build("none", max_seq_len=180, system_prompt="")
    with pytest.raises(Exception, match="tokens long"):
        plain.render(many)
    rendered = processor.render(many)
    assert len(rendered) <= 180


def test_each_position_reads_the_most_recent_image_and_packed_samples_do_not_share():
    model, _ = build("imagebind")
    bank = model.adapters
    is_image = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    features = torch.randn(3, 4, bank.proj.in_features)  # rows' images in order: two in row 0, one in row 1
    with torch.no_grad():
        u = bank.signal(is_image, features).u
        pooled = bank.proj(features.mean(1))  # (3, D)
        assert torch.equal(u[0, 0], torch.zeros_like(u[0, 0])) and torch.equal(u[1, :2], torch.zeros_like(u[1, :2]))
        assert all(torch.equal(u[0, t], pooled[0]) for t in (1, 2, 3))
        assert all(torch.equal(u[0, t], pooled[1]) for t in (4, 5))
        assert all(torch.equal(u[1, t], pooled[2]) for t in (2, 3, 4, 5))
        # One packed row of two samples (positions restart at 0): the second reads nothing until its own image.
        starts = torch.tensor([[1, 0, 0, 1, 0, 0]], dtype=torch.bool)
        packed = bank.signal(torch.tensor([[0, 1, 0, 0, 0, 1]], dtype=torch.bool), features[:2], starts).u[0]
        assert torch.equal(packed[2], pooled[0]) and torch.equal(packed[3], torch.zeros_like(packed[3]))
        assert torch.equal(packed[4], torch.zeros_like(packed[4])) and torch.equal(packed[5], pooled[1])


# (b) Zero gates are the base LM, exactly: tests/test_layer_readers.py, for every reader.


@pytest.mark.parametrize("kind", KINDS)
def test_open_gates_change_the_logits_where_the_adapters_reach(kind):
    (model, processor), (closed, _) = build(kind, gates=0.5), build(kind)
    first = processor.encode(two_images(), generation=True).rendered.image_starts[0]
    out, before = logits(model, processor, two_images()), logits(closed, processor, two_images())
    assert not torch.allclose(out[first:], before[first:], atol=1e-3)
    if kind == "imagebind":  # attention-free: text before the first image reads zero, gates or not
        assert torch.equal(out[:first], before[:first])
    else:  # the adaption prompts speak to every position
        assert not torch.allclose(out[:first], before[:first], atol=1e-4)


def test_the_prompt_branch_is_the_softmax_over_prompts_plus_the_signal():
    """The cheap form (bare prompts, then the value shift) equals attending to P_l + u_t keyed per query."""
    model, _ = build("llama-adapter", gates=0.8)
    bank, attention = model.adapters, model.lm.model.layers[1].self_attn
    torch.manual_seed(1)
    b, q, h, d = 2, 5, attention.config.num_attention_heads, attention.head_dim
    query, u = torch.randn(b, h, q, d), torch.randn(b, q, bank.proj.in_features)
    from sparkles.model.adapters import Signal

    with torch.no_grad():
        got = bank.prompt_attention(attention, query, Signal(u, bank), d ** -0.5)  # (B, Q, H, d)
        prompts = bank.prompt[1][None, None] + u[:, :, None]  # (B, Q, P, D)
        keys = attention.k_proj(prompts).view(b, q, -1, h, d)  # (B, Q, P, H, d): one set of keys per query
        values = attention.v_proj(prompts).view(b, q, -1, h, d)
        weights = (torch.einsum("bhqd,bqphd->bhqp", query, keys) * d ** -0.5).softmax(-1)
        want = torch.einsum("bhqp,bqphd->bqhd", weights, values) * torch.tanh(bank.gate[1])[:, None]
    assert torch.allclose(got, want, atol=1e-5)


def test_the_lm_refuses_a_forward_without_the_signal():
    model, _ = build("llama-adapter")
    with pytest.raises(ValueError, match="sparkles_adapter"):
        model.lm(input_ids=torch.tensor([[1, 2, 3]]))


def test_layers_picks_the_top_ones_and_bad_settings_are_refused():
    model, _ = build(adapter=AdapterConfig(kind="imagebind", layers=1))
    assert model.adapters.layers == (1,)
    assert [bool(x._forward_pre_hooks) for x in model.lm.model.layers] == [False, True]
    prompted, _ = build("llama-adapter")
    assert prompted.adapters.prompt.shape == (2, 10, prompted.lm.config.hidden_size)
    with pytest.raises(ConfigError, match="adapter.layers"):
        build(adapter=AdapterConfig(kind="imagebind", layers=3))
    with pytest.raises(ConfigError, match="model.tiles"):
        build(tiles=TileConfig(grid=(2, 2)))


# (c) Generation, sessions, batches


# Cached decoding, sessions, batches and the serve engine: tests/test_layer_readers.py, for every reader.


def test_the_llava_export_refuses_adapters():
    from sparkles.model.export import check_exportable

    with pytest.raises(CheckpointError, match="adapter 'imagebind'"):
        check_exportable(build("imagebind")[0])


def test_any_hf_causal_lm_with_grouped_heads_and_biases_takes_it():
    from sparkles.config import LanguageConfig
    from sparkles.tokenizer import byte_tokenizer

    language = LanguageConfig(kind="hf", config={
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "vocab_size": 300})
    for kind in KINDS:
        torch.manual_seed(0)
        model, processor = build_model(tiny_config(adapter=AdapterConfig(kind=kind), language=language),
                                       tokenizer=byte_tokenizer(("<image>",)))
        with torch.no_grad():
            model.adapters.gate.uniform_(-0.5, 0.5)
        model.eval()
        encoded = processor.encode(two_images(), generation=True)
        ids = torch.tensor([encoded.rendered.input_ids])
        images = model.encode_images(encoded.pixel_values)
        embeds, signal, params = model.embed(ids, images).detach(), model.signal(ids, images), GREEDY
        assert ([int(t) for t in generate(model.lm, embeds, params, signal=signal)]
                == [int(t) for t in generate(model.lm, embeds, params, signal=signal, use_cache=False)])


# (d) Checkpoints and training


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_keeps_the_adapters_and_the_logits(kind, tmp_path):
    model, processor = build(kind, gates=0.5)
    folder = save_checkpoint(model, processor, tmp_path / kind)
    assert read_config(folder)[0].adapter == AdapterConfig(kind=kind)
    loaded, loaded_processor = load_checkpoint(folder)
    assert torch.equal(loaded.adapters.gate, model.adapters.gate)
    assert torch.equal(logits(loaded, loaded_processor, two_images()), logits(model, processor, two_images()))
    if kind == "llama-adapter":  # the wrapper wraps the LM's own attention once, not itself
        assert loaded.lm.config._attn_implementation == "sparkles_adapter_sdpa"


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_train_with_the_connector_beside_lora_on_a_frozen_lm(kind):
    pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which .ci/run installs")
    model, processor = build(kind, lora=LoraConfig(r=4), trainable=("connector", "lm"))
    assert all(p.requires_grad for p in model.adapters.parameters())
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    frozen, _ = build(kind)  # trainable=("connector",): the LM frozen whole, the adapters still learn
    assert all(p.requires_grad for p in frozen.adapters.parameters())
    def gates_learn(model, loss):  # zero gates get a gradient
        assert model.adapters.gate.grad is not None and model.adapters.gate.grad.abs().sum() > 0

    losses = steps_on_one_answer(model, processor, two_images(), "IMAGE#1 is red.", check=gates_learn)
    assert losses[-1] < losses[0]
    assert model.adapters.gate.abs().sum() > 0


# The training loop with each reader: tests/test_layer_readers.py.

"""Flamingo's / MultiModal-GPT's gated cross-attention (spec/peers.md §4), `model.cross_attention`: one marker
position per image, which images each position sees ("previous" or "all"), zero gates = the base LM exactly,
cached decoding, sessions, batches, what refuses it, LoRA, checkpoints and training."""


import pytest
import torch
from conftest import logits, steps_on_one_answer, tiny_config, two_images

from sparkles.config import AdapterConfig, CrossAttentionConfig, LoraConfig, SamplingParams, TileConfig
from sparkles.errors import CheckpointError, ConfigError
from sparkles.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparkles.model.model import build_model

SEES = ["previous", "all"]
GREEDY = SamplingParams(max_new_tokens=8)
LORA_TARGETS = ("q_proj", "v_proj", "to_q", "to_kv", "to_out", "ff_in", "ff_out")  # MultiModal-GPT's set


def cross(sees="previous", every=1, **changes) -> CrossAttentionConfig:
    return CrossAttentionConfig(every=every, sees=sees, **{"heads": 2, "head_dim": 16, "ff_mult": 2, **changes})


def build(sees="previous", gates=0.0, **changes):
    torch.manual_seed(0)
    config = changes.pop("cross_attention", cross(sees))
    model, processor = build_model(tiny_config(cross_attention=config, **changes))
    if gates:  # a trained model's gates: closed, the blocks add exactly nothing and most tests prove little
        open_gates(model, gates)
    return model.eval(), processor


def open_gates(model, value):
    with torch.no_grad():
        for block in model.cross_attention.blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(-value)




# (a) An image is one position; which images each position sees


def test_an_image_is_one_marker_position_and_its_k_tokens_are_the_media():
    (model, processor), plain = build(), build_model(tiny_config())[1]
    crossed, full = (p.encode(two_images(), generation=True).rendered for p in (processor, plain))
    k = plain.config.tokens_per_image
    assert len(full) - len(crossed) == 2 * (k - 1)
    assert crossed.input_ids.count(processor.image_token_id) == 2
    ids = torch.tensor([crossed.input_ids])
    images = model.encode_images(processor.pixel_values(list(two_images().slots)))  # (2, K, D)
    embeds = model.embed(ids, images)
    assert torch.equal(embeds[0, crossed.image_starts[1]], model.cross_attention.marker.detach())
    state = model.signal(ids, images)
    assert state.media.shape == (1, 2, k, images.shape[-1]) and torch.equal(state.media[0], images)
    with pytest.raises(Exception, match="image markers: 2"):
        model.embed(ids, None)


@pytest.mark.parametrize("sees", SEES)
def test_which_images_each_position_sees_on_a_hand_made_sequence(sees):
    model, _ = build(sees)
    bank = model.cross_attention
    # Row 0: text, image 0, text, text, image 1, text; row 1: text, text, image 0, text, text, text.
    is_image = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    features = torch.randn(3, 4, bank.marker.shape[0])  # the rows' images in order: two in row 0, one in row 1
    state = bank.signal(is_image, features)
    assert torch.equal(state.media[0], features[:2]) and torch.equal(state.media[1, 0], features[2])
    assert not state.media[1, 1].any()  # row 1 has one image: its second slot is padding, seen by nobody
    n, a, b, ab = [0, 0], [1, 0], [0, 1], [1, 1]
    second = b if sees == "previous" else ab  # after image 1, "previous" drops image 0; "all" keeps it
    assert state.visible().long().tolist() == [[n, a, a, a, second, second], [n, n, a, a, a, a]]
    # One packed row of two samples (positions restart at 0): the second sees nothing until its own image.
    starts = torch.tensor([[1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    packed = bank.signal(torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool), features[:2], starts)
    assert packed.visible().long().tolist() == [[n, a, a, n, b, b]]


@pytest.mark.parametrize("sees", SEES)
def test_a_position_reads_exactly_the_images_it_sees_and_nothing_before_the_first(sees):
    model, _ = build(sees, gates=0.5)
    bank = model.cross_attention
    is_image = torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    torch.manual_seed(1)
    hidden, features = torch.randn(1, 6, bank.marker.shape[0]), torch.randn(2, 4, bank.marker.shape[0])
    changed = features.clone()
    changed[0] += 1  # image 0 only
    with torch.no_grad():
        out, other = (bank.blocks[0](hidden, bank.signal(is_image, f)) for f in (features, changed))
    assert torch.equal(out[0, 0], hidden[0, 0])  # before any image: exactly nothing added, the feed-forward too
    assert not torch.equal(out[0, 1:], hidden[0, 1:])
    moved = [not torch.equal(out[0, t], other[0, t]) for t in range(6)]
    assert moved == [False, True, True, True, sees == "all", sees == "all"]


# (b) Zero gates are the base LM, exactly: tests/test_layer_readers.py, for every reader.


def test_open_gates_change_the_logits_after_the_first_image_only():
    (model, processor), (closed, _) = build(gates=0.5), build()
    first = processor.encode(two_images(), generation=True).rendered.image_starts[0]
    out, before = logits(model, processor, two_images()), logits(closed, processor, two_images())
    assert torch.equal(out[:first], before[:first])
    assert not torch.allclose(out[first:], before[first:], atol=1e-3)


def test_every_picks_layers_as_flamingo_and_bad_settings_are_refused():
    model, _ = build(cross_attention=cross(every=2))
    assert model.cross_attention.layers == (1,)  # OpenFlamingo: (i + 1) % every == 0
    assert [bool(x._forward_pre_hooks) for x in model.lm.model.layers] == [False, True]
    default, _ = build(cross_attention=CrossAttentionConfig(every=1))  # OpenFlamingo's 8 heads of 64
    assert default.cross_attention.blocks[0].to_q.weight.shape == (512, 32)
    with pytest.raises(ValueError, match="sparkles_cross"):
        model.lm(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="cross_attention.every"):
        build(cross_attention=cross(every=3))
    with pytest.raises(ConfigError, match="model.tiles"):
        build(tiles=TileConfig(grid=(2, 2)))
    with pytest.raises(ConfigError, match="model.adapter and model.cross_attention"):
        build(adapter=AdapterConfig(kind="imagebind"))


# (c) Generation, sessions, batches


# Cached decoding, sessions, batches and the serve engine: tests/test_layer_readers.py, for every reader.


def test_the_llava_export_refuses_cross_attention():
    from sparkles.model.export import check_exportable

    with pytest.raises(CheckpointError, match="cross_attention"):
        check_exportable(build()[0])


# (d) LoRA, checkpoints and training


def test_lora_reaches_the_blocks_and_only_what_should_learns():
    pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which .ci/run installs")
    model, processor = build(lora=LoraConfig(r=4, targets=LORA_TARGETS), trainable=("connector", "lm"))
    block = model.cross_attention.blocks[0]
    assert all(hasattr(getattr(block, name), "lora_A") for name in ("to_q", "to_kv", "to_out", "ff_in", "ff_out"))
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in learning if n.startswith("lm."))  # the LM: its LoRA only
    assert not any("base_layer" in n for n in learning)  # what LoRA wraps stays as it is
    assert {"connector.cross.blocks.0.attn_gate", "connector.cross.marker", "connector.queries"} <= learning
    assert any(n.startswith("connector.cross.") and "lora_" in n for n in learning)
    def only_what_learns(model, loss):
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert block.attn_gate.grad.abs().sum() > 0  # zero gates learn

    losses = steps_on_one_answer(model, processor, two_images(), "IMAGE#1 is red.", steps=5, check=only_what_learns)
    assert block.to_kv.lora_B.default.weight.grad.abs().sum() > 0  # once the gates open, the blocks' LoRA learns
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("sees", SEES)
def test_a_checkpoint_keeps_the_blocks_and_the_logits(sees, tmp_path):
    model, processor = build(sees, gates=0.5)
    folder = save_checkpoint(model, processor, tmp_path / sees)
    assert read_config(folder)[0].cross_attention == cross(sees)
    loaded, loaded_processor = load_checkpoint(folder)
    assert torch.equal(loaded.cross_attention.blocks[0].attn_gate, model.cross_attention.blocks[0].attn_gate)
    assert torch.equal(logits(loaded, loaded_processor, two_images()), logits(model, processor, two_images()))


def test_a_trainable_only_checkpoint_keeps_the_weights_lora_froze_in_the_blocks(tmp_path):
    pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which .ci/run installs")
    from sparkles.config import LanguageConfig

    torch.manual_seed(0)
    base, base_processor = build_model(tiny_config())
    base.lm.save_pretrained(tmp_path / "lm")
    base_processor.tokenizer.save_pretrained(tmp_path / "lm")
    model, processor = build(gates=0.5, language=LanguageConfig(kind="hf", path=str(tmp_path / "lm")),
                             lora=LoraConfig(r=4, targets=LORA_TARGETS), trainable=("vision", "connector", "lm"))
    folder = save_checkpoint(model, processor, tmp_path / "ckpt", trainable_only=True)
    torch.manual_seed(1)  # a rebuild would draw other random weights for the blocks
    loaded, loaded_processor = load_checkpoint(folder)
    assert torch.equal(logits(loaded, loaded_processor, two_images()), logits(model, processor, two_images()))


# The training loop with each reader: tests/test_layer_readers.py.

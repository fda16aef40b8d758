"""The model: merge order, count checks, loss, trainable parts, and every tower and connector."""

import pytest
import torch
from conftest import solid, tiny_config

from sparkles.config import VisionConfig
from sparkles.conversation import Conversation, Message, user_message
from sparkles.errors import ConfigError, InputError
from sparkles.model.connectors import CONNECTORS
from sparkles.model.model import build_model
from sparkles.processor import IGNORE


def test_each_image_lands_on_its_own_tokens_in_order(tiny):
    model, processor = tiny
    conversation = Conversation((user_message("IMAGE#2 and IMAGE#1 and IMAGE#3", [solid("red"), solid("blue"),
                                                                               solid("green")]),))
    rendered = processor.render(conversation, generation=True)
    ids = torch.tensor([rendered.input_ids])
    k, width = processor.config.tokens_per_image, model.lm.config.hidden_size
    features = torch.arange(3, dtype=torch.float)[:, None, None].expand(3, k, width) + 1  # image i is all i+1
    embeds = model.embed(ids, features)
    # Slots are in text order: IMAGE#2's slot comes first because the prompt mentions it first.
    assert [p.label for p in conversation.slots] == ["2", "1", "3"]
    for slot, start in enumerate(rendered.image_starts):
        assert torch.all(embeds[0, start:start + k] == slot + 1)
    text = [i for i in range(len(rendered)) if all(not (s <= i < s + k) for s in rendered.image_starts)]
    expected = model.lm.get_input_embeddings()(ids[:, text])
    assert torch.equal(embeds[:, text], expected)


def test_a_count_mismatch_says_how_many_of_each(tiny):
    model, processor = tiny
    rendered = processor.render(Conversation((user_message("<image> <image>", [solid("red"), solid("blue")]),)),
                                generation=True)
    ids = torch.tensor([rendered.input_ids])
    one = torch.zeros(1, processor.config.tokens_per_image, model.lm.config.hidden_size)
    with pytest.raises(InputError, match=r"image tokens: 8 \(2 images of 4 tokens\), image features: 4 \(1 images\)"):
        model.embed(ids, one)
    with pytest.raises(InputError, match="image features: 0"):
        model.embed(ids, None)


def test_forward_returns_the_loss_over_supervised_tokens_only(tiny):
    model, processor = tiny
    conversation = Conversation((user_message("What is <image>?", [solid("red")]),
                                 Message.text_only("assistant", "Red.")))
    encoded = processor.encode(conversation)
    ids = torch.tensor([encoded.rendered.input_ids])
    labels = torch.tensor([encoded.rendered.labels])
    out = model(ids, encoded.pixel_values, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    manual = torch.nn.functional.cross_entropy(logits[target != IGNORE], target[target != IGNORE])
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_only_trainable_parts_learn_and_frozen_parts_stay_in_eval_mode():
    model, _ = build_model(tiny_config(trainable=("connector",)))
    assert all(p.requires_grad for p in model.connector.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.lm.parameters())
    model.train()
    assert model.connector.training and not model.vision.training and not model.lm.training
    model.set_trainable(("connector", "lm"))
    assert all(p.requires_grad for p in model.lm.parameters())
    with pytest.raises(ConfigError, match="unknown parts"):
        model.set_trainable(("projector",))


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_every_connector_gives_k_tokens_of_lm_width(connector):
    # a 32-pixel image in 8-pixel patches has 16 tokens; the shuffle connector folds each 2×2 block into one
    tokens = {"resampler": 5, "shuffle": 4}.get(connector, 16)
    model, _ = build_model(tiny_config(connector=connector, tokens_per_image=tokens))
    out = model.encode_images(torch.randn(3, 3, 32, 32))
    assert tuple(out.shape) == (3, tokens, model.lm.config.hidden_size)


def test_a_connector_that_cannot_reach_k_is_a_config_error():
    with pytest.raises(ConfigError, match="set tokens_per_image=16 or use connector=resampler"):
        build_model(tiny_config(connector="mlp", tokens_per_image=4))


CLIP = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SIGLIP = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.mark.parametrize(("hf", "tokens"), [(CLIP, 16), (SIGLIP, 16)])
def test_hf_vision_towers_built_from_config(hf, tokens):
    vision = VisionConfig(kind="hf", config=hf, image_size=32, feature_layer=-2)
    model, processor = build_model(tiny_config(vision=vision, connector="mlp", tokens_per_image=tokens))
    assert model.vision.num_tokens == tokens
    conversation = Conversation((user_message("Describe <image>", [solid("red")]),))
    encoded = processor.encode(conversation, generation=True)
    embeds = model.embed(torch.tensor([encoded.rendered.input_ids]), model.encode_images(encoded.pixel_values))
    assert embeds.shape[1] == len(encoded.rendered)


def test_blip2_tower_yields_query_tokens_like_hf_blip2():
    from transformers import Blip2Config, Blip2Model

    hf = tiny_blip2_config()
    reference = Blip2Model(hf).eval()
    vision = VisionConfig(kind="blip2", config=hf.to_dict(), image_size=32)
    model, _ = build_model(tiny_config(vision=vision, connector="linear", tokens_per_image=4))
    model.vision.load_state_dict({k: v for k, v in reference.state_dict().items()
                                  if k.split(".")[0] in ("vision_model", "qformer", "query_tokens")})
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.get_qformer_features(pixel_values=pixels)
        expected = getattr(expected, "last_hidden_state", expected)  # a tensor in transformers 5
        assert torch.allclose(model.vision(pixels), expected, atol=1e-6)
    assert isinstance(hf, Blip2Config)


def tiny_blip2_config():
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 96,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        qformer_config={"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 48, "encoder_hidden_size": 48, "cross_attention_frequency": 2,
                        "vocab_size": 100},
        text_config={"model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 100, "word_embed_proj_dim": 16},
        num_query_tokens=4)

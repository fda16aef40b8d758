"""The peers' full-scale presets (train/recipes.py): each keeps its peer's switches, and the same recipe with every
pretrained part swapped for a tiny one built from its config (no weights here) builds, answers and trains a step."""

import dataclasses

import pytest
import torch
from conftest import solid

from sparkles.config import LanguageConfig
from sparkles.conversation import Conversation, user_message
from sparkles.generate import Chat
from sparkles.model.model import build_model
from sparkles.tokenizer import byte_tokenizer
from sparkles.train.recipes import PRESETS, build_config

# CLS + 16 patches of 8 px at 32 px: 17 tokens, as ViT-L/14 gives CLS + 256 at 224 px.
CLIP = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
DINO = {"model_type": "dinov2", "image_size": 32, "patch_size": 8, "hidden_size": 24, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 2}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300}
PEERS = {"deepspeed-visualchat-7b": {"attention": "mmca-image-sees-text", "tokens_per_image": 257,
                                     "trainable": ("connector",)},
         "sphinx-1k-13b": {"tiles.grid": (2, 2), "tokens_per_image": 257, "trainable": ("connector", "lm")},
         "llama-adapter-7b": {"adapter.kind": "llama-adapter", "adapter.layers": 30, "adapter.prompt_len": 10,
                              "trainable": ("connector",)},
         "imagebind-llm-7b": {"adapter.kind": "imagebind", "trainable": ("connector",)},
         "multimodal-gpt-9b": {"cross_attention.every": 4, "cross_attention.sees": "previous", "lora.r": 16,
                               "connector": "resampler", "tokens_per_image": 64, "trainable": ("connector", "lm")}}


def _scaled_down(model):
    """The preset's model with each pretrained part built from a tiny config of its kind, switches untouched."""
    vision = dataclasses.replace(model.vision, path=None, config=CLIP, image_size=32)
    if vision.extra is not None:
        vision = dataclasses.replace(vision, extra=dataclasses.replace(vision.extra, path=None, config=DINO,
                                                                       image_size=32))
    # The tiny LM has 2 layers: adapters in all of them, and a cross-attention block before each.
    adapter = dataclasses.replace(model.adapter, layers=0)
    cross = dataclasses.replace(model.cross_attention, every=min(model.cross_attention.every, 1))
    return dataclasses.replace(model, vision=vision, language=LanguageConfig(kind="hf", config=LLAMA),
                               tokens_per_image=17, max_seq_len=512, adapter=adapter, cross_attention=cross)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_peer_preset_keeps_its_switches_and_runs_scaled_down(name):
    config = build_config(preset=name)
    for key, value in PEERS[name].items():
        holder = config.model
        for part in key.split(".")[:-1]:
            holder = getattr(holder, part)
        assert getattr(holder, key.split(".")[-1]) == value, key
    assert config.model.vision.path and config.model.language.path  # by path, as sparkleschat-7b
    torch.manual_seed(0)
    model, processor = build_model(_scaled_down(config.model), tokenizer=byte_tokenizer((config.model.image_token,)))
    conversation = Conversation((user_message("Compare <image> with <image>.",
                                              [solid("red", size=(64, 32)), solid("blue")]),))
    encoded = processor.encode(conversation, generation=True)
    model.train()
    out = model(torch.tensor([encoded.rendered.input_ids]), encoded.pixel_values,
                labels=torch.tensor([encoded.rendered.input_ids]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    learning = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert learning == set(config.model.trainable)
    assert isinstance(Chat(model.eval(), processor).answer(conversation), str)


def test_every_preset_prints_its_config():
    for name in PRESETS:
        assert build_config(preset=name).out

"""Export to the Hugging Face LLaVA layout: transformers reloads it and computes our logits; the exported
processor writes our token ids; parts that LLaVA cannot hold are refused by name."""

import dataclasses

import pytest
import torch
from conftest import CHATML, solid, tiny_config
from test_model import CLIP, SIGLIP, tiny_blip2_config

from sparkles.cli import main
from sparkles.config import SPARKLESCHAT_SYSTEM, LanguageConfig, TileConfig, VisionConfig
from sparkles.conversation import Conversation, Message, Text, user_message
from sparkles.errors import CheckpointError
from sparkles.model.checkpoint import save_checkpoint
from sparkles.model.export import export_hf
from sparkles.model.model import build_model
from sparkles.processor import Processor
from sparkles.tokenizer import byte_tokenizer

# 260 rows: the byte tokenizer's own ids; its image token (id 260) lies past the table, as with a real LLM.
LLAMA = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}


def hf_model(connector="mlp", tower=CLIP, **changes):
    config = tiny_config(vision=VisionConfig(kind="hf", config=tower, image_size=32, feature_layer=-2),
                         language=LanguageConfig(kind="hf", config=LLAMA), connector=connector,
                         tokens_per_image=16, **changes)
    torch.manual_seed(0)
    model, processor = build_model(config, tokenizer=byte_tokenizer((config.image_token,)))
    with torch.no_grad():  # random, but not the init's zeros
        for p in model.connector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), processor


def two_turns():
    first = user_message("Compare IMAGE#1 with IMAGE#2.", [solid("red"), solid("blue")])
    second = user_message("And IMAGE#3?", [solid("green")], known=["1", "2"])
    return Conversation((first, Message("assistant", (Text("Red, then blue."),)), second))


def hf_messages():
    """The same conversation as `two_turns`, as an OpenAI/HF chat request writes it."""
    return [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": " with "}, {"type": "image"},
                                         {"type": "text", "text": "."}]},
            {"role": "assistant", "content": "Red, then blue."},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"},
                                         {"type": "text", "text": "?"}]}]


@pytest.mark.parametrize(("connector", "tower", "system"), [("mlp", CLIP, ""), ("linear", CLIP, SPARKLESCHAT_SYSTEM),
                                                            ("mlp", SIGLIP, "Look closely.")])
def test_transformers_reloads_the_export_with_our_logits(tmp_path, connector, tower, system):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = hf_model(connector, tower, system_prompt=system)
    save_checkpoint(model, processor, tmp_path / "ck")
    assert main(["export", "hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    encoded = processor.encode(two_turns(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    with torch.no_grad():
        ours = model(ids, encoded.pixel_values).logits
        theirs = llava(input_ids=ids, pixel_values=encoded.pixel_values).logits
    vocab = ours.shape[-1]
    assert torch.allclose(ours, theirs[..., :vocab], atol=1e-5)
    # The exported processor: its chat template and image-token expansion give our ids, its images our pixels.
    text = hf_processor.apply_chat_template(hf_messages(), add_generation_prompt=True, tokenize=False)
    inputs = hf_processor(text=text, images=[i.pixels for i in two_turns().slots], add_special_tokens=False,
                          return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encoded.rendered.input_ids
    assert torch.allclose(inputs["pixel_values"], encoded.pixel_values, atol=2e-2)
    # transformers generates from the export: greedy, its first token is our most likely next token.
    generated = llava.generate(input_ids=ids, pixel_values=encoded.pixel_values, max_new_tokens=2, do_sample=False)
    assert generated[0, ids.shape[1]].item() == ours[0, -1].argmax().item()


def test_parts_that_llava_cannot_hold_are_named(tmp_path):
    tiny, processor = build_model(tiny_config())  # our ViT + a resampler
    with pytest.raises(CheckpointError, match="vision tower 'tiny': our own small ViT.*connector 'resampler'"):
        export_hf(tiny, processor, tmp_path / "x")
    shuffle = dataclasses.replace(tiny_config(), connector="shuffle", tokens_per_image=4)
    with pytest.raises(CheckpointError, match="connector 'shuffle'"):
        export_hf(*build_model(shuffle), tmp_path / "x")
    blip2 = tiny_config(vision=VisionConfig(kind="blip2", config=tiny_blip2_config().to_dict(), image_size=32),
                        connector="linear")
    with pytest.raises(CheckpointError, match="vision tower 'blip2': BLIP-2's ViT \\+ Q-Former is no LLaVA"):
        export_hf(*build_model(blip2), tmp_path / "x")
    tiled = dataclasses.replace(tiny_config(), tiles=TileConfig(grid=(2, 2)))
    with pytest.raises(CheckpointError, match=r"tiles \(2, 2\): LLaVA's processor gives one view"):
        export_hf(*build_model(tiled), tmp_path / "x")
    mmca = dataclasses.replace(tiny_config(), attention="mmca")
    with pytest.raises(CheckpointError, match="attention 'mmca': LLaVA's LM attends causally"):
        export_hf(*build_model(mmca), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_chat_template_model_exports_its_own_template_with_our_images(tmp_path):
    from transformers import AutoProcessor

    model, _ = hf_model("mlp", CLIP)
    tokenizer = byte_tokenizer(("<image>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHATML
    config = dataclasses.replace(model.config, template="chat_template", system_prompt="Be brief.")
    model.config, processor = config, Processor(tokenizer, config)
    export_hf(model, processor, tmp_path / "hf")
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    encoded = processor.encode(two_turns(), generation=True)
    text = hf_processor.apply_chat_template(hf_messages(), add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare IMAGE#1<image> with")
    inputs = hf_processor(text=text, images=[i.pixels for i in two_turns().slots], add_special_tokens=False,
                          return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encoded.rendered.input_ids

"""Checkpoint folders and the original's `.pth` import, on scaled-down configs with the real key names."""

import json
from pathlib import Path

import pytest
import torch
from conftest import solid, tiny_config
from test_model import CLIP, tiny_blip2_config

from sparkles.config import SPARKLESCHAT_SYSTEM, LanguageConfig, VisionConfig
from sparkles.conversation import Conversation, Message, parse_markup, user_message
from sparkles.errors import CheckpointError
from sparkles.generate import Chat
from sparkles.model.checkpoint import compose_sparkleschat, import_projection, load_checkpoint, save_checkpoint
from sparkles.model.model import build_model
from sparkles.tokenizer import byte_tokenizer

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 1024}


def logits_for(model, processor):
    conversation = Conversation((user_message("IMAGE#1 or IMAGE#2?", [solid("red"), solid("blue")]),))
    encoded = processor.encode(conversation, generation=True)
    with torch.no_grad():
        return model(torch.tensor([encoded.rendered.input_ids]), encoded.pixel_values).logits


def test_a_full_checkpoint_reloads_to_identical_logits(tiny, tmp_path):
    model, processor = tiny
    save_checkpoint(model, processor, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    again, processor2 = load_checkpoint(tmp_path / "ck")
    assert torch.equal(logits_for(model, processor), logits_for(again, processor2))
    assert processor2.image_token_id == processor.image_token_id


def hf_parts(tmp_path):
    """A tiny CLIP vision folder and a tiny Llama folder with its tokenizer, as pretrained parts would come."""
    from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

    fields = dict(CLIP)
    AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(tmp_path / "clip")
    tokenizer = byte_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LLAMA)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "clip"), str(tmp_path / "llama")


def test_a_trainable_only_checkpoint_takes_frozen_parts_from_their_folders(tmp_path):
    clip, llama = hf_parts(tmp_path)
    config = tiny_config(vision=VisionConfig(kind="hf", path=clip, image_size=32),
                         language=LanguageConfig(kind="hf", path=llama), connector="mlp", tokens_per_image=16,
                         trainable=("connector",))
    model, processor = build_model(config)
    with torch.no_grad():
        model.connector.net[0].weight.mul_(3)  # "trained"
    save_checkpoint(model, processor, tmp_path / "adapter", trainable_only=True)
    from safetensors.torch import load_file

    assert all(k.startswith("connector.") for k in load_file(str(tmp_path / "adapter" / "model.safetensors")))
    again, processor2 = load_checkpoint(tmp_path / "adapter")
    assert torch.equal(logits_for(model.eval(), processor), logits_for(again, processor2))


def test_trainable_only_refuses_when_a_frozen_part_has_no_folder(tiny, tmp_path):
    model, processor = tiny
    with pytest.raises(CheckpointError, match="the frozen vision, lm would be lost"):
        save_checkpoint(model, processor, tmp_path / "x", trainable_only=True)
    assert not (tmp_path / "x").exists()


def test_resaving_replaces_the_folder_and_leaves_no_temporaries(tiny, tmp_path):
    model, processor = tiny
    save_checkpoint(model, processor, tmp_path / "ck")
    save_checkpoint(model, processor, tmp_path / "ck")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_resaving_swaps_in_one_step_so_the_folder_never_goes_missing(tiny, tmp_path, monkeypatch):
    from sparkles.model import checkpoint

    model, processor = tiny
    save_checkpoint(model, processor, tmp_path / "ck")
    seen = []

    def rename(self, target):  # with the exchange, the checkpoint is never renamed away
        seen.append((self.name, Path(target).name))
        return Path.replace(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    save_checkpoint(model, processor, tmp_path / "ck")
    if checkpoint._exchange(tmp_path / "ck", tmp_path / "ck"):  # this system swaps folders atomically
        assert seen == []
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_a_save_killed_between_its_renames_is_recovered(tiny, tmp_path, monkeypatch):
    from sparkles.model import checkpoint

    model, processor = tiny
    save_checkpoint(model, processor, tmp_path / "ck")
    before = logits_for(*load_checkpoint(tmp_path / "ck"))
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # a system without renameat2
    real = Path.rename

    def dies_after_moving_aside(self, target):
        real(self, target)
        if Path(target).name == ".ck.old":
            raise KeyboardInterrupt  # the kill, between the two renames

    monkeypatch.setattr(Path, "rename", dies_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, processor, tmp_path / "ck")
    monkeypatch.setattr(Path, "rename", real)
    assert not (tmp_path / "ck").exists()
    assert torch.equal(logits_for(*load_checkpoint(tmp_path / "ck")), before)  # the old one, moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_loading_bad_folders_says_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a Sparkles checkpoint config"):
        load_checkpoint(tmp_path)


def original_pth(path, out_dim, in_dim, **extra):
    """A dict shaped like the released sparkleschat_7b.pth (spec §5), scaled down."""
    state = {"llama_proj.weight": torch.randn(out_dim, in_dim), "llama_proj.bias": torch.randn(out_dim),
             "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
             **{f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}}
    state.update(extra)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"lr": 3e-5}},
                "scaler": None, "epoch": 4}, path)
    return state


def blip2_and_vicuna(tmp_path):
    from transformers import Blip2Model, LlamaConfig, LlamaForCausalLM

    Blip2Model(tiny_blip2_config()).save_pretrained(tmp_path / "blip2")
    tokenizer = byte_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LLAMA)).save_pretrained(tmp_path / "vicuna")
    tokenizer.save_pretrained(tmp_path / "vicuna")
    return str(tmp_path / "blip2"), str(tmp_path / "vicuna")


def test_import_projection_takes_llama_proj_and_checks_shapes(tmp_path):
    model, _ = build_model(tiny_config(vision=VisionConfig(kind="blip2", config=tiny_blip2_config().to_dict(),
                                                           image_size=32), connector="linear"))
    state = original_pth(tmp_path / "ok.pth", 32, 24)
    import_projection(tmp_path / "ok.pth", model)
    assert torch.equal(model.connector.proj.weight, state["llama_proj.weight"])
    assert torch.equal(model.connector.proj.bias, state["llama_proj.bias"])
    original_pth(tmp_path / "13b.pth", 40, 24)  # a bigger LLM's projection
    with pytest.raises(CheckpointError, match=r"shape \[40, 24\], the model expects \[32, 24\]"):
        import_projection(tmp_path / "13b.pth", model)
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no llama_proj.weight"):
        import_projection(tmp_path / "other.pth", model)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        import_projection(tmp_path / "junk.pth", model)
    with pytest.raises(CheckpointError, match="not found"):
        import_projection(tmp_path / "missing.pth", model)


def test_sparkleschat_composes_from_pth_blip2_and_vicuna_folders(tmp_path):
    blip2, vicuna = blip2_and_vicuna(tmp_path)
    state = original_pth(tmp_path / "sparkleschat_7b.pth", 32, 24)
    folder = compose_sparkleschat(str(tmp_path / "sparkleschat_7b.pth"), blip2, vicuna, tmp_path / "sparkleschat")
    model, processor = load_checkpoint(folder)
    assert torch.equal(model.connector.proj.weight, state["llama_proj.weight"])
    config = model.config
    assert (config.connector, config.tokens_per_image, config.image_token) == ("linear", 4, "<ImageHere>")
    assert config.system_prompt == SPARKLESCHAT_SYSTEM and config.trainable == ("connector",)
    # The original's markup, images and all, goes straight through the composed model.
    markup = "Compare IMAGE#1<Img><ImageHere></Img> with IMAGE#2<Img><ImageHere></Img>."
    conversation = Conversation((Message("user", parse_markup(markup, [solid("red"), solid("blue")])),))
    assert isinstance(Chat(model, processor).answer(conversation), str)
    text = processor.tokenizer.decode(processor.render(conversation, generation=True).input_ids)
    assert text.startswith("<s>Give the following image: <Img>ImageContent</Img>.")
    assert text.endswith("</Img>.###Assistant:")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_lm_loads_straight_in_the_target_dtype(tmp_path, monkeypatch, dtype):
    """No fp32 detour: transformers is asked for the dtype itself, and what comes back is already in it."""
    from transformers import AutoModelForCausalLM

    clip, llama = hf_parts(tmp_path)
    config = tiny_config(vision=VisionConfig(kind="hf", path=clip, image_size=32),
                         language=LanguageConfig(kind="hf", path=llama), connector="mlp", tokens_per_image=16)
    model, processor = build_model(config)
    save_checkpoint(model, processor, tmp_path / "adapter", trainable_only=True)
    real, asked = AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        asked.append(kwargs)
        lm = real(*args, **kwargs)
        asked.append({p.dtype for p in lm.parameters()})  # as transformers made it, before any cast of ours
        return lm

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = load_checkpoint(tmp_path / "adapter", dtype=dtype)
    assert asked == [{"dtype": dtype}, {dtype}]
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    # A full checkpoint builds its LM from the config in the dtype too, then reads the weights into it.
    save_checkpoint(model, processor, tmp_path / "full")
    full, _ = load_checkpoint(tmp_path / "full", dtype=dtype)
    assert {p.dtype for p in full.lm.parameters()} == {dtype}
    assert torch.allclose(full.lm.lm_head.weight.float(), model.lm.lm_head.weight.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_the_towers_are_made_and_read_in_the_target_dtype(tmp_path, monkeypatch, dtype):
    """The HF tower is asked for the dtype by transformers' own loader; the BLIP-2 tower (our module) is made in it:
    neither holds an fp32 copy on the way. The default dtype is left as it was."""
    from transformers import CLIPVisionModel

    from sparkles.model.vision import build_vision

    clip, _ = hf_parts(tmp_path)
    real, asked = CLIPVisionModel.from_pretrained, []

    def spy(*args, **kwargs):
        tower = real(*args, **kwargs)
        asked.append((kwargs.get("dtype"), {p.dtype for p in tower.parameters()}))
        return tower

    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", spy)
    tower = build_vision(VisionConfig(kind="hf", path=clip, image_size=32), dtype=dtype)
    assert asked == [(dtype, {dtype})] and {p.dtype for p in tower.parameters()} == {dtype}
    made = []
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: made.append(self.weight.dtype))
    blip2 = build_vision(VisionConfig(kind="blip2", config=tiny_blip2_config().to_dict(), image_size=32), dtype=dtype)
    assert set(made) == {dtype} and {p.dtype for p in blip2.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in build_vision(VisionConfig(kind="blip2", config=tiny_blip2_config().to_dict(),
                                                       image_size=32)).parameters()} == {torch.float32}

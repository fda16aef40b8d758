"""Export to the Hugging Face LLaVA layout, so that transformers' `LlavaForConditionalGeneration`, vLLM and SGLang
serve a Sparkles model at scale.

LLaVA is: an HF vision tower read at one hidden layer (CLS dropped or kept), a two-layer projector, an HF causal
LM, and `<image>` tokens in the text that receive the projected features. A Sparkles model fits when its parts are
those: an HF tower, a `linear` or `mlp` connector (a linear one becomes LLaVA's projector with an identity
activation and an identity second layer), and an HF causal LM. Anything else is refused with the part and why.

`sparkles export hf CKPT OUT` writes config.json, model.safetensors, generation_config.json, and the processor:
tokenizer, image processor (our squash-and-normalise transform) and a chat template that renders what our
renderer renders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .model import VisionLanguageModel

# The SparklesChat `###` template (spec §4.1, `template.SparklesTemplate`) in Jinja: images are labelled IMAGE#1,
# IMAGE#2, … in order of appearance, as our parser labels them; the open assistant turn ends "Assistant:".
SPARKLES_JINJA = (
    "{{ bos_token }}{% set ns = namespace(k=0) %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | map(attribute='text') | join('') %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = DEFAULT_SYSTEM %}{% set rest = messages %}{% endif %}"
    "{{ system }}###"
    "{% for m in rest %}"
    "{% if m['role'] == 'user' %}Human: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{% set ns.k = ns.k + 1 %}"
    "IMAGE#{{ ns.k }}PREFIX{{ image_token }}SUFFIX"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}###"
    "{% else %}Assistant: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'] | map(attribute='text') | join('') }}"
    "{% endif %}###{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# For a model on its tokenizer's own chat template: first flatten each message's content parts to text, writing an
# image as our renderer does (IMAGE#k, prefix, image token, suffix), and add our default system prompt; then the
# tokenizer's template, unchanged, renders the flattened messages.
FLATTEN_JINJA = (
    "{%- set ns = namespace(k=0, msgs=[]) -%}"
    "{%- if DEFAULT_SYSTEM and not (messages and messages[0]['role'] == 'system') -%}"
    "{%- set ns.msgs = [{'role': 'system', 'content': DEFAULT_SYSTEM}] -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
    "{%- else -%}{%- set text = namespace(s='') -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{%- set ns.k = ns.k + 1 -%}"
    "{%- set text.s = text.s ~ 'IMAGE#' ~ ns.k ~ 'PREFIX' ~ '{{ image_token }}' ~ 'SUFFIX' -%}"
    "{%- else -%}{%- set text.s = text.s ~ part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text.s}] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def check_exportable(model: VisionLanguageModel) -> None:
    """Raise CheckpointError naming each part that LLaVA cannot hold, and why."""
    from .vision import HFVisionTower

    config, problems = model.config, []
    if config.vision.extra is not None:
        problems.append("mixed vision towers (vision.extra): LLaVA reads one tower, not channels joined from two")
    elif not isinstance(model.vision, HFVisionTower):
        why = {"tiny": "our own small ViT has no Hugging Face class that vLLM or transformers could load",
               "blip2": "BLIP-2's ViT + Q-Former is no LLaVA vision tower (LLaVA reads one ViT layer directly)"}
        problems.append(f"vision tower {config.vision.kind!r}: {why.get(config.vision.kind, 'not an HF tower')}")
    if config.connector not in ("linear", "mlp"):
        problems.append(f"connector {config.connector!r}: LLaVA's projector is two linear layers around one "
                        "activation, per token; a resampler or a pixel shuffle changes the token count")
    if config.lora.r:
        problems.append("LoRA adapters: LLaVA has no adapters; merge them into the base weights first")
    if config.tiles.grid != (0, 0):
        problems.append(f"tiles {config.tiles.grid}: LLaVA's processor gives one view an image; the sub-image views "
                        "and skip tokens would be lost")
    if config.attention != "causal":
        problems.append(f"attention {config.attention!r}: LLaVA's LM attends causally; exported, the model would "
                        "silently attend another way than it was trained to")
    if config.adapter.kind != "none":
        problems.append(f"adapter {config.adapter.kind!r}: LLaVA's LM has no gated adapters and gives an image K "
                        "tokens, not one marker; exported, the model would lose what it learnt to read images with")
    if config.cross_attention.every:
        problems.append(f"cross_attention (every {config.cross_attention.every} layers): LLaVA's LM has no gated "
                        "cross-attention blocks and gives an image K tokens, not one marker; exported, the model "
                        "would lose what it learnt to read images with")
    if not hasattr(model.lm, "lm_head") or not hasattr(model.lm, "model"):
        problems.append(f"language model {type(model.lm).__name__}: expected an HF causal LM (…ForCausalLM)")
    if problems:
        raise CheckpointError("cannot export to the Hugging Face LLaVA layout: " + "; ".join(problems) +
                              " (exportable: an HF vision tower, a linear or mlp connector, an HF causal LM)")


def llava_config(model: VisionLanguageModel, image_token_id: int, vocab_size: int):
    """The `LlavaConfig` that describes this model: which layer is read, whether CLS is dropped, how many tokens."""
    from transformers import LlavaConfig

    tower, connector = model.vision, model.config.connector
    text_config = model.lm.config.to_dict() | {"vocab_size": vocab_size}
    return LlavaConfig(
        vision_config=tower.model.config.to_dict(), text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act="gelu" if connector == "mlp" else "linear",  # nn.GELU() is the exact (erf) GELU
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="default" if tower.drop else "full",
        image_seq_length=tower.num_tokens, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.lm.config, "tie_word_embeddings", False)))


def to_llava(model: VisionLanguageModel, image_token_id: int, vocab_size: int):
    """A `LlavaForConditionalGeneration` holding this model's weights (the LM's tables grown to `vocab_size`)."""
    from transformers import LlavaForConditionalGeneration

    check_exportable(model)
    llava = LlavaForConditionalGeneration(llava_config(model, image_token_id, vocab_size)).eval()
    dtype = next(model.lm.parameters()).dtype
    llava.to(dtype)
    inner = llava.model
    inner.vision_tower.load_state_dict(model.vision.model.state_dict())
    projector = inner.multi_modal_projector
    with torch.no_grad():
        if model.config.connector == "mlp":
            first, second = model.connector.net[0], model.connector.net[2]
            pairs = [(projector.linear_1, first), (projector.linear_2, second)]
        else:  # linear: W then identity, with the identity activation
            first = model.connector.proj
            width = first.out_features
            identity = torch.nn.Linear(width, width).to(dtype)
            identity.weight.copy_(torch.eye(width))
            identity.bias.zero_()
            pairs = [(projector.linear_1, first), (projector.linear_2, identity)]
        for target, source in pairs:
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
        _copy_lm(model.lm, inner.language_model, llava.lm_head)
    return llava


def _copy_lm(lm, language_model, lm_head) -> None:
    """The LM's body and head; rows past the LM's own table (the added image token) are zero. LLaVA looks the image
    token up before writing features over it, so it must have a row, though its value is never used."""
    state = lm.model.state_dict()
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    rows = language_model.get_input_embeddings().weight.shape[0]
    state[embed_key] = _grow(state[embed_key], rows)
    language_model.load_state_dict(state)
    lm_head.weight.copy_(_grow(lm.lm_head.weight.detach(), rows))


def _grow(table: torch.Tensor, rows: int) -> torch.Tensor:
    if table.shape[0] >= rows:
        return table
    return torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])


def processor_for(model: VisionLanguageModel, processor):
    """A `LlavaProcessor`: our tokenizer, our image transform (a bicubic squash, no crop), our template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    config, tower = model.config, model.vision
    size = config.vision.image_size
    images = CLIPImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3,
                                do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                image_mean=list(config.vision.image_mean), image_std=list(config.vision.image_std),
                                do_convert_rgb=True)
    own = config.template == "chat_template"
    ours = (FLATTEN_JINJA if own else SPARKLES_JINJA).replace("DEFAULT_SYSTEM", json.dumps(config.system_prompt))
    ours = (ours.replace("PREFIX", processor.template.image_prefix).replace("SUFFIX", processor.template.image_suffix)
            .replace("{{ image_token }}", config.image_token))
    template = ours + processor.tokenizer.chat_template if own else ours
    return LlavaProcessor(image_processor=images, tokenizer=processor.tokenizer,
                          patch_size=tower.model.config.patch_size,
                          vision_feature_select_strategy="default" if tower.drop else "full",
                          num_additional_image_tokens=int(tower.has_cls), image_token=config.image_token,
                          chat_template=template)


def export_hf(model: VisionLanguageModel, processor, out: str | os.PathLike) -> Path:
    """Write `out` in the LLaVA layout; raises CheckpointError (naming the part) for a model that does not fit."""
    check_exportable(model)
    out = Path(out)
    vocab_size = max(len(processor.tokenizer), model.lm.get_input_embeddings().weight.shape[0])
    llava = to_llava(model, processor.image_token_id, vocab_size)
    # Our stop strings ("###") are text, not tokens: serving must pass them as stop strings (see the README).
    llava.generation_config.eos_token_id = list(processor.stop_ids) or None
    llava.generation_config.suppress_tokens = [processor.image_token_id]  # its row is zero: never generate it
    llava.save_pretrained(out)
    processor_for(model, processor).save_pretrained(out)
    return out


def add_cli(commands) -> None:
    parser = commands.add_parser("export", help="write a checkpoint for other runtimes (Hugging Face LLaVA layout)")
    sub = parser.add_subparsers(title="formats")
    parser.set_defaults(run=lambda args: parser.print_help() or 2)
    hf = sub.add_parser("hf", help="the HF LLaVA layout: transformers, vLLM and SGLang load it")
    hf.add_argument("checkpoint", help="a Sparkles checkpoint folder")
    hf.add_argument("out", help="the folder to write")
    hf.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="the weights' dtype (default: the checkpoint's)")
    hf.set_defaults(run=_run_hf)


def _run_hf(args) -> int:
    from .checkpoint import load_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor = load_checkpoint(args.checkpoint, dtype=dtype)
    out = export_hf(model, processor, args.out)
    print(f"wrote {out} (LlavaForConditionalGeneration; stop on {list(processor.stop_strings)})")
    return 0

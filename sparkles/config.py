"""Typed configuration: frozen dataclasses, named presets, dotted overrides and JSON round trips.

Configs are data. They are read once, by the builders in `model.py`, and never mutated; `override` returns a new
config. Training configs join this file with the training issue.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The original's inference system prompt (spec §4.1), kept verbatim for the imported SparklesChat-7B.
SPARKLESCHAT_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                       "provide it to you. Please answer my questions.")
# Ours: written for several images, and used in training as well as chat (the original trained without one).
MULTI_IMAGE_SYSTEM = ("You see the images the user shows, each named IMAGE#k where it appears. "
                      "Answer about them, naming each image you talk about.")


@dataclass(frozen=True)
class VisionConfig:
    kind: Literal["tiny", "hf", "blip2"] = "tiny"  # our small ViT | any HF vision model | BLIP-2 ViT + Q-Former
    path: str | None = None  # local folder or hub id of pretrained weights (hf, blip2)
    config: dict = field(default_factory=dict)  # tiny: ViT sizes; hf/blip2: the HF config, to build without weights
    feature_layer: int = -1  # hidden state the connector reads (LLaVA uses -2)
    drop_cls: bool = True  # drop a leading CLS token so only patch tokens remain
    image_size: int = 224  # images are squashed to this square size, as the original does
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # A second tower whose features are joined to this one's along channels, token by token (SPHINX's mixed visual
    # embeddings, `model/mixed.py`); None = this tower alone. Its own `extra` adds a third.
    extra: VisionConfig | None = None


@dataclass(frozen=True)
class LanguageConfig:
    kind: Literal["tiny", "hf"] = "tiny"  # a small causal LM built from config | any HF causal LM
    path: str | None = None  # local folder or hub id of pretrained weights
    config: dict = field(default_factory=dict)  # tiny: LlamaConfig fields; hf: the HF config, to build without weights
    tokenizer: str | None = None  # tokenizer folder or id; None = `path`, or our byte tokenizer for "tiny"


@dataclass(frozen=True)
class LoraConfig:
    r: int = 0  # rank; 0 = no LoRA
    alpha: int = 16
    dropout: float = 0.0
    # Module names inside the LM (and the vision tower), and in the cross-attention blocks (model.cross_attention):
    # to_q, to_kv, to_out, ff_in, ff_out, as MultiModal-GPT's LoRA reaches them
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    vision: bool = False  # also put LoRA on the vision tower (HF towers only)


@dataclass(frozen=True)
class TileConfig:
    """SPHINX's high resolution (`model/tiles.py`): each image is seen whole (the global view) and as a grid of
    sub-image tiles of the same size, each encoded by the tower and the connector as an image of its own; the LM
    gets K tokens per view, so an image costs (1 + rows × cols) × K tokens, less what skipped tiles save."""

    grid: tuple[int, int] = (0, 0)  # (rows, cols) of tiles beside the global view; (0, 0) = off; SPHINX-1k: (2, 2)
    skip_empty: bool = True  # SPHINX-X: a tile that holds only padding costs one learned skip token instead of K


@dataclass(frozen=True)
class VisualCacheConfig:
    """ImageBind-LLM's visual cache (`model/visual_cache.py`), at inference only: an image's tower features are
    blended with those of its k nearest images in a cache built from a folder: f' = (1 - w)·f + w·Σ softmax(t·s)ᵢ fᵢ."""

    path: str | None = None  # a cache file from `sparkles visual-cache build`; None = off
    k: int = 10  # neighbours blended in (ImageBind-LLM's cache_size)
    weight: float = 0.5  # w, the share of the neighbours' features (cache_weight); 0 leaves features unchanged
    temperature: float = 20.0  # t, on cosine similarities (cache_t)


@dataclass(frozen=True)
class AdapterConfig:
    """LLaMA-Adapter's and ImageBind-LLM's zero-init gated adapters (`model/adapters.py`): an image costs the LM one
    marker position, and the text after it reads the image through adapters in the LM's layers, whose tanh(gate)
    starts at 0 so that a new model computes exactly what its LM did. Each position reads the most recent image at
    or before it (pooled to one vector); nothing before the first image: causal, so cached turns stay valid."""

    kind: Literal["none", "llama-adapter", "imagebind"] = "none"  # none = off: images are K tokens in the text
    layers: int = 0  # the top `layers` LM layers get adapters; 0 = all (LLaMA-Adapter: the top 30 of 32)
    prompt_len: int = 10  # llama-adapter: adaption prompt tokens per adapted layer (LLaMA-Adapter's adapter_len)


@dataclass(frozen=True)
class CrossAttentionConfig:
    """Flamingo's gated cross-attention, as MultiModal-GPT uses it (`model/cross_attention.py`): an image costs the
    LM one marker position, and gated blocks before every `every`-th LM layer let the text attend to the K connector
    tokens of the images at or before it. Their tanh gates start at 0, so a new model computes what its LM did."""

    every: int = 0  # a block before every k-th LM layer (Flamingo's cross_attn_every_n_layers; OpenFlamingo-9B: 4)
    # Which images a text position attends to: "previous", Flamingo's immediately preceding image only; "all", every
    # image so far (the former cannot compare two images in one attention, spec/peers.md §7.2)
    sees: Literal["previous", "all"] = "previous"
    heads: int = 8  # attention heads of a block (OpenFlamingo: 8)
    head_dim: int = 64  # width of each (OpenFlamingo: 64)
    ff_mult: int = 4  # the block's feed-forward is ff_mult × the LM's width (OpenFlamingo: 4)


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = VisionConfig()
    language: LanguageConfig = LanguageConfig()
    connector: Literal["linear", "mlp", "resampler", "shuffle"] = "mlp"
    tokens_per_image: int = 16  # K: image tokens per image after the connector (SparklesChat: 32)
    template: Literal["sparkles", "chat_template"] = "sparkles"  # `###Human:` form, or the tokenizer's own
    system_prompt: str = MULTI_IMAGE_SYSTEM  # "" for none
    image_token: str = "<image>"  # the special token whose positions receive image embeddings
    max_images: int = 16  # per conversation
    max_seq_len: int = 2048  # prompt + answer, in tokens
    trainable: tuple[str, ...] = ("connector",)  # parts that learn: any of vision, connector, lm
    lora: LoraConfig = LoraConfig()  # adapters on the frozen LM; part of the model's structure, so saved with it
    tiles: TileConfig = TileConfig()  # sub-image tiles and skip tokens (SPHINX / SPHINX-X); off by default
    visual_cache: VisualCacheConfig = VisualCacheConfig()  # ImageBind-LLM's training-free cache; off by default
    # How the LM attends (model/attention.py). "causal": the LM's own attention, unchanged. "mmca": DeepSpeed-
    # VisualChat's multi-modal causal attention as its blog states it: text rows add a softmax over earlier text to
    # one over earlier image tokens; image rows see image tokens only. "mmca-image-sees-text": as its code does it,
    # image rows also see earlier text. Both MMCA forms need no new weights, but no fused kernel fits them.
    attention: Literal["causal", "mmca", "mmca-image-sees-text"] = "causal"
    adapter: AdapterConfig = AdapterConfig()  # LLaMA-Adapter / ImageBind-LLM gated adapters; off by default
    cross_attention: CrossAttentionConfig = CrossAttentionConfig()  # Flamingo / MultiModal-GPT; off by default


def reader_switch(config: ModelConfig) -> str | None:
    """The setting under which images are one marker position, read inside the LM's layers (adapters or
    cross-attention, `model/layer_state.py`), as a message names it; None for neither."""
    if config.adapter.kind != "none":
        return f"model.adapter.kind={config.adapter.kind}"
    if config.cross_attention.every:
        return f"model.cross_attention.every={config.cross_attention.every}"
    return None


def check_reader_switches(config: ModelConfig) -> bool:
    """Whether images are one marker position (`reader_switch`); ConfigError for the switches that cannot go with
    that, or with each other."""
    both = config.adapter.kind != "none" and config.cross_attention.every
    if both:
        raise ConfigError("model.adapter and model.cross_attention cannot go together: each reads the images in the "
                          "LM's layers in its own way; choose one")
    name = reader_switch(config)
    if name and config.tiles.grid != (0, 0):
        raise ConfigError(f"{name} and model.tiles cannot go together: an image there is one marker position, "
                          "with no room for sub-image views")
    return name is not None


# Bounds of SamplingParams: OpenAI's 4 stop sequences (each at most MAX_STOP_CHARS long, so that checking each new
# token against them costs a bounded time), the seeds torch takes, and penalties that keep logits finite.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MIN_SEED, MAX_SEED = -2**63, 2**64 - 1
MAX_REPETITION_PENALTY = 10.0
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily: dividing logits by it would overflow


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; HF's rule: divide positive logits, multiply negative ones
    stop: tuple[str, ...] = ()  # extra stop strings; the template's own stop is always added
    seed: int | None = None

    def __post_init__(self):
        finite = all(isinstance(v, (int, float)) and math.isfinite(v)
                     for v in (self.temperature, self.top_p, self.repetition_penalty))
        checks = [("", finite, "temperature, top_p and repetition_penalty must be finite numbers"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  ("temperature", self.temperature >= 0, "temperature must be >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  ("top_k", self.top_k >= 0, "top_k must be >= 0"),
                  ("repetition_penalty", 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
                   f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]"),
                  ("seed", self.seed is None or MIN_SEED <= self.seed <= MAX_SEED,
                   f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}]"),
                  ("stop", len(self.stop) <= MAX_STOPS, f"stop must hold at most {MAX_STOPS} strings"),
                  ("stop", all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                   f"each stop string must have 1 to {MAX_STOP_CHARS} characters")]
        for name, ok, message in checks:
            if not ok:
                got = getattr(self, name) if name else (self.temperature, self.top_p, self.repetition_penalty)
                if name == "stop":
                    got = [f"{s[:20]}… ({len(s)} characters)" if len(s) > 20 else s for s in got[:MAX_STOPS + 1]]
                raise ConfigError(f"{message}, got {got!r}")


# A tiny model for tests and smoke runs: 64-pixel images, 16 image tokens, a 2-layer LM over a byte vocabulary.
TINY = ModelConfig(
    vision=VisionConfig(kind="tiny", image_size=64, config={"patch_size": 8, "width": 64, "depth": 2, "heads": 4}),
    language=LanguageConfig(kind="tiny", config={"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "num_key_value_heads": 4,
                                                 "max_position_embeddings": 2048}),
    connector="resampler", tokens_per_image=16, max_seq_len=2048)


Kind = Literal["auto", "sparkles", "sparkles_turns", "llava", "captions", "text", "jsonl"]


@dataclass(frozen=True)
class DataSource:
    path: str  # a JSON list or JSONL file
    kind: Kind = "auto"  # detected from the first record when "auto"
    ratio: float = 1.0  # relative sampling weight in a blend (the original's sample_ratio)
    images: str | None = None  # folder that relative image paths and image ids resolve against
    loss_on: Literal["last", "all"] = "last"  # SparklesDialogue: one sample per turn (last) or one per dialogue (all)


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = ()
    max_len: int = 1024  # tokens per sample; longer ones are cut, never inside an image
    group_by_length: bool = True  # batch samples of similar length together: less padding
    pack: bool = False  # pack several samples into one row (block-diagonal attention)
    strict: bool = False  # a bad record fails the run instead of being skipped and counted
    num_workers: int = 0  # data-loader worker processes (image decoding)


@dataclass(frozen=True)
class OptimConfig:
    lr_vision: float = 0.0  # per-part peak learning rates; 0 freezes the part
    lr_connector: float = 1e-3
    lr_lm: float = 0.0  # with LoRA, the rate of the LM's adapters
    weight_decay: float = 0.05  # on matrices only, never on biases or norms
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "original", "constant"] = "cosine"  # "original": spec §6.2, cosine over all steps
    warmup_steps: int = 0
    warmup_start: float = 0.0  # fraction of the peak the warm-up starts from (the original: 1e-6 / 3e-5)
    min_lr: float = 0.1  # fraction of the peak the cosine ends at (the original: 1e-5 / 3e-5)
    max_steps: int = 100  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget across resumes (0 = none): stop at it or max_steps, whichever first
    batch_size: int = 8  # samples per process and micro-step
    grad_accum: int = 1
    clip: float = 1.0  # gradient-norm clipping; 0 = off (the original did not clip)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a gradient scaler (CUDA)


@dataclass(frozen=True)
class Stage:
    """One stage of a staged recipe: its kind of training and the overrides that make it from the recipe."""

    name: str
    kind: str = "vlm"  # "vlm": the training loop; others are registered (`train.stages.STAGE_KINDS`)
    overrides: tuple[str, ...] = ()  # key=value, as on the command line; the command line's own come after


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = TINY
    init: str | None = None  # start from this checkpoint folder's weights (e.g. an imported SparklesChat)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    out: str = "runs/train"  # checkpoints/, metrics.jsonl, train.log and the final model/ go here
    save_every: int = 50  # steps between resumable checkpoints
    keep_last: int = 3  # resumable checkpoints kept
    log_every: int = 1
    seed: int = 0
    strategy: Literal["ddp", "fsdp2"] = "ddp"  # how several processes share the work under torchrun
    activation_checkpointing: bool = False
    export: Literal["all", "trainable"] = "all"  # what the final model/ folder holds
    max_nonfinite: int = 5  # optimizer steps in a row with a NaN/inf loss or gradient that stop the run
    eval_every: int = 0  # steps between evaluations during training (0 = never); rows go to metrics.jsonl
    eval_n: int = 16  # items per task type in each of those evaluations (and as many on grey images)
    evaluator: str = "world"  # a registered evaluator (`train.evaluators.EVALUATORS`): what eval_every scores
    stages: tuple[Stage, ...] = ()  # run in order, each in out/<k>-<name>/ and starting from the one before


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Build a (nested) config dataclass from plain data, rejecting unknown keys with the list of valid ones."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, key) for key, value in data.items()}
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    """Turn JSON or command-line values into the field's type (tuples from lists, dataclasses from dicts)."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return value if isinstance(value, kind) else from_dict(kind, value)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or value == "None":
            return None
        return _coerce(options[0], value, key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = typing.get_args(kind)[0]
        return tuple(_coerce(inner, v, key) for v in items if v != "")
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(kind))}, got {value!r}")
        return value
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if kind in (int, float, str) and not isinstance(value, kind):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}") from None
    if kind is dict and isinstance(value, str):
        return json.loads(value)
    return value


def override(config: Any, overrides: dict[str, Any]) -> Any:
    """Apply dotted `key=value` overrides (``vision.image_size=64``) to a config, returning a new one."""
    for dotted, value in overrides.items():
        config = _set(config, dotted.split("."), value, dotted)
    return config


def _set(config: Any, keys: list[str], value: Any, dotted: str) -> Any:
    names = {f.name for f in dataclasses.fields(config)}
    if keys[0] not in names:
        raise ConfigError(f"unknown key {dotted!r}; valid keys here: {sorted(names)}")
    current = getattr(config, keys[0])
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{dotted!r}: {keys[0]} has no sub-keys")
        new = _set(current, keys[1:], value, dotted)
    else:
        new = _coerce(typing.get_type_hints(type(config))[keys[0]], value, dotted)
    return dataclasses.replace(config, **{keys[0]: new})

"""Training recipes: named presets, YAML configs, `key=value` overrides, and the `sparkles train` command.

Imports no torch: building a config, checking it and printing it are instant; `train.py` does the work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from ..config import (
    TINY,
    AdapterConfig,
    CrossAttentionConfig,
    DataConfig,
    DataSource,
    LanguageConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    Stage,
    TileConfig,
    TrainConfig,
    VisionConfig,
    from_dict,
    override,
    to_dict,
)
from ..errors import ConfigError

# The embedded default model: our ViT on 64-pixel images (8×8 patches), a 2×2 pixel-shuffle connector that hands
# the LM 16 tokens per image with every patch intact, and a 4-layer LM over a BPE vocabulary fitted to the shapes
# world, trained from scratch on items drawn on the fly.
DEFAULT_MODEL = ModelConfig(
    vision=VisionConfig(kind="tiny", image_size=64, config={"patch_size": 8, "width": 128, "depth": 2, "heads": 4}),
    language=LanguageConfig(kind="tiny", tokenizer="world-bpe", config={
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 1024}),
    connector="shuffle", tokens_per_image=16, max_seq_len=1024, trainable=("vision", "connector", "lm"))

PRESETS: dict[str, TrainConfig] = {
    # A tiny randomly initialised model that trains every part in seconds on a CPU: for tests and smoke runs.
    "tiny": TrainConfig(
        model=TINY,
        data=DataConfig(max_len=512),
        optim=OptimConfig(lr_vision=1e-3, lr_connector=1e-3, lr_lm=1e-3, warmup_steps=2, max_steps=20,
                          batch_size=4),
        out="runs/tiny", save_every=10),
    # The paper's recipe (spec §6): frozen EVA-ViT-g + Q-Former and Vicuna-7B; only the projection learns, AdamW
    # 3e-5 peak, warm-up 400 steps from 1e-6, cosine to 1e-5 over 2000 steps, 8 samples a step, no clipping.
    # Point model.vision.path / model.language.path at the BLIP-2 and Vicuna folders, and init= at a folder made
    # by `sparkles convert sparkleschat --pth minigpt4_7b_stage1.pth …` to start where the paper started.
    # The paper trains on "<s>###Human: …###Assistant: …###" with no system prompt (spec §4.2); the inference
    # prompt (SPARKLESCHAT_SYSTEM) was only ever prepended at chat time (§4.4), so it is not trained on here.
    "sparkleschat-7b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="blip2", path="BLIP2_DIR", image_size=224),
                          language=LanguageConfig(kind="hf", path="VICUNA_DIR"), connector="linear",
                          tokens_per_image=32, system_prompt="", image_token="<ImageHere>",
                          max_seq_len=2000, trainable=("connector",)),
        data=DataConfig(max_len=1024, num_workers=4),
        optim=OptimConfig(lr_connector=3e-5, weight_decay=0.05, schedule="original", warmup_steps=400,
                          warmup_start=1e-6 / 3e-5, min_lr=1e-5 / 3e-5, max_steps=2000, batch_size=1, clip=0.0,
                          precision="bf16"),
        out="runs/sparkleschat-7b", save_every=400, export="trainable"),
    # DeepSpeed-VisualChat's 7B recipe (../shared/spec/peers.md §1): CLIP ViT-L/14 at 224 px keeping its CLS token
    # (257 tokens an image), a linear projection, LLaMA-2-7B attending with multi-modal causal attention as DSVC's
    # code does (image rows see earlier text); tower and LM frozen, at most 8 images and 4,096 positions a sample.
    # AdamW 1e-3, betas (0.9, 0.95), no weight decay, cosine after a 10 % warm-up, clip 1.0; a global batch of 128
    # (1 a GPU x 16 accumulated on 8 GPUs). DSVC also trains a copy of the LM's token embeddings: `optim.lr_lm`
    # with LoRA on the LM is our nearest; its LayerNorm after the projection is left out.
    "deepspeed-visualchat-7b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="hf", path="CLIP_VIT_L14_DIR", image_size=224, drop_cls=False),
                          language=LanguageConfig(kind="hf", path="LLAMA2_7B_DIR"), connector="linear",
                          tokens_per_image=257, attention="mmca-image-sees-text", max_images=8, max_seq_len=4096,
                          trainable=("connector",)),
        data=DataConfig(max_len=4096, num_workers=4),
        optim=OptimConfig(lr_connector=1e-3, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=300, min_lr=0.0,
                          max_steps=3000, batch_size=1, grad_accum=16, clip=1.0, precision="bf16"),
        out="runs/deepspeed-visualchat-7b", save_every=500, export="trainable"),
    # SPHINX-1k's recipe as far as our parts reach (peers.md §2): CLIP ViT-L/14 and DINOv2 ViT-L/14 side by side at
    # 224 px, 257 tokens each joined along channels (SPHINX adds a ConvNeXt-XXL and a Q-Former), a global view plus
    # 2x2 tiles an image with SPHINX-X's skip tokens, LLaMA-2-13B trained in full with the connector; lr 2e-5, no
    # weight decay, a 3 % warm-up, clip 8, batch 4 x 4 accumulated a GPU, 512 words a sample in its fine-tuning,
    # here 4,096 positions, since five views of 257 tokens fill 1,285 of them.
    "sphinx-1k-13b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="hf", path="CLIP_VIT_L14_DIR", image_size=224, drop_cls=False,
                                              extra=VisionConfig(kind="hf", path="DINOV2_VIT_L14_DIR", image_size=224,
                                                                 drop_cls=False, image_mean=(0.485, 0.456, 0.406),
                                                                 image_std=(0.229, 0.224, 0.225))),
                          language=LanguageConfig(kind="hf", path="LLAMA2_13B_DIR"), connector="linear",
                          tokens_per_image=257, tiles=TileConfig(grid=(2, 2)), max_seq_len=4096,
                          trainable=("connector", "lm")),
        data=DataConfig(max_len=4096, num_workers=4),
        optim=OptimConfig(lr_connector=2e-5, lr_lm=2e-5, weight_decay=0.0, warmup_steps=100, min_lr=0.0,
                          max_steps=3000, batch_size=4, grad_accum=4, clip=8.0, precision="bf16"),
        out="runs/sphinx-1k-13b", save_every=500, activation_checkpointing=True),
    # LLaMA-Adapter V1's multimodal recipe (peers.md §3.1, §3.5): CLIP ViT-L/14's tokens (its global one
    # included), pooled and projected onto adaption prompts of 10 tokens in the top 30 of LLaMA-7B's 32 layers,
    # zero-init gated; LM and tower frozen. AdamW at blr 9e-3 x 32 / 256, weight decay 0.02, 5 epochs of Alpaca's 52k
    # at 32 a step (8 GPUs x 4; here 4 x 8 accumulated), the first 2 warming up, 512 tokens; no clipping.
    "llama-adapter-7b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="hf", path="CLIP_VIT_L14_DIR", image_size=224, drop_cls=False),
                          language=LanguageConfig(kind="hf", path="LLAMA_7B_DIR"), connector="linear",
                          tokens_per_image=257, adapter=AdapterConfig(kind="llama-adapter", layers=30, prompt_len=10),
                          max_seq_len=512, trainable=("connector",)),
        data=DataConfig(max_len=512, num_workers=4),
        optim=OptimConfig(lr_connector=9e-3 * 32 / 256, weight_decay=0.02, warmup_steps=3250, min_lr=0.0,
                          max_steps=8125, batch_size=4, grad_accum=8, clip=0.0, precision="bf16"),
        out="runs/llama-adapter-7b", save_every=1000, export="trainable"),
    # ImageBind-LLM's first phase (peers.md §3.3, §3.5): one global image feature through a bind network (our MLP
    # connector) added to every layer of LLaMA-7B through zero-init gates, attention-free. ImageBind's encoder has no
    # transformers port: CLIP ViT-L/14 stands in for it. Bind network and gates learn at blr 1e-4 x 32 / 256, weight
    # decay 0.05, 32 a step; its second phase (LM norms, biases and LoRA on instructions) is a separate run.
    "imagebind-llm-7b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="hf", path="CLIP_VIT_L14_DIR", image_size=224, drop_cls=False),
                          language=LanguageConfig(kind="hf", path="LLAMA_7B_DIR"), connector="mlp",
                          tokens_per_image=257, adapter=AdapterConfig(kind="imagebind"), max_seq_len=512,
                          trainable=("connector",)),
        data=DataConfig(max_len=512, num_workers=4),
        optim=OptimConfig(lr_connector=1e-4 * 32 / 256, weight_decay=0.05, warmup_steps=500, min_lr=0.0,
                          max_steps=20000, batch_size=4, grad_accum=8, clip=0.0, precision="bf16"),
        out="runs/imagebind-llm-7b", save_every=1000, export="trainable"),
    # MultiModal-GPT on OpenFlamingo-9B (peers.md §4): CLIP ViT-L/14's patch tokens, a resampler to 64 latents,
    # LLaMA-7B with a gated cross-attention block before every 4th layer, each text token seeing the image just
    # before it; LoRA r 16, alpha 16 on self-attention, cross-attention and its feed-forward. AdamW 1e-5, weight decay
    # 0.1, cosine after 100 warm-up steps, 1 a GPU x 16 accumulated on 8 GPUs (here 1 x 128), 512 tokens, one epoch
    # of its ~165k visual samples. MultiModal-GPT starts from OpenFlamingo's trained blocks and resampler and keeps
    # them and the gates frozen; with no converter for that checkpoint here, ours start new, so they learn too.
    "multimodal-gpt-9b": TrainConfig(
        model=ModelConfig(vision=VisionConfig(kind="hf", path="CLIP_VIT_L14_DIR", image_size=224),
                          language=LanguageConfig(kind="hf", path="LLAMA_7B_DIR"), connector="resampler",
                          tokens_per_image=64, cross_attention=CrossAttentionConfig(every=4, sees="previous"),
                          lora=LoraConfig(r=16, alpha=16, dropout=0.0,
                                          targets=("q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out",
                                                   "ff_in", "ff_out")),
                          max_seq_len=512, trainable=("connector", "lm")),
        data=DataConfig(max_len=512, num_workers=4),
        optim=OptimConfig(lr_connector=1e-5, lr_lm=1e-5, weight_decay=0.1, warmup_steps=100, min_lr=0.0,
                          max_steps=1300, batch_size=1, grad_accum=128, clip=1.0, precision="bf16"),
        out="runs/multimodal-gpt-9b", save_every=200, export="trainable"),
    # The recipe of the embedded default model, perception first (issue 10; the README tells the story): the tower
    # learns to name each patch's object from the world's labels; then, the tower frozen, the LM learns to read
    # its tokens on captions; then every task type, captions kept in the blend.
    "default": TrainConfig(
        model=DEFAULT_MODEL,
        data=DataConfig(sources=(DataSource("world:caption", ratio=2), DataSource("world:dialogue/worked", ratio=4),
                                 DataSource("world:bison/worked", ratio=3), DataSource("world:nlvr2/worked", ratio=3)),
                        max_len=512, group_by_length=True),
        optim=OptimConfig(lr_vision=0.0, lr_connector=1e-3, lr_lm=1e-3, warmup_steps=100, min_lr=0.05,
                          max_steps=1000, batch_size=32, clip=1.0, precision="fp32"),
        out="runs/default", save_every=100, keep_last=2, seed=0, eval_every=100, eval_n=16,
        stages=(Stage("perception", "perception", ("optim.lr_vision=1e-3", "optim.max_steps=3000",
                                                    "optim.batch_size=64", "optim.warmup_steps=50", "save_every=250")),
                Stage("captions", "vlm", ("data=world:caption",)),
                Stage("tasks", "vlm", ("optim.max_steps=1200",)),
                # Stages 4-5 were run on one GPU (16 cores: pass workers=15), each bounded by optim.max_minutes
                # (8 and 3.9); their steps are where those budgets ended. On 2 CPU cores they would take a day.
                Stage("more-tasks", "vlm", ("optim.max_steps=4647", "optim.batch_size=256", "save_every=1000",
                                            "eval_every=1000")),
                Stage("anneal", "vlm", ("optim.max_steps=2274", "optim.batch_size=256", "optim.lr_connector=3e-4",
                                        "optim.lr_lm=3e-4", "optim.warmup_steps=50", "save_every=1000",
                                        "eval_every=1000")),
                # Back on 2 CPU cores (25 minutes): dialogues of 2 to 3 turns, since `sparkles demo` asks three and
                # a model trained on two answered every third turn with the tail of a worked answer.
                Stage("three-turns", "vlm", ("data=world:caption:2,world:dialogue/worked?turns=3:4,"
                                             "world:bison/worked:3,world:nlvr2/worked:3", "optim.lr_connector=1e-4",
                                             "optim.lr_lm=1e-4", "optim.warmup_steps=20", "optim.max_steps=600",
                                             "eval_every=300")))),
}

# Short names for the overrides people type most; anything else is a dotted path into TrainConfig.
SHORTCUTS = {"max_steps": "optim.max_steps", "batch_size": "optim.batch_size", "lr": "optim.lr_connector",
             "precision": "optim.precision", "max_len": "data.max_len", "workers": "data.num_workers"}


def build_config(config_file: str | None = None, preset: str | None = None,
                 overrides: list[str] = ()) -> TrainConfig:
    """A preset or YAML/JSON file (which may itself name a `preset`), then `key=value` overrides in order."""
    base = TrainConfig()
    if preset is not None:
        base = _preset(preset)
    if config_file is not None:
        data = _read_config_file(config_file)
        if "preset" in data:
            base = _preset(data.pop("preset"))
        base = _merge(base, data)
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return _apply(base, pairs)


def _preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml  # only for YAML: a JSON config runs where PyYAML is not installed

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(e) from None
        else:
            data = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError is one
        raise ConfigError(f"{path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _merge(base: TrainConfig, data: dict) -> TrainConfig:
    """Fields of a config file replace the preset's, one level deep for the nested sections."""
    merged = to_dict(base)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return from_dict(TrainConfig, merged)


def _apply(config: TrainConfig, pairs: list[tuple[str, str]]) -> TrainConfig:
    data = [v for k, v in pairs if k == "data"]
    images = [v for k, v in pairs if k == "images"]
    if data:
        sources = [_source(item) for value in data for item in value.split(",") if item]
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, sources=tuple(sources)))
    if images:
        sources = tuple(dataclasses.replace(s, images=images[-1]) for s in config.data.sources)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, sources=sources))
    rest = {SHORTCUTS.get(k, k): v for k, v in pairs if k not in ("data", "images")}
    return override(config, rest)


def _source(item: str) -> DataSource:
    """``path`` or ``path:ratio`` (the original's sample_ratio)."""
    path, _, ratio = item.rpartition(":") if item.rsplit(":", 1)[-1].replace(".", "", 1).isdigit() else (item, "", "")
    try:
        return DataSource(path=path, ratio=float(ratio) if ratio else 1.0)
    except ValueError:
        raise ConfigError(f"bad data source {item!r}: expected PATH or PATH:RATIO") from None


def add_cli(commands) -> None:
    parser = commands.add_parser("train", help="train or fine-tune a model (one process or torchrun)",
                                 description="Train with a preset or a YAML config, plus key=value overrides. "
                                 "Under torchrun, every process runs the same command.")
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="an optional config file, then overrides such as data=a.json:2,b.json:1 images=DIR "
                        "out=DIR max_steps=N save_every=N seed=N optim.lr_lm=1e-4")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named recipe")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out")
    parser.add_argument("--print-config", action="store_true", help="print the final config and stop")
    parser.add_argument("--curves", metavar="RUN_DIR", help="draw a run's learning curves (curves.svg, curves.md) "
                        "from its metrics.jsonl files and stop")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    if args.curves:
        from .curves import write_curves

        svg, md = write_curves(args.curves)
        print(f"curves: {svg}\ntable:  {md}")
        return 0
    files = [i for i in args.items if "=" not in i]
    if len(files) > 1:
        raise ConfigError(f"one config file at most, got {files}")
    overrides = [i for i in args.items if "=" in i]
    config = build_config(files[0] if files else None, args.preset, overrides)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if config.stages:
        from .stages import run_stages

        final = run_stages(config, overrides, _apply, resume=args.resume)
    else:
        from .loop import train

        final = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        from .curves import write_curves

        svg, _ = write_curves(config.out)
        print(f"model: {final}\ncurves: {svg}")
    return 0

"""Vision towers: images (N, 3, H, W) -> features (N, P, C), behind one small protocol.

Three towers: our own small ViT for models trained from scratch; any Hugging Face vision model (CLIP, SigLIP, …);
and BLIP-2's ViT + Q-Former, SparklesChat's tower, which already yields 32 query tokens per image. Connectors and
the merge into the LM live in `model.py`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import CheckpointError, ConfigError


class VisionTower(Protocol):
    out_dim: int  # C
    num_tokens: int  # P, tokens per image
    hf_config: dict  # the HF config that rebuilds the tower without its weights folder ({} for ours)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...  # (N, 3, H, W) -> (N, P, C)


class TinyViT(nn.Module):
    """A small pre-norm ViT without a CLS token: patch embedding, learned positions, transformer blocks, final norm."""

    def __init__(self, *, image_size: int, patch_size: int = 8, width: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.num_tokens, self.out_dim, self.hf_config = (image_size // patch_size) ** 2, width, {}
        self.patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn(1, self.num_tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (N, P, C)
        return self.norm(self.blocks(x + self.position))


class HFVisionTower(nn.Module):
    """Any HF vision encoder; reads one hidden layer and drops the CLS token when it has one."""

    def __init__(self, model: nn.Module, *, image_size: int, feature_layer: int = -1, drop_cls: bool = True):
        super().__init__()
        self.model, self.feature_layer = model, feature_layer
        cfg = model.config
        # CLIP/SigLIP name the CLS embedding `class_embedding`; DINOv2 and ViT name it `cls_token`.
        embeddings = getattr(model, "vision_model", model).embeddings
        self.has_cls = any(getattr(embeddings, n, None) is not None for n in ("class_embedding", "cls_token"))
        self.drop = drop_cls and self.has_cls
        self.num_tokens = (image_size // cfg.patch_size) ** 2 + (self.has_cls and not self.drop)
        self.out_dim, self.hf_config = cfg.hidden_size, cfg.to_dict()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]  # (N, P(+1), C)
        return features[:, 1:] if self.drop else features


class Blip2Tower(nn.Module):
    """BLIP-2's EVA ViT (its post-layernorm is the original's `ln_vision`) + Q-Former with learned query tokens."""

    def __init__(self, config):  # a transformers Blip2Config
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel

        self.vision_model = Blip2VisionModel(config.vision_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.num_tokens, self.out_dim = config.num_query_tokens, config.qformer_config.hidden_size
        self.hf_config = config.to_dict()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 257, 1408) for ViT-g
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image,
                            encoder_attention_mask=mask).last_hidden_state  # (N, 32, 768)


def build_vision(config: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """The tower a config names; pretrained weights are read only when `load_weights` and a path is given.

    `dtype` is the one its weights are made and read in: a BLIP-2 ViT-g read in fp32 and cast afterwards would
    hold 4 GB on the way. None keeps the default (fp32)."""
    if config.kind == "tiny":
        return TinyViT(image_size=config.image_size, **config.config).to(dtype=dtype)  # small: made, then cast
    if config.kind == "blip2":
        with _made_in(dtype):
            return _build_blip2(config, load_weights)
    if config.kind == "hf":
        return HFVisionTower(_hf_vision_model(config, load_weights, dtype), image_size=config.image_size,
                             feature_layer=config.feature_layer, drop_cls=config.drop_cls)
    raise ConfigError(f"unknown vision kind {config.kind!r}; expected tiny, hf or blip2")


@contextlib.contextmanager
def _made_in(dtype: torch.dtype | None):
    """Parameters created inside are made in `dtype` (the BLIP-2 tower is our own module, not from_pretrained)."""
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _hf_vision_model(config: VisionConfig, load_weights: bool, dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    # A full CLIP/SigLIP checkpoint holds a text tower too; these classes load just the vision half of it.
    vision_only = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
    if config.path and load_weights:
        kind = AutoConfig.from_pretrained(config.path).model_type
        cls = vision_only.get(kind, AutoModel)
        return _from_pretrained(cls, config.path, dtype)
    if not config.config:
        raise ConfigError("vision kind 'hf' needs a path to pretrained weights or a config to build from")
    fields = dict(config.config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if hasattr(hf_config, "vision_config"):
        hf_config = hf_config.vision_config
    return AutoModel.from_config(hf_config, **({"dtype": dtype} if dtype is not None else {}))


def _build_blip2(config: VisionConfig, load_weights: bool) -> Blip2Tower:
    from transformers import Blip2Config

    if config.path and load_weights:
        tower = Blip2Tower(Blip2Config.from_pretrained(config.path))
        _load_blip2_weights(tower, Path(config.path))
        return tower
    if not config.config:
        raise ConfigError("vision kind 'blip2' needs a BLIP-2 checkpoint folder or a config to build from")
    return Blip2Tower(Blip2Config.from_dict(config.config))


def _load_blip2_weights(tower: Blip2Tower, folder: Path) -> None:
    """Read only the ViT, Q-Former and query tokens from a BLIP-2 folder: its LM (OPT, Flan-T5) is not needed."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():  # a sharded checkpoint
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    wanted = set(tower.state_dict())
    state = {}
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"BLIP-2 folder {folder} lacks {name} (only safetensors checkpoints are read)")
        with safe_open(str(folder / name), framework="pt") as f:
            # Checkpoints of Blip2ForConditionalGeneration may nest everything under "model."
            for key in f.keys():
                short = key.removeprefix("model.")
                if short in wanted:
                    state[short] = f.get_tensor(key)
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"BLIP-2 folder {folder} lacks {len(missing)} tower weights, e.g. {missing[:3]}")
    tower.load_state_dict(state)


def _from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> nn.Module:
    try:
        return cls.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
    except OSError as e:
        raise CheckpointError(f"cannot load pretrained weights from {path!r}: {e}") from None

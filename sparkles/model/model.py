"""The vision-language model: vision tower -> connector -> causal LM, with image features merged by one mask.

Shape notation: N images, P tower tokens per image, C tower width, K image tokens per image in the LM, D LM width,
B batch, T sequence length. Connectors live in `connectors.py`, checkpoint files in `checkpoint.py`, generation
in `generate.py`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..processor import Processor
from ..tokenizer import NAMED, byte_tokenizer, load_tokenizer
from .adapters import add_adapters
from .attention import lm_kwargs, use_attention
from .connectors import CONNECTORS
from .cross_attention import add_cross_attention
from .layer_state import LayerState, Reader, state_kwargs
from .mixed import build_towers, resolve
from .tiles import add_skip_token, encode_views, merge_views
from .visual_cache import load_visual_cache


class VisionLanguageModel(nn.Module):
    """Composition of three named parts; the LM's own forward does the rest."""

    PARTS = ("vision", "connector", "lm")
    skip_token_id: int | None = None  # SPHINX-X's skip token (`tiles.py`); build_model sets it when tiles skip
    visual_cache = None  # ImageBind-LLM's cache (`visual_cache.py`): no module, so never in the checkpoint's weights

    def __init__(self, vision: nn.Module, connector: nn.Module, lm: nn.Module, *, config: ModelConfig,
                 image_token_id: int):
        super().__init__()
        self.vision, self.connector, self.lm = vision, connector, lm
        self.config, self.image_token_id = config, image_token_id
        self.set_trainable(config.trainable)

    @property
    def input_only_ids(self) -> tuple[int, ...]:
        """Ids that stand for image content (the image token; a skipped tile's token): inputs only, never generated,
        and not text for the repetition penalty. A pretrained LM's table may not even have rows for them."""
        return (self.image_token_id,) + (() if self.skip_token_id is None else (self.skip_token_id,))

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(1, S) the text among (1, T) ids: what the repetition penalty may look at."""
        return ids[~torch.isin(ids, torch.tensor(self.input_only_ids, device=ids.device))][None]

    def set_trainable(self, parts) -> None:
        unknown = set(parts) - set(self.PARTS)
        if unknown:
            raise ConfigError(f"unknown parts {sorted(unknown)} in trainable; parts: {list(self.PARTS)}")
        for name in self.PARTS:
            part = getattr(self, name)
            part.requires_grad_(name in parts)
            if name in parts and _has_lora(part):
                # With LoRA, a trainable part learns through its LoRA only; the base stays frozen. In the connector
                # LoRA reaches only the cross-attention blocks (`cross_attention.py`): the weights it wraps stay as
                # they are, and the connector's other weights (the resampler, the blocks' gates) learn as before.
                for param_name, param in part.named_parameters():
                    param.requires_grad_("lora_" in param_name or (name == "connector" and "base_layer" not in
                                                                   param_name))
        self.trainable = tuple(parts)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode, as the original keeps its ViT and Q-Former: no dropout noise in them.
        for name in self.PARTS:
            if name not in self.trainable:
                getattr(self, name).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, K, D) LM input embeddings; with tiles, (N, V, 3, H, W) -> (N, V·K, D) (`tiles.py`)."""
        if pixel_values.dim() == 5:
            return encode_views(self.encode_images, pixel_values, getattr(self.connector, "skip_token", None))
        dtype = next(self.vision.parameters()).dtype
        features = self.vision(pixel_values.to(self.device, dtype))  # (N, P, C)
        if self.visual_cache is not None and not self.training:
            # The connector's inputs are blended, as ImageBind-LLM blends before its bind network: the connector
            # was trained on the tower's features, and one cache serves every connector on the same tower.
            features = self.visual_cache(features, self.vision)
        return self.connector(features.to(next(self.connector.parameters()).dtype))  # (N, K, D)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with image features written over the image tokens, in order of appearance."""
        is_image = input_ids == self.image_token_id  # (B, T)
        if self.skip_token_id is not None:
            is_image = is_image | (input_ids == self.skip_token_id)  # a skipped tile's one position
        # Image-token ids are never looked up: the tokenizer may have added them past the end of the table.
        text = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        if self.reader is not None:  # one marker position per image; the features go to `signal`
            return self.reader.embed(text, is_image, image_embeds)
        rows, cols = self.config.tiles.grid
        if rows:
            skips = input_ids[is_image] == (-1 if self.skip_token_id is None else self.skip_token_id)  # (S,)
            return merge_views(text, is_image, skips, image_embeds, views=1 + rows * cols,
                               k=self.config.tokens_per_image)
        have = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        slots = int(is_image.sum())
        if slots != have:
            k = self.config.tokens_per_image
            raise InputError(f"image tokens: {slots} ({slots / k:g} images of {k} tokens), "
                             f"image features: {have} ({have // k} images)")
        if image_embeds is None:
            return text
        return text.masked_scatter(is_image[..., None], image_embeds.to(text.dtype))

    @property
    def adapters(self):
        """LLaMA-Adapter's / ImageBind-LLM's adapters (`adapters.py`), kept in the connector; None when off."""
        return getattr(self.connector, "adapter", None)

    @property
    def cross_attention(self):
        """Flamingo's gated cross-attention blocks (`cross_attention.py`), kept in the connector; None when off."""
        return getattr(self.connector, "cross", None)

    @property
    def reader(self) -> Reader | None:
        """The adapters or the cross-attention blocks, whichever reads the images inside the LM; None for neither."""
        return self.adapters if self.adapters is not None else self.cross_attention

    def signal(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> LayerState | None:
        """What the reader's layers read at each of the (B, T) positions (`layer_state.LayerState`); None without a
        reader. A call on a KV cache passes every position from the start (images too) and keeps the tail it
        feeds. Packed rows pass their `position_ids`: a sample begins where they restart at 0."""
        if self.reader is None:
            return None
        starts = None if position_ids is None else position_ids.expand_as(input_ids) == 0
        return self.reader.signal(input_ids == self.image_token_id, image_embeds, starts)

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) True at image tokens, for an attention that treats them apart (MMCA); None under causal attention,
        whose LM forward must not get it. Generation passes it for every position a KV cache will hold."""
        if self.config.attention == "causal":
            return None
        skip = getattr(self, "skip_token_id", None)  # a skipped tile's one position stands for image content too
        is_image = input_ids == self.image_token_id
        return is_image if skip is None else is_image | (input_ids == skip)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """HF causal-LM output; `loss` is the mean cross-entropy over labels != -100 (shifted inside the LM).

        A 4-D boolean `attention_mask` (B, 1, T, T) with `position_ids` runs packed rows (`data.collate_packed`).
        """
        images = self.encode_images(pixel_values) if pixel_values is not None else None
        embeds = self.embed(input_ids, images)
        signal = self.signal(input_ids, images, position_ids)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                       **lm_kwargs(self.image_positions(input_ids)), **state_kwargs(signal))


def build_model(config: ModelConfig, *, load_weights: bool = True, tokenizer=None, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> tuple[VisionLanguageModel, Processor]:
    """Build model and processor from a config; `load_weights=False` builds the structure only (random weights).

    `dtype` is the one the towers and the LM are made in; `device` says where the LM is read to (see `_build_lm`);
    the caller moves the other parts."""
    if tokenizer is None:
        tokenizer = _tokenizer(config)
    processor = Processor(tokenizer, config)
    vision = build_towers(config.vision, load_weights=load_weights, dtype=dtype)
    lm = _build_lm(config, len(tokenizer), load_weights, dtype=dtype, device=device)
    use_attention(lm, config.attention)
    width = lm.get_input_embeddings().embedding_dim
    connector_cls = CONNECTORS.get(config.connector)
    if connector_cls is None:
        raise ConfigError(f"unknown connector {config.connector!r}; expected one of {sorted(CONNECTORS)}")
    connector = connector_cls(vision.out_dim, width, num_tokens=vision.num_tokens,
                              tokens_per_image=config.tokens_per_image)
    add_skip_token(connector, config, width)
    cross = add_cross_attention(lm, connector, config, width)
    if config.lora.r:
        lm = _with_lora(lm, config.lora, also=cross)
        if config.lora.vision:
            vision = _with_lora(vision, config.lora)
    add_adapters(lm, connector, config, width)  # after LoRA: the prompt branch calls k_proj/v_proj as they end up
    # Record the resolved HF configs so that a full checkpoint rebuilds without the original folders.
    resolved = dataclasses.replace(
        config,
        vision=resolve(config.vision, vision),
        language=dataclasses.replace(config.language, config=_lm_config_dict(config, lm)))
    model = VisionLanguageModel(vision, connector, lm, config=resolved, image_token_id=processor.image_token_id)
    model.skip_token_id = processor.skip_token_id
    if config.visual_cache.path:
        model.visual_cache = load_visual_cache(config.visual_cache)
    return model, processor


def _with_lora(module: nn.Module, lora, *, also: nn.Module | None = None) -> nn.Module:
    """Wrap a part with peft LoRA adapters (B starts at zero, so the wrapped part computes what it did before);
    `also` (the cross-attention blocks, which live in the connector) gets them where the targets name its modules."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'sparkles[lora]'") from None
    parts = [m for m in (module, also) if m is not None]
    names = [{n.rsplit(".", 1)[-1] for n, _ in m.named_modules()} for m in parts]
    if not set(lora.targets) & set().union(*names):
        raise ConfigError(f"no module named {list(lora.targets)} in {type(module).__name__} for LoRA "
                          f"(it has e.g. {sorted(names[0] - {''})[:8]})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets))
    for part, held in zip(parts, names):
        if set(lora.targets) & held:  # peft refuses a module none of whose names it targets
            inject_adapter_in_model(config, part)
    return module


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def _tokenizer(config: ModelConfig):
    if config.language.tokenizer in NAMED:  # e.g. world-bpe, fitted to the shapes world's words
        return NAMED.get(config.language.tokenizer)(image_token=config.image_token)
    path = config.language.tokenizer or config.language.path
    if path:
        return load_tokenizer(path)
    if config.language.kind != "tiny":
        raise ConfigError("an 'hf' language model needs language.path or language.tokenizer")
    return byte_tokenizer((config.image_token,))


def _build_lm(config: ModelConfig, vocab_size: int, load_weights: bool, *, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> nn.Module:
    """The causal LM, made directly in `dtype` and, when read from a folder, on `device`: a 7B LM read in fp32 and
    cast afterwards would need 28 GB of host memory on the way. None keeps transformers' own choice."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    lang = config.language
    typed = {"dtype": dtype} if dtype is not None else {}
    if lang.kind == "tiny":
        fields = {k: v for k, v in lang.config.items() if k != "model_type"}
        fields.setdefault("vocab_size", vocab_size)
        return LlamaForCausalLM(LlamaConfig(**fields)).to(dtype=dtype)  # a few MB: made, then cast
    if lang.kind != "hf":
        raise ConfigError(f"unknown language kind {lang.kind!r}; expected tiny or hf")
    if lang.path and load_weights:
        placed = {"device_map": str(device)} if device is not None and torch.device(device).type != "cpu" else {}
        try:
            return AutoModelForCausalLM.from_pretrained(lang.path, **typed, **placed)
        except OSError as e:
            from ..errors import CheckpointError

            raise CheckpointError(f"cannot load the language model from {lang.path!r}: {e}") from None
    if not lang.config:
        raise ConfigError("language kind 'hf' needs a path to pretrained weights or a config to build from")
    fields = dict(lang.config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields), **typed)


def _lm_config_dict(config: ModelConfig, lm: nn.Module) -> dict:
    if config.language.kind == "tiny":
        return dict(config.language.config)
    return lm.config.to_dict()

"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + tokenizer files; and the original's ``.pth`` import.

A folder holds either every weight (it rebuilds from the HF configs recorded in ``config.json``) or only the
trainable ones (the frozen parts load from the pretrained folders the config names, as a LoRA adapter does).
SparklesChat-7B composes from its released projection, a BLIP-2 folder and a Vicuna folder (spec §5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import SPARKLESCHAT_SYSTEM, TINY, LanguageConfig, ModelConfig, VisionConfig, from_dict, to_dict
from ..errors import CheckpointError
from ..processor import Processor
from .mixed import towers
from .model import VisionLanguageModel, build_model

DEFAULT_CHECKPOINT = Path(__file__).parents[1] / "assets" / "default"
FORMAT = "sparkles-checkpoint"
VERSION = 1


def save_checkpoint(model: VisionLanguageModel, processor: Processor, folder: str | os.PathLike, *,
                    trainable_only: bool = False) -> Path:
    """Write the folder atomically: into a temporary sibling, then renamed over the target."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    if trainable_only:
        _check_frozen_parts_have_sources(model)
    try:
        # The connector has no pretrained folder: it is kept whole, with weights LoRA froze in it (model.lora on
        # the cross-attention blocks).
        names = ({n for n, p in model.named_parameters() if p.requires_grad or n.startswith("connector.")}
                 if trainable_only else None)
        state = {k: v for k, v in model.state_dict().items() if names is None or k in names}
        # Tied weights share storage; safetensors refuses that, so each tensor gets its own copy.
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp / "model.safetensors"))
        meta = {"format": FORMAT, "version": VERSION, "weights": "trainable" if trainable_only else "all",
                "model": to_dict(model.config)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        processor.tokenizer.save_pretrained(str(tmp))
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _swap_in(new: Path, folder: Path) -> None:
    """Put the folder `new` at `folder` so that a reader finds the old checkpoint or the new one, never none.

    Linux swaps two folders in one step (renameat2 with RENAME_EXCHANGE); `new` then holds the old files and is
    removed by the caller. Elsewhere (or on a file system without the call) the old folder is first moved aside
    to `.<name>.old`; a crash between the two renames leaves it there, and `_recover` moves it back on the next
    save or load."""
    _recover(folder)
    if not folder.exists():
        new.rename(folder)
    elif not _exchange(new, folder):
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        new.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _recover(folder: Path) -> None:
    """Undo a save that died between its two renames: the old checkpoint waits in `.<name>.old`."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (old / "config.json").is_file():
        old.rename(folder)


def _check_frozen_parts_have_sources(model: VisionLanguageModel) -> None:
    """A trainable-only folder rebuilds frozen parts from pretrained folders; refuse to save one that cannot."""
    config = model.config
    sources = {"vision": all(tower.path for tower in towers(config.vision)), "lm": config.language.path,
               "connector": None}
    lost = [part for part in model.PARTS if part not in model.trainable and not sources[part]]
    if lost:
        raise CheckpointError(f"cannot save trainable weights only: the frozen {', '.join(lost)} would be lost, "
                              "as no pretrained folder holds them; save everything instead")


def read_config(folder: str | os.PathLike) -> tuple[ModelConfig, str]:
    _recover(Path(folder))
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Sparkles checkpoint: it has no config.json")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Sparkles checkpoint config (format {meta.get('format')!r})")
    return from_dict(ModelConfig, meta["model"]), meta["weights"]


def load_checkpoint(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, Processor]:
    """Model (in eval mode) and processor from a checkpoint folder."""
    from safetensors.torch import load_file

    from ..tokenizer import load_tokenizer

    folder = Path(folder)
    config, weights = read_config(folder)
    tokenizer = load_tokenizer(str(folder))
    # A full checkpoint needs no pretrained folders; a trainable-only one reads the frozen parts from them.
    # The LM is made in the target dtype and place: no fp32 copy of a 7B LM on the way.
    model, processor = build_model(config, load_weights=weights == "trainable", tokenizer=tokenizer, dtype=dtype,
                                   device=device)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{folder}: weights the model does not have: {unexpected[:5]}")
    if weights == "all" and missing:
        raise CheckpointError(f"{folder}: weights missing from the checkpoint: {missing[:5]}")
    model.lm.tie_weights() if weights == "all" and getattr(model.lm.config, "tie_word_embeddings", False) else None
    return model.to(device=device, dtype=dtype).eval(), processor


def sparkleschat_config(blip2: str, vicuna: str) -> ModelConfig:
    """SparklesChat-7B as the original composes it (spec §3): BLIP-2 ViT-g + Q-Former, Linear(768, 4096), Vicuna.

    Image size (224) and query count (32) are read from the BLIP-2 folder's config, so scaled-down test folders
    compose the same way.
    """
    from transformers import Blip2Config

    try:
        blip2_config = Blip2Config.from_pretrained(blip2)
    except OSError as e:
        raise CheckpointError(f"cannot read a BLIP-2 config from {blip2!r}: {e}") from None
    return ModelConfig(
        vision=VisionConfig(kind="blip2", path=blip2, image_size=blip2_config.vision_config.image_size),
        language=LanguageConfig(kind="hf", path=vicuna),
        connector="linear", tokens_per_image=blip2_config.num_query_tokens,
        template="sparkles", system_prompt=SPARKLESCHAT_SYSTEM,
        image_token="<ImageHere>", max_images=16, max_seq_len=2000, trainable=("connector",))


def import_projection(pth: str | os.PathLike, model: VisionLanguageModel) -> None:
    """Load `llama_proj.weight` / `.bias` of an original SparklesChat or MiniGPT-4 `.pth` into the connector."""
    try:
        ckpt = torch.load(str(pth), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {pth}") from None
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot read {pth} as a SparklesChat/MiniGPT-4 checkpoint: {e}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "llama_proj.weight" not in state or "llama_proj.bias" not in state:
        found = sorted(state)[:8] if isinstance(state, dict) else type(ckpt).__name__
        raise CheckpointError(f"{pth} has no llama_proj.weight / llama_proj.bias (found: {found})")
    proj = getattr(model.connector, "proj", None)
    if proj is None:
        raise CheckpointError(f"the model's connector is {model.config.connector!r}; the projection needs 'linear'")
    for name, target in (("weight", proj.weight), ("bias", proj.bias)):
        source = state[f"llama_proj.{name}"]
        if tuple(source.shape) != tuple(target.shape):
            raise CheckpointError(
                f"llama_proj.{name} in {pth} has shape {list(source.shape)}, the model expects {list(target.shape)} "
                "(a projection for another LLM size, e.g. 13B's 5120 on a 7B's 4096?)")
        with torch.no_grad():
            target.copy_(source.to(target.dtype))


def compose_sparkleschat(pth: str, blip2: str, vicuna: str, out: str | os.PathLike) -> Path:
    """Build SparklesChat-7B from its parts and save it as a trainable-only checkpoint that names the base folders."""
    config = sparkleschat_config(str(Path(blip2).resolve()), str(Path(vicuna).resolve()))
    model, processor = build_model(config)
    import_projection(pth, model)
    return save_checkpoint(model, processor, out, trainable_only=True)


def load(name: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, Processor]:
    """A model by name: None or "default" (the embedded default), "tiny" (untrained, built on the spot), or a folder.

    Until a trained default is shipped in `sparkles/assets/default`, "default" is the tiny untrained model, built
    with a fixed seed so that its (meaningless) answers are at least reproducible.
    """
    if name in (None, "default") and (DEFAULT_CHECKPOINT / "config.json").is_file():
        return load_checkpoint(DEFAULT_CHECKPOINT, dtype=dtype, device=device)
    if name in (None, "default", "tiny"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, processor = build_model(TINY)
        return model.to(device=device, dtype=dtype).eval(), processor
    if not Path(name).is_dir():
        raise CheckpointError(f"no checkpoint folder at {name} (expected a folder with config.json and "
                              "model.safetensors, or 'default')")
    return load_checkpoint(name, dtype=dtype, device=device)


def load_processor(name: str | os.PathLike | None = None) -> Processor:
    """Just the processor of a model named as in `load`: enough to render conversations, with no weights read."""
    from ..tokenizer import byte_tokenizer, load_tokenizer

    if name in (None, "default") and (DEFAULT_CHECKPOINT / "config.json").is_file():
        name = DEFAULT_CHECKPOINT
    if name in (None, "default", "tiny"):
        return Processor(byte_tokenizer((TINY.image_token,)), TINY)
    config, _ = read_config(name)
    return Processor(load_tokenizer(str(name)), config)


def is_untrained_default(name: str | os.PathLike | None) -> bool:
    return name == "tiny" or (name in (None, "default") and not (DEFAULT_CHECKPOINT / "config.json").is_file())

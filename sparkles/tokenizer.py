"""Tokenizers: load one from a folder, make a byte-level one for small models trained from scratch, add the image
token.

The byte tokenizer needs no training and no download, so tiny test models and smoke runs always have one. Named
tokenizers that are built rather than loaded (the default model's `world-bpe`, fitted to the shapes world's words)
are found in `NAMED`, which the module that builds them fills.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import CheckpointError
from .registry import Registry

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# name -> builder(image_token=...) of a tokenizer made from code, not from a folder
NAMED: Registry = Registry("named tokenizer", {"world-bpe": "sparkles.world.data"})


def byte_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte plus the special tokens: 256 + 4 + len(extra_special) ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(SPECIAL.values())
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL["unk_token"]))
    # ByteLevel without a prefix space: text must round-trip exactly, which the renderer relies on.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok


def load_tokenizer(path: str):
    """A fast tokenizer from a folder or hub id; offsets (which the renderer needs) come only with fast ones."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {path!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"the tokenizer in {path!r} is a slow one; Sparkles needs a fast tokenizer "
                              "(install the [sentencepiece] extra so transformers can convert it)")
    return tok


def ensure_special_token(tok, token: str) -> int:
    """The id of `token`, added as a special token when the tokenizer lacks it.

    The embedding matrix is not resized for it: the model never looks up an image token's embedding (it writes
    image features at those positions), and generation masks the id out of the logits.
    """
    if token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tok.convert_tokens_to_ids(token)

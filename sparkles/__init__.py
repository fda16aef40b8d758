"""Sparkles: chat with vision-language models across many images and many turns, and build such models.

The names here are the public API. Importing `sparkles` imports no torch; `sparkles.load` and `sparkles.Chat`
pull it in on first use, and so does `sparkles.ChatSession`.
"""

from .conversation import Conversation, Image, Message, Text, user_message
from .errors import CheckpointError, ConfigError, ContextLengthError, ImageLoadError, InputError, SparklesError

__version__ = "0.1.0"

__all__ = ["Chat", "ChatSession", "CheckpointError", "ConfigError", "ContextLengthError", "Conversation", "Image",
           "ImageLoadError", "InputError", "Message", "SparklesError", "Text", "load", "user_message"]


def load(name=None, **kwargs):
    """Model and processor by name: None/"default", "tiny", or a checkpoint folder (see `checkpoint.load`)."""
    from .model.checkpoint import load as _load

    return _load(name, **kwargs)


def __getattr__(name):
    if name == "Chat":
        from .generate import Chat

        return Chat
    if name == "ChatSession":
        from .session import ChatSession

        return ChatSession
    raise AttributeError(name)

"""Named plug-ins that a lower layer looks up and a higher one provides, so that neither imports the other.

The data model and the model know nothing of the shapes world, yet `world:caption` must read as a training source
and `world-bpe` as a tokenizer. The world registers both when it is imported; a name the registry does not hold yet
but lists among its built-ins has its module imported on first use, as Python's entry points do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, what: str, builtin: dict[str, str]):
        self.what, self.builtin, self.entries = what, dict(builtin), {}

    def register(self, name: str, entry: T) -> T:
        self.entries[name] = entry
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.builtin

    def names(self) -> list[str]:
        return [*self.entries, *(name for name in self.builtin if name not in self.entries)]

    def get(self, name: str) -> T:
        if name not in self.entries and name in self.builtin:
            importlib.import_module(self.builtin[name])  # the module registers its entries when imported
        if name not in self.entries:
            raise ConfigError(f"unknown {self.what} {name!r}; {self.what}s: {', '.join(self.names())}")
        return self.entries[name]

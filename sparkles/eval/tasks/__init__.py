"""Evaluation tasks: SparklesEval, BISON and NLVR2 read from the original folder layouts, behind one `Task`
protocol (`common.py`). A new task is a module with a `load(root, …)` function and one line in `LOADERS`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .common import Example, Scored, Task, conversation_for, extract_option


def _sparkleseval(root: str | Path, **options) -> Task:
    from .sparkleseval import load

    return load(root)


def _bison(root: str | Path, *, extractor: str = "legacy") -> Task:
    from .bison import load

    return load(root, extractor=extractor)


def _nlvr2(root: str | Path, *, extractor: str = "legacy") -> Task:
    from .nlvr2 import load

    return load(root, extractor=extractor)


def _shapes(root: str | Path | None, *, n: int = 50, seed: int = 1, **options) -> Task:
    from .shapes import load

    return load(root, n=n, seed=seed)


# name -> loader(root, **options); `sparkles eval <name>` is made for each entry.
LOADERS = {"sparkleseval": _sparkleseval, "bison": _bison, "nlvr2": _nlvr2, "shapes": _shapes}


def load_task(name: str, root: str | Path, **options) -> Task:
    if name not in LOADERS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(LOADERS)}")
    return LOADERS[name](root, **options)


__all__ = ["Example", "LOADERS", "Scored", "Task", "conversation_for", "extract_option", "load_task"]

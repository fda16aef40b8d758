"""Evaluation tasks: SparklesEval, BISON and NLVR2 read from the original folder layouts, behind one `Task`
protocol (`common.py`). A new task is a module with a `load(root, …)` function registered in `LOADERS`.
"""

from __future__ import annotations

from pathlib import Path

from ...registry import Registry
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


# name -> loader(root, **options); `sparkles eval <name>` is made for each entry. The shapes world registers its
# exactly scored benchmark from its own folder (`world/benchmark.py`), so evaluation never imports the world.
LOADERS: Registry = Registry("task", {"shapes": "sparkles.world.benchmark"})
LOADERS.register("sparkleseval", _sparkleseval)
LOADERS.register("bison", _bison)
LOADERS.register("nlvr2", _nlvr2)


def load_task(name: str, root: str | Path, **options) -> Task:
    return LOADERS.get(name)(root, **options)


__all__ = ["Example", "LOADERS", "Scored", "Task", "conversation_for", "extract_option", "load_task"]

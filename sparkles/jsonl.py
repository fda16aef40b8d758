"""Append-only JSON Lines files that survive a kill: whole lines appended and flushed, and a torn last line (a
write cut short) cut off before a resumed run appends after it. Shared by `sparkles eval` and `sparkles synth`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def repair_tail(path: Path, *, warn: bool = True) -> bool:
    """Cut a last line that has no newline (a write cut short by a kill); True when something was cut.

    Without this, the next append would glue a new record onto the torn one and lose both."""
    path = Path(path)
    if not path.is_file() or not path.stat().st_size:
        return False
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return False
        keep, pos = 0, end
        while pos > 0:  # back from the end, a block at a time, to the last newline
            start = max(0, pos - (1 << 16))
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        f.truncate(keep)
    if warn:
        log.warning("%s: dropped a half-written last line of %d bytes (the run was killed while writing it); its "
                    "record will be made again", path, end - keep)
    return True


def append_lines(path: Path, records: Iterable[dict]) -> None:
    """Append whole lines and flush them: a kill loses at most the line being written."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if lines:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()

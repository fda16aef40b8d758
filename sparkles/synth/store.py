"""The run folder of `sparkles synth`: append-only JSONL files (dataset, rejects, the call ledger), the run's
settings, and the JSON list export and summary made from them.

Each call's lines are written whole, its ledger line last; a killed run leaves at most one half-written line,
which `open_run` drops, and ids already on disk are never written again. See `synth.py` for the pipeline.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..jsonl import repair_tail
from .calls import CallResult
from .parse import dedup_key
from .prompts import Caption, demo_messages, parse_captions

log = logging.getLogger(__name__)
DATASET, REJECTS, CALLS, RUN, LOG = "dataset.jsonl", "rejects.jsonl", "calls.jsonl", "run.json", "synth.log"
EXPORT, SUMMARY = "SparklesDialogue.json", "summary.json"


@dataclass
class RunState:
    done: set[str]  # calls in the ledger
    written: set[str]  # item ids already in dataset.jsonl or rejects.jsonl
    keys: set[str]  # de-duplication keys of the dataset's dialogues
    accepted: int


def open_run(out: Path, fingerprint: dict[str, Any], *, resume: bool) -> RunState:
    """Check that `out` is new, or (with `resume`) a run with the same plan; read what it already holds."""
    out.mkdir(parents=True, exist_ok=True)
    started = any((out / name).exists() and (out / name).stat().st_size for name in (DATASET, REJECTS, CALLS))
    if started and not resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if started and (out / RUN).exists():
        before = json.loads((out / RUN).read_text(encoding="utf-8"))
        changed = [k for k in ("spec", "seed", "captions_sha256", "demos_sha256") if before.get(k) != fingerprint[k]]
        if changed:
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            raise ConfigError(f"{out} was made with other settings ({was}): resume it with the same ones, or choose "
                              "another --out")
    for name in (DATASET, REJECTS, CALLS):
        if repair_tail(out / name, warn=False):  # warned here, so that the warning reaches synth.log
            log.warning("%s: dropped a half-written last line (the run was killed while writing it)", name)
    _write_atomic(out / RUN, json.dumps(fingerprint, indent=1, ensure_ascii=False))
    dataset = read_jsonl(out / DATASET)
    return RunState(done={c["call"] for c in read_jsonl(out / CALLS)},
                    written={r["id"] for r in dataset} | {r["id"] for r in read_jsonl(out / REJECTS)},
                    keys={dedup_key(r["dialogue"]) for r in dataset}, accepted=len(dataset))


def _append(path: Path, records: Sequence[dict]) -> None:
    if records:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def commit(out: Path, state: RunState, result: CallResult, *, n: int, teacher: str) -> dict[str, Any]:
    """Write one call's accepted dialogues and rejects, then its ledger line; return the ledger line."""
    call, reply, kept, rejected, surplus = result.call, result.reply, [], [], 0
    if reply is None:
        rejected.append({"id": f"{call.id}-error", "call": call.id, "reason": "endpoint_error", "detail": result.error,
                         "raw": ""})
    for o in result.outcomes:
        if o.id in state.written:
            continue  # written before the run was killed, while the ledger line was not
        reason, detail = o.reason, o.detail
        if o.dialogue is not None and dedup_key(o.dialogue) in state.keys:
            reason, detail = "duplicate", "the same user messages as a dialogue already kept"
        if o.dialogue is not None and not reason:
            if state.accepted >= n:  # the last call may bring more than needed: the dataset holds exactly n
                surplus += 1
                continue
            state.keys.add(dedup_key(o.dialogue))
            state.accepted += 1
            raw = [{"prompt": reply.prompt or call.prompt, "response": reply.text}]
            kept.append({"id": o.id, "dialogue": o.dialogue, "raw": raw,
                         "synth": {"call": call.id, "teacher": teacher, "model": reply.model, "parse": result.method,
                                   "warnings": list(o.warnings)}})
        else:
            rejected.append({"id": o.id, "call": call.id, "reason": reason, "detail": detail,
                             "candidates": [c.key for c in call.candidates], "dialogue": o.parsed, "raw": reply.text})
    # Dataset and rejects first, the ledger line last: a kill in between leaves the call open for --resume, and
    # `state.written` (read back from these files) keeps its lines from being written a second time.
    _append(out / DATASET, kept)
    _append(out / REJECTS, rejected)
    ledger = {"call": call.id, "index": call.index, "status": "failed" if reply is None else "done",
              "accepted": len(kept), "rejected": len(rejected), "surplus": surplus,
              "usage": reply.usage if reply else {}, "attempts": reply.attempts if reply else 0,
              "finish_reason": reply.finish_reason if reply else None, "seconds": round(result.seconds, 3)}
    if reply is not None:  # a failed call stays open, so that --resume tries it again
        _append(out / CALLS, [ledger])
        state.done.add(call.id)
    state.written.update(r["id"] for r in kept + rejected)
    return ledger


# Reading inputs and results


def read_json_records(path: str | Path) -> Any:
    """A JSON file's value, or the records of a JSONL file as a list."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is allowed and dropped
    except UnicodeDecodeError as e:
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # the codec counts after the BOM
        line = data.count(b"\n", 0, at) + 1
        raise InputError(f"{path}: expected UTF-8 text, got byte 0x{data[at]:02x} at byte offset {at} "
                         f"(line {line}) that is not valid UTF-8; re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {number}: neither a JSON file nor JSON Lines ({e.msg})") from None
    return records


def read_captions(path: str | Path, images: str | Path | None = None) -> tuple[Caption, ...]:
    """Captions from a file; with an images folder (or `file` fields), only those whose image file exists."""
    captions = parse_captions(read_json_records(path), str(path))
    if images is None and not any(c.file for c in captions):
        return captions
    roots = [Path(path).parent] + ([Path(images)] if images is not None else [])
    kept = tuple(c for c in captions if find_image(c.key, c.file, roots=roots))
    if not kept:
        raise InputError(f"none of the {len(captions)} images of {path} has a file in "
                         f"{' or '.join(map(str, roots))} (by its 'file', or <image_id>.png/.jpg)")
    if len(kept) < len(captions):
        log.warning("%d of %d captioned images have no file and are left out", len(captions) - len(kept),
                    len(captions))
    return kept


def read_demos(path: str | Path) -> list[list[dict[str, Any]]]:
    """Demonstration dialogues from a SparklesDialogue JSON list or JSONL file, as the teacher is shown them."""
    records = read_json_records(path)
    records = records if isinstance(records, list) else [records]
    return [demo_messages(r, f"{path}[{i}]") for i, r in enumerate(records)]


def find_image(image_id: str, file: str | None, *, roots: Sequence[Path]) -> Path | None:
    """The image file: `file` under one of `roots` (or its bare name), else <id>.png/.jpg/.jpeg/.webp in a root."""
    names = [file, Path(file).name] if file else []
    names += [f"{image_id}{suffix}" for suffix in (".png", ".jpg", ".jpeg", ".webp")]
    for root in roots:
        for name in names:
            if (root / name).is_file():
                return root / name
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (none when it does not exist); a broken line is an error that names it."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return records


def summarize(out: Path) -> dict[str, Any]:
    """Counts, rejection reasons, tokens and cost over every run made in `out` (resumed ones included)."""
    settings = json.loads((out / RUN).read_text(encoding="utf-8")) if (out / RUN).exists() else {}
    calls, rejects = read_jsonl(out / CALLS), read_jsonl(out / REJECTS)
    dialogues = sum(1 for _ in read_jsonl(out / DATASET))
    usage = Counter()
    for c in calls:
        usage.update({k: v for k, v in (c.get("usage") or {}).items() if isinstance(v, int)})
    cost = (usage["prompt_tokens"] * settings.get("price_in", 0.0)
            + usage["completion_tokens"] * settings.get("price_out", 0.0)) / 1000
    reasons = Counter(r["reason"] for r in rejects)
    judged = dialogues + sum(n for reason, n in reasons.items() if reason != "endpoint_error")
    return {"dialogues": dialogues, "calls": len(calls), "endpoint_errors": reasons.get("endpoint_error", 0),
            "rejected": sum(reasons.values()), "reasons": dict(reasons.most_common()),
            "acceptance": round(dialogues / judged, 4) if judged else None,
            "surplus": sum(c.get("surplus", 0) for c in calls),
            "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "calls_without_usage": sum(1 for c in calls if not c.get("usage")), "cost": round(cost, 6),
            "attempts": sum(c.get("attempts", 0) for c in calls),
            "retried_calls": sum(1 for c in calls if c.get("attempts", 0) > 1),
            "teacher_seconds": round(sum(c.get("seconds", 0.0) for c in calls), 3)}


def export(out: Path) -> dict[str, Any]:
    """Write the dataset as one JSON list (spec §7.1) and the summary; both are rebuilt from the JSONL files."""
    _write_atomic(out / EXPORT, json.dumps(read_jsonl(out / DATASET), ensure_ascii=False, indent=1))
    summary = summarize(out)
    _write_atomic(out / SUMMARY, json.dumps(summary, indent=1))
    return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one

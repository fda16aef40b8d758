"""Statistics, report and viewer of a SparklesDialogue dataset (the original's analysis, spec §8.10).

Word-length histograms of user and assistant messages (Freedman–Diaconis bins), images per turn and per dialogue,
the user requests' root verb–noun pairs (when spaCy and an English model are installed), and the teacher run's
rejects, tokens and cost: report.md and report.html with SVG plots drawn here (no plotting library needed), and
view.html, the dialogues with their images and captions. Numbers are computed by pure functions; I/O at the end.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..conversation import SLOT
from ..errors import InputError
from .parse import REASONS
from .prompts import parse_captions
from .store import CALLS, DATASET, RUN, find_image, read_json_records, read_jsonl, summarize

_MARKUP = re.compile(r"IMAGE#(\w+)((?:" + re.escape(SLOT) + r")?)")


def load_dataset(path: Path) -> list[dict[str, Any]]:
    """A run folder's dataset.jsonl, or a SparklesDialogue JSON list / JSONL file."""
    records = read_jsonl(path / DATASET) if path.is_dir() else read_json_records(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) and "dialogue" in r for r in records):
        raise InputError(f"{path}: expected SparklesDialogue items ({{'dialogue': [...]}}) or a synth folder")
    return records


def words(text: str) -> int:
    return len(text.replace(SLOT, " ").split())


def dataset_stats(records: Sequence[dict[str, Any]], verb_nouns: Counter | None = None) -> dict[str, Any]:
    """The numbers of the report; `verb_nouns` is the root verb–noun count of the first requests, when known."""
    user, assistant, per_dialogue, images = [], [], Counter(), []
    per_turn: dict[int, Counter] = {}
    for record in records:
        shown = 0
        for k, message in enumerate(record["dialogue"]):
            (user if message["role"] == "user" else assistant).append(words(message["content"]))
            if message["role"] == "user":
                ids = [str(i["image_id"]) for i in message.get("images") or []]
                per_turn.setdefault(k // 2 + 1, Counter())[len(ids)] += 1
                images += ids
                shown += len(ids)
        per_dialogue[shown] += 1
    firsts = [r["dialogue"][0]["content"] for r in records if r["dialogue"]]
    return {"dialogues": len(records), "images_total": len(images), "images_unique": len(set(images)),
            "user_messages": len(user), "assistant_messages": len(assistant),
            "user_words_mean": _mean(user), "assistant_words_mean": _mean(assistant),
            "user_words": _summary(user), "assistant_words": _summary(assistant),
            "user_histogram": histogram(user), "assistant_histogram": histogram(assistant),
            "images_per_dialogue": dict(sorted(per_dialogue.items())),
            "images_per_dialogue_mean": round(len(images) / len(records), 2) if records else 0.0,
            "images_per_turn": {turn: dict(sorted(c.items())) for turn, c in sorted(per_turn.items())},
            "opening_words": Counter(_opening(t) for t in firsts).most_common(10),
            "verb_nouns": verb_nouns.most_common(20) if verb_nouns is not None else None, "notes": []}


def _mean(values: Sequence[int]) -> float:
    return round(statistics.fmean(values), 2) if values else 0.0


def _summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _opening(text: str) -> str:
    head = re.sub(r"IMAGE#\w+|" + re.escape(SLOT), " ", text).split()[:2]
    return " ".join(w.strip(",.?!:;").lower() for w in head)


def histogram(values: Sequence[int], max_bins: int = 40) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of integers, Freedman–Diaconis width (as the original's plots), at most `max_bins`."""
    if not values:
        return []
    low, high = min(values), max(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [low, low, low]
    width = max(1, math.ceil(2 * (q[2] - q[0]) / len(values) ** (1 / 3)))
    width = max(width, math.ceil((high - low + 1) / max_bins))
    bins = [(a, a + width - 1, 0) for a in range(low, high + 1, width)]
    counts = Counter((v - low) // width for v in values)
    return [(a, b, counts[i]) for i, (a, b, _) in enumerate(bins)]


def verb_noun_pairs(texts: Sequence[str]) -> tuple[Counter | None, str]:
    """Root verb + direct object lemmas of each text with spaCy, or (None, why not)."""
    try:
        import spacy
    except ImportError:
        return None, ("root verb–noun pairs need spaCy and an English model (pip install spacy; python -m spacy "
                      "download en_core_web_sm); spaCy is not installed, so they are left out")
    for model in ("en_core_web_md", "en_core_web_sm"):
        try:
            nlp = spacy.load(model, disable=["ner"])
            break
        except OSError:
            continue
    else:
        return None, "spaCy has no English model (python -m spacy download en_core_web_sm): verb–noun pairs left out"
    pairs = Counter()
    for doc in nlp.pipe(re.sub(re.escape(SLOT), "", t) for t in texts):
        for root in (t for t in doc if t.dep_ == "ROOT" and t.pos_ in ("VERB", "AUX")):
            objects = [c.lemma_.lower() for c in root.children if c.dep_ in ("dobj", "obj")]
            pairs[f"{root.lemma_.lower()} {objects[0] if objects else '-'}"] += 1
    return pairs, f"root verb–noun pairs from spaCy {model}"


# Plots: small SVG bar charts


def svg_bars(labels: Sequence[str], values: Sequence[float], *, title: str, width: int = 560,
             height: int = 240) -> str:
    left, bottom, top_pad = 44, 46, 28
    top = max(values, default=0) or 1
    step = (width - left - 10) / max(len(values), 1)
    every = max(1, math.ceil(len(values) / 14))  # at most ~14 x labels, so they do not overlap
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - 6}" y2="{height - bottom}" stroke="#555"/>',
           f'<text x="{left - 4}" y="{top_pad + 4}" text-anchor="end">{_num(top)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        h = (height - bottom - top_pad) * value / top
        x, y = left + i * step, height - bottom - h
        out.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" '
                   f'fill="#4a7bd0"><title>{html.escape(str(label))}: {_num(value)}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x + step / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                       f'{html.escape(str(label))}</text>')
    return "\n".join(out + ["</svg>"])


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bins(hist: Sequence[tuple[int, int, int]]) -> tuple[list[str], list[int]]:
    return [str(a) if a == b else f"{a}–{b}" for a, b, _ in hist], [c for _, _, c in hist]


# The report: sections rendered once as Markdown and once as HTML


def report_sections(stats: dict[str, Any], run: dict[str, Any] | None) -> list[tuple[str, list, dict[str, str]]]:
    """[(heading, table rows (first row = header), {plot file name: svg})]."""
    u, a = stats["user_words"], stats["assistant_words"]
    overview = [["", "value"], ["dialogues", stats["dialogues"]],
                ["unique / total images", f"{stats['images_unique']} / {stats['images_total']}"],
                ["avg images per dialogue", stats["images_per_dialogue_mean"]],
                ["avg words, user", stats["user_words_mean"]], ["avg words, assistant", stats["assistant_words_mean"]],
                ["user words min / median / max", "/".join(_num(u.get(k, 0)) for k in ("min", "median", "max"))],
                ["assistant words min / median / max", "/".join(_num(a.get(k, 0)) for k in ("min", "median", "max"))]]
    counts = sorted({n for c in stats["images_per_turn"].values() for n in c})
    per_turn = [["turn"] + [f"{n} image{'s' if n != 1 else ''}" for n in counts]]
    per_turn += [[turn] + [c.get(n, 0) for n in counts] for turn, c in stats["images_per_turn"].items()]
    per_dialogue = [["images in the dialogue", "dialogues"]] + [list(p) for p in stats["images_per_dialogue"].items()]
    plots = {f"{who}_words.svg": svg_bars(*_bins(stats[f"{who}_histogram"]), title=f"words per {who} message")
             for who in ("user", "assistant")}
    images_plot = {"images_per_dialogue.svg": svg_bars(list(stats["images_per_dialogue"]),
                                                       list(stats["images_per_dialogue"].values()),
                                                       title="images per dialogue")}
    sections = [("Overview", overview, {}), ("Images per user turn", per_turn, {}),
                ("Images per dialogue", per_dialogue, images_plot),
                ("Message lengths (words)", [], plots)]
    if stats["verb_nouns"] is not None:
        sections.append(("Root verb–noun pairs of the first requests", [["verb noun", "dialogues"]]
                         + [list(p) for p in stats["verb_nouns"]], {}))
    sections.append(("Opening words of the first requests", [["words", "dialogues"]]
                     + [list(p) for p in stats["opening_words"]], {}))
    if run:
        rows = [["", "value"]] + [[k, v] for k, v in run.items() if k != "reasons"]
        sections.append(("Teacher run", rows, {}))
        sections.append(("Rejected outputs", [["reason", "count", "meaning"]] + [
            [r, n, REASONS.get(r, "")] for r, n in run["reasons"].items()] + ([] if run["reasons"] else [
            ["none", 0, "every output was kept"]]), {}))
    return sections


def to_markdown(title: str, sections, notes: Sequence[str]) -> str:
    out = [f"# {title}", ""] + [f"> note: {n}" for n in notes] + ([""] if notes else [])
    for heading, rows, plots in sections:
        out += [f"## {heading}", ""]
        if rows:
            out += ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]] + [""]
        out += [f"![{name}](plots/{name})" for name in plots] + ([""] if plots else [])
    return "\n".join(out)


def to_html(title: str, sections, notes: Sequence[str]) -> str:
    out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>", _STYLE,
           f"<h1>{html.escape(title)}</h1>"] + [f"<p class='note'>note: {html.escape(n)}</p>" for n in notes]
    for heading, rows, plots in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        if rows:
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        out += list(plots.values())
    return "\n".join(out)


_STYLE = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:"
          "collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.note{color:#a50}"
          ".d{border-top:2px solid #ddd;padding:.5em 0}.strip{display:flex;gap:8px;flex-wrap:wrap}figure{margin:0;"
          "width:150px;font-size:12px}figure img{width:150px;height:150px;object-fit:contain;background:#eee}"
          ".m{margin:.4em 0;padding:.4em .6em;border-radius:6px;white-space:pre-wrap}.user{background:#eef4ff}"
          ".assistant{background:#f4f4f4}.thumb{height:48px;vertical-align:middle;margin:0 3px}"
          ".missing{display:inline-block;background:#ddd;padding:2px 5px}</style>")


def write_report(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """report.md, report.html, stats.json and plots/ in the run folder (next to a dataset file: <name>_stats/)."""
    records = load_dataset(path)
    folder = path if path.is_dir() else path.with_name(path.stem + "_stats")
    pairs, note = verb_noun_pairs([r["dialogue"][0]["content"] for r in records if r["dialogue"]])
    stats = dataset_stats(records, pairs)
    stats["notes"] = [note] if pairs is None else []
    run = summarize(path) if path.is_dir() and (path / CALLS).exists() else None
    sections = report_sections(stats, run)
    title = f"SparklesDialogue statistics: {path.name}"
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for _, _, plots in sections:
        for name, svg in plots.items():
            (folder / "plots" / name).write_text(svg, encoding="utf-8")
    written = [folder / "report.md", folder / "report.html", folder / "stats.json"]
    written[0].write_text(to_markdown(title, sections, stats["notes"]), encoding="utf-8")
    written[1].write_text(to_html(title, sections, stats["notes"]), encoding="utf-8")
    written[2].write_text(json.dumps(stats | {"run": run}, indent=1, ensure_ascii=False), encoding="utf-8")
    return stats, written


# The viewer


def write_viewer(folder: Path, *, limit: int = 200) -> tuple[Path, int, int]:
    """view.html in a run folder: each dialogue's images (relative links) and captions, then its messages."""
    records = load_dataset(folder)
    files = _image_files(folder)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(folder.name)}</title>", _STYLE,
             f"<h1>{html.escape(folder.name)}: {min(limit, len(records))} of {len(records)} dialogues</h1>"]
    parts += [_dialogue_html(r, files) for r in records[:limit]]
    path = folder / "view.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path, min(limit, len(records)), len(records)


def _image_files(folder: Path) -> dict[str, str]:
    """Image id -> path relative to `folder`, from the run's captions file and images folder (run.json)."""
    run = json.loads((folder / RUN).read_text(encoding="utf-8")) if (folder / RUN).exists() else {}
    if not run.get("captions") or not Path(run["captions"]).exists():
        return {}
    roots = [Path(run["captions"]).parent] + ([Path(run["images"])] if run.get("images") else [])
    out = {}
    for caption in parse_captions(read_json_records(run["captions"]), run["captions"]):
        found = find_image(caption.key, caption.file, roots=roots)
        if found is not None:
            out[caption.key] = Path(os.path.relpath(found, folder)).as_posix()
    return out


def _dialogue_html(record: dict[str, Any], files: dict[str, str]) -> str:
    anchor = html.escape(str(record.get("id", "")))
    images = {re.sub(r"\W", "_", str(i["image_id"])): i.get("caption") or ""
              for m in record["dialogue"] for i in m.get("images") or []}
    strip = "".join(f"<figure id='{anchor}-{html.escape(k)}'>{_img(k, files, '')}<figcaption><b>IMAGE#"
                    f"{html.escape(k)}</b><details><summary>{html.escape(c[:100])}</summary>{html.escape(c)}"
                    "</details></figcaption></figure>" for k, c in images.items())
    messages = "".join(f"<div class='m {m['role']}'><b>{m['role']}</b>: "
                       f"{_content_html(m['content'], images, files, anchor)}</div>" for m in record["dialogue"])
    meta = html.escape(json.dumps(record.get("synth", {}), ensure_ascii=False))
    return f"<section class='d'><h3 id='{anchor}'>{anchor}</h3><div class='strip'>{strip}</div>{messages}" \
           f"<details><summary>teacher</summary><pre>{meta}</pre></details></section>"


def _img(key: str, files: dict[str, str], css: str) -> str:
    if key not in files:
        return f"<span class='missing'>no file for IMAGE#{html.escape(key)}</span>"
    return f"<img class='{css}' src='{html.escape(files[key])}' alt='IMAGE#{html.escape(key)}'>"


def _content_html(text: str, images: dict[str, str], files: dict[str, str], anchor: str) -> str:
    out, pos = [], 0
    for m in _MARKUP.finditer(text):
        key = m.group(1)
        out.append(html.escape(text[pos:m.start()]))
        out.append(f"<a href='#{anchor}-{html.escape(key)}' title='{html.escape(images.get(key, ''))}'>IMAGE#"
                   f"{html.escape(key)}</a>" + (_img(key, files, "thumb") if m.group(2) else ""))
        pos = m.end()
    return "".join(out) + html.escape(text[pos:])

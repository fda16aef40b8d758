"""Summaries and reports of evaluation runs: the original's aggregation, bootstrap intervals, an HTML page that
shows runs side by side, and score-distribution plots drawn as inline SVG (no plotting library needed).

`summarize`, `render_html` and the SVG functions are pure; `write_outputs` and `load_run` are the file edge. The
per-item result records they read are written by `sparkles/evaluate.py`.
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from ..conversation import SLOT
from ..errors import InputError
from .tasks.common import UNREADABLE, sort_key

CRITERIA = ("C1", "C2", "C3")


def bootstrap_ci(values: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """A percentile bootstrap interval of the mean; None for fewer than two values. Seeded: reruns agree."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(fmean(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return [means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]]


def summarize(results: Sequence[dict], metric: str, *, resamples: int = 1000) -> dict[str, Any]:
    """The numbers of a run. SparklesEval as the original (spec §9.5): average each criterion over items, a turn
    is the mean of its three averaged criteria, the score the mean of the two turns. Items whose judgment failed
    are left out and counted in `failed`; an unreadable BISON/NLVR2 answer counts as wrong and in `unparsed`."""
    scored = [r for r in results if r.get("value") is not None]
    values = [r["value"] for r in scored]
    summary: dict[str, Any] = {"n": len(results), "scored": len(scored),
                               "failed": sum(r["status"] != "ok" for r in results),
                               "generations": sum(r.get("generations", 0) for r in results)}
    if metric == "accuracy":
        summary["accuracy"] = fmean(values) if values else None
        summary["correct"] = int(sum(values))
        summary["unparsed"] = sum(r["status"] == "ok" and not r.get("parsed", True) for r in results)
        # An exact multi-turn task reports per-turn scores as parts "turn_1", "turn_2", …; any other part is a
        # criterion of its own (a question type, say).
        names = sorted({k for r in scored for k in r.get("parts", {})})
        means = {k: fmean(r["parts"][k] for r in scored if k in r["parts"]) for k in names}
        summary["per_turn"] = {k[5:]: v for k, v in means.items() if k.startswith("turn_")} or {
            "1": summary["accuracy"]}
        summary["per_criterion"] = {k: v for k, v in means.items() if not k.startswith("turn_")}
    else:
        names = [f"{c}_{t}" for t in (1, 2) for c in CRITERIA] + ["judge_A1", "judge_A2"]
        means = {k: fmean(r["parts"][k] for r in scored) for k in names} if scored else {}
        turns = {str(t): fmean(means[f"{c}_{t}"] for c in CRITERIA) for t in (1, 2)} if scored else {}
        summary["score"] = (turns["1"] + turns["2"]) / 2 if scored else None
        summary["per_turn"], summary["per_criterion"] = turns, means
    summary["ci95"] = bootstrap_ci(values, resamples=resamples)
    by_images: dict[str, list[float]] = {}
    for r in scored:
        by_images.setdefault(str(r.get("n_images", 0)), []).append(r["value"])
    summary["by_images"] = {k: {"n": len(v), metric: fmean(v)} for k, v in sorted(by_images.items(),
                                                                                  key=lambda kv: int(kv[0]))}
    return summary


def distribution(results: Sequence[dict], metric: str) -> list[tuple[str, int]]:
    """Counts to plot: item scores in bins 1–2, …, 9–10 (SparklesEval), or correct / wrong / unparsed / failed."""
    if metric == "accuracy":
        ok = [r for r in results if r["status"] == "ok"]
        return [("correct", sum(r["value"] == 1 for r in ok)),
                ("wrong", sum(r["value"] == 0 and r.get("parsed", True) for r in ok)),
                ("unparsed", sum(not r.get("parsed", True) for r in ok)),
                ("failed", len(results) - len(ok))]
    bins = [0] * 9
    for r in results:
        if r.get("value") is not None:
            bins[min(8, max(0, int(r["value"]) - 1))] += 1
    return [(f"{k}–{k + 1}", count) for k, count in enumerate(bins, start=1)]


def bars_svg(counts: Sequence[tuple[str, int]], title: str, *, width: int = 360, height: int = 180) -> str:
    """A bar chart as a standalone <svg> element."""
    top = max((c for _, c in counts), default=0) or 1
    pad, base = 24, height - 28
    slot = (width - 2 * pad) / max(1, len(counts))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>',
           f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
           f'<line x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}" stroke="#888"/>']
    for k, (label, count) in enumerate(counts):
        h = (base - 24) * count / top
        x = pad + k * slot + slot * 0.15
        out.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                   f'fill="#4c78a8"><title>{html.escape(label)}: {count}</title></rect>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{base - h - 3:.1f}" text-anchor="middle" '
                   f'font-size="10">{count}</text>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{base + 14}" text-anchor="middle" '
                   f'font-size="10">{html.escape(label)}</text>')
    return "".join(out) + "</svg>"


# The HTML report


@dataclass(frozen=True)
class RunView:
    name: str  # a column heading: the run's model name, or its folder
    meta: dict[str, Any]  # run.json
    summary: dict[str, Any]
    results: Sequence[dict]


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1600px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
.grid{display:grid;gap:.5rem}.grid>div{min-width:0}.answer{white-space:pre-wrap;overflow-wrap:anywhere;
background:#f6f6f6;padding:.5rem;border-radius:4px}
.q{white-space:pre-wrap;margin:.75rem 0 .25rem}.imgs figure{display:inline-block;margin:0 .5rem .5rem 0;
max-width:220px;vertical-align:top;font-size:.8rem}.imgs img{max-width:220px;max-height:160px}
.bad{color:#b00}.ok{color:#070}section{border-top:1px solid #ddd;padding-top:.5rem}
details pre{white-space:pre-wrap;font-size:.85rem}"""


def render_html(runs: Sequence[RunView], image_src: Callable[[str], str]) -> str:
    """One page: the runs' summaries and plots, then every item with its images, turns and each run's answers."""
    task = runs[0].meta.get("task", "evaluation")
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>Sparkles {html.escape(task)}</title>" \
           f"<style>{_STYLE}</style></head><body><h1>Sparkles evaluation: {html.escape(task)}</h1>"
    plots = "".join(bars_svg(distribution(r.results, _metric(r)), r.name) for r in runs)
    by_id = [{res["id"]: res for res in run.results} for run in runs]
    ids = sorted({i for table in by_id for i in table}, key=sort_key)
    items = "".join(_item_html(i, [t.get(i) for t in by_id], runs, image_src) for i in ids)
    return head + _summary_table(runs) + f"<h2>Distributions</h2><div>{plots}</div><h2>Items</h2>{items}</body></html>"


def _metric(run: RunView) -> str:
    return run.meta.get("metric", "accuracy" if "accuracy" in run.summary else "score")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, list) and all(isinstance(v, float) for v in x):
        return "[" + ", ".join(f"{v:.3f}" for v in x) + "]"
    return html.escape(str(x))


def _summary_table(runs: Sequence[RunView]) -> str:
    rows = []
    for run in runs:
        s, metric = run.summary, _metric(run)
        turns = ", ".join(f"turn {k}: {_fmt(v)}" for k, v in s.get("per_turn", {}).items())
        crit = ", ".join(f"{k}: {_fmt(v)}" for k, v in s.get("per_criterion", {}).items())
        cells = [run.name, f"{metric} {_fmt(s.get(metric))}", s["n"], s["failed"], s.get("unparsed", "–"),
                 _fmt(s.get("ci95")), turns, crit or "–", run.meta.get("protocol_hash", "")[:12]]
        rows.append("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>"
                                     for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("run", "result", "n", "failed", "unparsed", "95% CI", "per turn",
                                                "per criterion", "protocol"))
    return f"<h2>Summary</h2><table><tr>{header}</tr>{''.join(rows)}</table>"


def _item_html(item_id: str, results: list[dict | None], runs: Sequence[RunView],
               image_src: Callable[[str], str]) -> str:
    first = next(r for r in results if r is not None)
    figures = "".join(
        f"<figure><img src='{html.escape(image_src(im['source']), quote=True)}' alt='IMAGE#{html.escape(im['label'])}'>"
        f"<figcaption><b>IMAGE#{html.escape(im['label'])}</b> {html.escape(im.get('caption') or '')}</figcaption>"
        f"</figure>" for im in first.get("images", []) if im.get("source"))
    columns = f"style='grid-template-columns:repeat({len(runs)},1fr)'"
    target = f" — expected <b>{html.escape(first['target'])}</b>" if first.get("target") else ""
    out = [f"<section id='item-{html.escape(item_id)}'><h3>Item {html.escape(item_id)}{target}</h3>"
           f"<div class='imgs'>{figures}</div>"]
    for turn, question in enumerate(first.get("turns", [])):
        shown = question.replace(SLOT, "")
        out.append(f"<div class='q'><b>User, turn {turn + 1}:</b> {html.escape(shown)}</div><div class='grid' "
                   f"{columns}>")
        for run, res in zip(runs, results):
            answers = res["answers"] if res else []
            text = answers[turn] if turn < len(answers) else "(no answer)"
            out.append(f"<div><small>{html.escape(run.name)}</small><div class='answer'>{html.escape(text)}</div>"
                       "</div>")
        out.append("</div>")
    out.append(f"<div class='grid' {columns}>" + "".join(_verdict_html(res) for res in results) + "</div>")
    return "".join(out) + "</section>"


def _verdict_html(res: dict | None) -> str:
    if res is None:
        return "<div>(not in this run)</div>"
    if res["status"] != "ok":
        head = f"<span class='bad'>{html.escape(res['status'])}: {html.escape(res.get('error') or '')}</span>"
    elif res.get("target"):
        right = res.get("value") == 1
        said = html.escape(res["prediction"]) if res.get("prediction") else "no option (unparsable answer)"
        head = f"<span class='{'ok' if right else 'bad'}'>predicted {said}</span>"
    else:
        parts = res.get("parts", {})
        head = f"score <b>{_fmt(res.get('value'))}</b> " + " ".join(
            f"{k}={_fmt(v)}" for k, v in parts.items() if not k.startswith("judge_"))
    judgment = res.get("judgment") or {}
    replies = judgment.get("replies") or ([judgment["response"]] if judgment.get("response") else [])
    # The last reply (the one that was read, or the last that could not be) is open; earlier ones fold away.
    details = "".join(f"<details{' open' if k == len(replies) - 1 else ''}><summary>judge reply {k + 1} of "
                      f"{len(replies)}</summary><pre>{html.escape(t)}</pre></details>" for k, t in enumerate(replies))
    return f"<div>{head}{details}</div>"


# Files


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON Lines file; a last line cut short by a kill is skipped, not fatal."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def latest(records: Sequence[dict]) -> dict[str, dict]:
    """The last record of each id: append-only files supersede a record by writing a newer one."""
    return {r["id"]: r for r in records}


def load_run(folder: str | Path) -> RunView:
    """A run folder (run.json + results*.jsonl) as a view; shards in the folder are read together."""
    folder = Path(folder)
    meta_path = folder / "run.json"
    if not meta_path.is_file():
        raise InputError(f"{folder} is not an evaluation run: it has no run.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    records: list[dict] = []
    for path in sorted(folder.glob("results*.jsonl")):
        records += read_jsonl(path)
    results = sorted(latest(records).values(), key=lambda r: sort_key(r["id"]))
    return RunView(meta.get("model_name", folder.name), meta, summarize(results, meta["metric"]), results)


def load_runs(folders: Sequence[str | Path]) -> list[RunView]:
    """Several runs to show side by side; runs of the same model are told apart by their folders."""
    runs = [load_run(f) for f in folders]
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return runs
    return [RunView(f"{r.name} ({Path(f).name})", r.meta, r.summary, r.results) for r, f in zip(runs, folders)]


def image_src_for(page: Path, *, embed: bool = False) -> Callable[[str], str]:
    """Image references for a page at `page`: paths relative to it, or thumbnails as data: URIs with `embed`."""
    import os

    def src(source: str) -> str:
        if source.startswith("data:"):
            return source  # generated images (the shapes world) travel inside the results
        if not embed:
            return Path(os.path.relpath(Path(source).resolve(), page.resolve().parent)).as_posix()
        from ..image import load_image, to_data_uri

        pixels = load_image(source).pixels.copy()
        pixels.thumbnail((320, 320))
        return to_data_uri(pixels, "JPEG")

    return src


def write_outputs(folder: Path, meta: dict[str, Any], results: Sequence[dict]) -> dict[str, Any]:
    """summary.json, the original's result file, report.html and the distribution plot; returns the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, meta["metric"]) | {"task": meta["task"], "model": meta["model_name"],
                                                     "judge": (meta.get("judge") or {}).get("model"),
                                                     "protocol_hash": meta["protocol_hash"]}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_legacy(folder, meta, summary, results)
    view = RunView(meta["model_name"], meta, summary, results)
    page = folder / "report.html"
    page.write_text(render_html([view], image_src_for(page)), encoding="utf-8")
    (folder / "distribution.svg").write_text(bars_svg(distribution(results, meta["metric"]), meta["model_name"]),
                                             encoding="utf-8")
    return summary


def write_legacy(folder: Path, meta: dict[str, Any], summary: dict[str, Any], results: Sequence[dict]) -> Path:
    """The original's result file, which its merge code and HTML viewer read with the numbers of summary.json.

    They hold only what the original's own runs hold: items that were answered and scored. Those left out (a
    generation error, a judgment that never parsed) are listed beside it in `<stem>.left_out.json`, a name the
    original's merge (which reads `<stem>_*.json`) passes over. Unreadable BISON/NLVR2 answers stay in, as
    `"predict": "unreadable"`: they count as wrong in both."""
    stem = f"{meta['legacy_name']}_{meta['model_name']}"
    for old in [*folder.glob(f"{stem}_acc*.json"), folder / f"{stem}.left_out.json"]:
        old.unlink(missing_ok=True)  # the accuracy is in the file name: a rerun's file replaces the old one
    accuracy = summary.get("accuracy")
    name = f"{stem}_acc{accuracy:.3f}.json" if accuracy is not None else f"{stem}.json"
    kept = [r for r in results if r.get("legacy") is not None and r["status"] == "ok" and r["value"] is not None]
    # Runs written before the original's file was readable by its code hold `"predict": null`; fix it on the way.
    records = [r["legacy"] | {"predict": UNREADABLE} if r["legacy"].get("predict", "") is None else r["legacy"]
               for r in kept]
    write_atomic(folder / name, json.dumps(records, indent=4, ensure_ascii=False))
    kept_ids = {id(r) for r in kept}
    left = [{"id": r["id"], "status": r["status"], "error": r.get("error") or "no score"}
            for r in results if id(r) not in kept_ids]
    unreadable = [r["id"] for r in kept if not r.get("parsed", True)]
    if left or unreadable:
        note = {"file": name, "left_out": left, "unreadable_answers_kept_as_wrong": unreadable,
                "why": "the original's code reads only answered, scored items; these are in results.jsonl"}
        write_atomic(folder / f"{stem}.left_out.json", json.dumps(note, indent=2) + "\n")
    return folder / name


def merge_runs(folders: Sequence[str | Path], out: str | Path) -> tuple[dict[str, Any], list[dict]]:
    """Join the shards of one run (from one folder or several) into `out`: run.json, results and answers."""
    folders, out = [Path(f) for f in folders], Path(out)
    metas = []
    for folder in folders:
        if not (folder / "run.json").is_file():
            raise InputError(f"{folder} is not an evaluation run: it has no run.json")
        metas.append(json.loads((folder / "run.json").read_text(encoding="utf-8")))
    if len({m["protocol_hash"] for m in metas}) != 1:
        raise InputError("these folders hold runs of different protocols: " +
                         ", ".join(f"{f}: {m['protocol_hash']}" for f, m in zip(folders, metas)))
    _check_shards([p.name for f in folders for p in f.glob("results.shard*of*.jsonl")])
    results: list[dict] = []
    answers: list[dict] = []
    for folder in folders:
        for path in sorted(folder.glob("results*.jsonl")):
            results += read_jsonl(path)
        for path in sorted(folder.glob("answers*.jsonl")):
            answers += read_jsonl(path)
    # A finished record beats one that ended in an error, whichever shard file it came from.
    merged = latest(sorted(results, key=lambda r: r["status"] != "error"))
    ordered = sorted(merged.values(), key=lambda r: sort_key(r["id"]))
    out.mkdir(parents=True, exist_ok=True)
    meta = metas[0] | {"judge": next((m["judge"] for m in metas if m.get("judge")), None)}
    write_atomic(out / "run.json", json.dumps(meta, indent=2) + "\n")
    write_atomic(out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    done = latest(a for a in answers if a.get("error") is None)
    write_atomic(out / "answers.jsonl", "".join(json.dumps(done[k], ensure_ascii=False) + "\n"
                                                 for k in sorted(done, key=sort_key)))
    return meta, ordered


def _check_shards(names: list[str]) -> None:
    """Every shard i of n must be there: a merge of some shards would look like a whole run."""
    import re

    found = {tuple(map(int, m.groups())) for m in (re.match(r"results\.shard(\d+)of(\d+)\.jsonl", n) for n in names)
             if m}
    for n in {n for _, n in found}:
        missing = [i for i in range(1, n + 1) if (i, n) not in found]
        if missing:
            raise InputError(f"shards {', '.join(f'{i}/{n}' for i in missing)} have no results in these folders")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary sibling, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def markdown_table(runs: Sequence[RunView]) -> str:
    """The runs' headline numbers as a Markdown table, for the terminal and for READMEs."""
    lines = ["| run | task | result | 95% CI | n | failed | unparsed |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        s, metric = run.summary, _metric(run)
        ci = "–" if not s.get("ci95") else f"{s['ci95'][0]:.3f}–{s['ci95'][1]:.3f}"
        value = "–" if s.get(metric) is None else f"{s[metric]:.3f}"
        lines.append(f"| {run.name} | {run.meta.get('task')} | {metric} {value} | {ci} | {s['n']} | {s['failed']} "
                     f"| {s.get('unparsed', '–')} |")
    return "\n".join(lines)

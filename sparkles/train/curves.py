"""Learning curves of a run, read from its metrics.jsonl files: the training loss, and each evaluation score beside
its grey-image baseline. Written as one SVG (no plotting library needed; browsers and GitHub show it) and a
Markdown table, so a run can be looked at, not only read.

A staged run (``out/1-perception``, ``out/2-captions``, …) is drawn stage after stage on one step axis.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from ..errors import InputError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, PAD = 560, 240, 44


def run_parts(run: Path) -> list[tuple[str, Path]]:
    """(stage name, metrics file) in order: the stages of a staged run, or the run itself."""
    stages = sorted((p for p in run.iterdir() if p.is_dir() and p.name.split("-", 1)[0].isdigit()),
                    key=lambda p: int(p.name.split("-", 1)[0])) if run.is_dir() else []
    parts = [(p.name, p / "metrics.jsonl") for p in stages if (p / "metrics.jsonl").is_file()]
    if not parts and (run / "metrics.jsonl").is_file():
        parts = [(run.name, run / "metrics.jsonl")]
    if not parts:
        raise InputError(f"{run}: no metrics.jsonl here or in numbered stage folders (1-NAME/, 2-NAME/, …)")
    return parts


def read_curves(run: Path) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """Training loss per step, each evaluation metric per step, and where each stage starts; steps run on across
    stages. A broken line (a run killed mid-write) is skipped."""
    loss, evals, starts, offset = [], {}, [], 0
    for name, path in run_parts(run):
        starts.append((offset, name))
        last = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = offset + int(row.get("step", 0))
            last = max(last, int(row.get("step", 0)))
            if isinstance(row.get("loss"), (int, float)):
                loss.append((step, float(row["loss"])))
            for key, value in (row.get("eval") or {}).items():
                if isinstance(value, (int, float)):
                    evals.setdefault(key, []).append((step, float(value)))
        offset += last
    return loss, evals, starts


def panel_height(series: dict) -> int:
    """Tall enough for the plot and for one legend line per series."""
    return max(HEIGHT, 2 * PAD + 12 * len(series))


def _panel(title: str, series: dict[str, list[tuple[int, float]]], starts, *, x_max: int, y_max: float,
           top: int, dashed=lambda name: False) -> list[str]:
    left, w, h = PAD, WIDTH - PAD - 150, panel_height(series) - 2 * PAD
    out = [f'<text x="{left}" y="{top + 16}" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top + PAD}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        y = top + PAD + h * (1 - frac)
        out.append(f'<text x="{left - 6}" y="{y + 4:.0f}" font-size="10" text-anchor="end">{y_max * frac:.3g}</text>')
    for step, name in starts:
        x = left + w * step / max(1, x_max)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + PAD}" y2="{top + PAD + h}" stroke="#ccc"/>'
                   f'<text x="{x + 3:.1f}" y="{top + PAD + 11}" font-size="9" fill="#777">{escape(name)}</text>')
    out.append(f'<text x="{left + w}" y="{top + PAD + h + 14}" font-size="10" text-anchor="end">step {x_max}</text>')
    for k, (name, points) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)] if not dashed(name) else PALETTE[(k - 1) % len(PALETTE)]
        path = " ".join(f"{left + w * s / max(1, x_max):.1f},{top + PAD + h * (1 - min(v, y_max) / y_max):.1f}"
                        for s, v in points)
        dash = ' stroke-dasharray="4 3"' if dashed(name) else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        y = top + PAD + 12 * k
        out.append(f'<line x1="{left + w + 10}" x2="{left + w + 28}" y1="{y}" y2="{y}" stroke="{color}"{dash}/>'
                   f'<text x="{left + w + 32}" y="{y + 4}" font-size="10">{escape(name)}</text>')
    return out


def write_curves(run: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """`curves.svg` and `curves.md` for a run folder (by default inside it)."""
    run = Path(run)
    out = Path(out) if out else run
    out.mkdir(parents=True, exist_ok=True)
    loss, evals, starts = read_curves(run)
    x_max = max([s for s, _ in loss] + [s for points in evals.values() for s, _ in points] + [1])
    smooth = _smooth(loss)
    panels = [_panel("training loss (mean of 20 steps)", {"loss": smooth}, starts, x_max=x_max,
                     y_max=max([v for _, v in smooth] + [1e-9]), top=0)]
    height = HEIGHT
    scores = {k: v for k, v in evals.items() if all(0 <= x <= 1 for _, x in v)}
    # Each score and its grey-image baseline side by side: the same colour, the baseline dashed.
    ordered = {}
    for key in sorted(k for k in scores if not k.endswith("_grey")):
        ordered[key] = scores[key]
        if f"{key}_grey" in scores:
            ordered[f"{key}_grey"] = scores[f"{key}_grey"]
    if ordered:
        panels.append(_panel("evaluation on fresh items (dashed: the same on grey images)", ordered, starts,
                             x_max=x_max, y_max=1.0, top=HEIGHT, dashed=lambda n: n.endswith("_grey")))
        height += panel_height(ordered)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>', *[line for p in panels for line in p], "</svg>"]
    svg_path, md_path = out / "curves.svg", out / "curves.md"
    svg_path.write_text("\n".join(svg) + "\n", encoding="utf-8")
    md_path.write_text(_markdown(run, smooth, evals, svg_path.name), encoding="utf-8")
    return svg_path, md_path


def _smooth(points: list[tuple[int, float]], window: int = 20) -> list[tuple[int, float]]:
    out = []
    for start in range(0, len(points), window):
        chunk = points[start:start + window]
        out.append((chunk[-1][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def _markdown(run: Path, loss, evals, svg_name: str) -> str:
    lines = [f"# Learning curves: {run}", "", f"![learning curves]({svg_name})", ""]
    if evals:
        steps = sorted({s for points in evals.values() for s, _ in points})
        keys = sorted(evals)
        lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        table = {k: dict(v) for k, v in evals.items()}
        for step in steps:
            lines.append(f"| {step} | " + " | ".join(f"{table[k][step]:.3f}" if step in table[k] else ""
                                                    for k in keys) + " |")
    if loss:
        lines += ["", f"Training loss: {loss[0][1]:.3f} (first steps) → {loss[-1][1]:.3f} (last steps)."]
    return "\n".join(lines) + "\n"

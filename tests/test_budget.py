"""Each module stays small enough to read in one sitting: the design's hard cap is 400 lines."""

from pathlib import Path

LIMIT = 400


def test_every_module_is_within_the_line_budget():
    package = Path(__file__).resolve().parents[1] / "sparkles"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert sizes, "no modules found"
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"modules over {LIMIT} lines: {over}"

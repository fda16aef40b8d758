"""The house rules of the layout: no import circle between modules, and no layer importing one above it.

Every import counts, including those inside functions and under TYPE_CHECKING: a circle hidden in a function
still ties two modules together.
"""

import ast
from pathlib import Path

import pytest

import sparkles

PACKAGE = Path(__file__).resolve().parents[1] / "sparkles"

# Layers, lowest first: a module may import its own layer and those below. Stage folders share one layer: they
# may use each other's modules (the world imports the original's BISON prompt; evaluation imports the world), which
# the circle check keeps honest.
LAYERS = [
    ("data model", {"errors", "registry", "config", "conversation", "formats", "image", "image_cache", "client",
                    "jsonl"}),
    ("rendering", {"template", "tokenizer", "processor"}),
    ("model", {"model"}),
    ("inference", {"generate", "slab", "llama_step", "lookahead", "request", "session", "batch_session", "prefix",
                   "engine"}),
    ("stages", {"train", "eval", "synth", "world"}),
    ("front ends", {"serve", "cli"}),
]


def module_name(path: Path) -> str:
    parts = ("sparkles", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The sparkles modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sparkles")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sparkles":
                continue
            # `from pkg import module` imports the module; `from module import name` the module itself
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package's public API re-exports from every layer
    for rank, (_, members) in enumerate(LAYERS):
        if parts[1] in members:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def test_no_import_circles():
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_layer_imports_a_higher_one():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer(name) is not None and layer(target) is not None and layer(target) > layer(name):
                wrong.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checks_see_a_circle_and_a_function_level_import(tmp_path):
    """The checker itself: a circle made only by an import inside a function is still found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from .conversation import Text\n    from . import formats\n")
    assert imports("sparkles.m", path, {"sparkles.conversation", "sparkles.formats"}) == {
        "sparkles.conversation", "sparkles.formats"}


def test_every_stage_folder_says_what_lives_there_and_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(PACKAGE)} needs a docstring saying what it may import"


@pytest.mark.parametrize("name", ["load", "Chat", "ChatSession", "Conversation", "Image", "Message", "Text",
                                  "user_message", "SparklesError", "InputError", "ConfigError", "ContextLengthError",
                                  "ImageLoadError", "CheckpointError"])
def test_public_names_stay_where_users_find_them(name):
    assert getattr(sparkles, name) is not None


def test_stage_folders_form_no_circle():
    """Between the folders of the stages too: the world may use evaluation, but then evaluation never the world."""
    folders = {}
    for name, targets in graph().items():
        parts = name.split(".")
        if len(parts) > 2:
            folders.setdefault(parts[1], set()).update(t.split(".")[1] for t in targets
                                                        if len(t.split(".")) > 2 and t.split(".")[1] != parts[1])
    found = cycles(folders)
    assert not found, "circles between folders: " + "; ".join(" <-> ".join(c) for c in found)

"""The house's shape, checked: every module imports, no import cycle between files or between subpackages, and
imports point one way: base modules -> datasets -> recipes and evaluation -> platform -> tuning and bench -> cli.
Imports inside functions count too. The checker is tested on a bad graph first, so it can fail."""
import ast
import importlib
import pkgutil
from collections import defaultdict
from pathlib import Path

import sslab

ROOT = Path(sslab.__file__).parent
# a part's layer; a part may import its own modules and parts of lower layers only (same layer: not each other)
LAYERS = {"config": 0, "dist": 0, "schedules": 0, "plots": 0, "registry": 1, "datasets": 2, "recipes": 3,
          "evaluation": 3, "platform": 4, "tuning": 5, "bench": 5, "api": 5, "cli": 6,
          "sslab": 7}   # the package root: `sslab.train` etc., loaded lazily from api


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the sslab modules it imports (resolved to the longest known module name)."""
    graph = defaultdict(set)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):   # a package's __init__ is not an edge
                    graph[mod].add(name)
    return graph


def part(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else "sslab"


def problems(graph: dict[str, set[str]]) -> list[str]:
    """Cycles between modules, cycles between parts, and imports that climb a layer (or cross within one)."""
    found = []
    for a, targets in graph.items():
        for b in targets:
            pa, pb = part(a), part(b)
            if pa != pb and pb != "sslab" and not LAYERS[pb] < LAYERS[pa]:
                found.append(f"{a} -> {b}: {pa} (layer {LAYERS[pa]}) may not import {pb} (layer {LAYERS[pb]})")
    parts = defaultdict(set)
    for a, targets in graph.items():
        parts[part(a)] |= {part(b) for b in targets} - {part(a)}
    for g, what in ((graph, "modules"), (parts, "parts")):
        seen, stack = {}, []

        def visit(v):
            seen[v] = "open"
            stack.append(v)
            for w in sorted(g.get(v, ())):
                if seen.get(w) == "open":
                    found.append(f"import cycle between {what}: {' -> '.join(stack[stack.index(w):] + [w])}")
                elif w not in seen:
                    visit(w)
            stack.pop()
            seen[v] = "done"
        for v in sorted(g):
            if v not in seen:
                visit(v)
    return found


def test_the_checker_finds_cycles_and_upward_imports():
    bad = {"sslab.recipes.a": {"sslab.platform.loop"}, "sslab.platform.loop": {"sslab.recipes.a"},
           "sslab.evaluation.knn": {"sslab.recipes.b"}, "sslab.datasets.x": {"sslab.datasets.y"},
           "sslab.datasets.y": {"sslab.datasets.x"}}
    found = problems(bad)
    assert any("recipes.a -> sslab.platform.loop: recipes (layer 3) may not import platform" in p for p in found)
    assert any("evaluation (layer 3) may not import recipes (layer 3)" in p for p in found)
    assert any(p.startswith("import cycle between modules: sslab.datasets.x -> sslab.datasets.y") for p in found)
    assert any(p.startswith("import cycle between parts: platform -> recipes -> platform") or
               p.startswith("import cycle between parts: recipes -> platform -> recipes") for p in found)
    assert problems({"sslab.platform.loop": {"sslab.recipes.a", "sslab.dist"}, "sslab.cli": {"sslab.bench.x"}}) == []


def test_every_module_imports():
    for m in pkgutil.walk_packages(sslab.__path__, "sslab."):
        importlib.import_module(m.name)


def test_imports_point_one_way_without_cycles():
    files = module_files()
    assert {part(m) for m in files} - {"sslab"} <= set(LAYERS), "a new part needs its place in LAYERS"
    assert problems(import_graph(files)) == []


def test_only_the_ray_context_and_launch_touch_ray_train_in_the_runtime():
    users = {str(p.relative_to(ROOT)) for p in (ROOT / "platform").glob("*.py") if "ray.train" in p.read_text()}
    assert users <= {"platform/context.py", "platform/launch.py"}, users

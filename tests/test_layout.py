"""The shape of modules/: every import points down the layers that modules/__init__.py lists, no
import cycle exists (imports inside functions and `if TYPE_CHECKING:` blocks count too), and an
import inside a function says why it is there. Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import modules

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modules"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.AST, known: set[str]) -> list[tuple[str, ast.stmt]]:
    """(module of modules/ imported, the import statement) for every import anywhere in `tree`.
    `from modules.x import y` names modules.x.y when that is a module, else modules.x."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if target in known:
                    found.append((target, node))
                elif node.module in known:
                    found.append((node.module, node))
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {target for target, _ in imported_modules(tree, known) if target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int:
    """The index in modules.LAYERS of the package (or top-level module) holding `module`."""
    part = module.split(".")[1]
    for i, layer in enumerate(modules.LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"{module} is in no layer of modules.LAYERS; add its package there")


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_modules():
    found = cycles(import_graph())
    groups = "; ".join(", ".join(group) for group in found)
    assert not found, f"modules that import each other, directly or round a loop: {groups}"


def test_imports_point_down_the_layers():
    upward = [
        f"{name} imports {target}"
        for name, targets in import_graph().items() if name != "modules"
        for target in sorted(targets) if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports that point up modules.LAYERS: " + "; ".join(upward)


def test_every_package_is_in_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    top_level = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    layered = {part for layer in modules.LAYERS for part in layer}
    assert packages | top_level == layered
    assert len(top_level) + 1 <= 5  # at most five .py files at the top of modules/, __init__.py included


def test_an_import_inside_a_function_says_why():
    unexplained = []
    for name, path in source_files().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    if "#" not in here and not above.strip().startswith("#"):
                        unexplained.append(f"{name}:{node.lineno}")
    assert not unexplained, "imports inside functions without a comment saying why: " + ", ".join(unexplained)


def test_the_small_modules_below_everything_load_no_torch():
    """The error type, field limits, option tables, picture decoding and the infotext format are
    read by every layer, the API's validation included, without a model."""
    import subprocess
    import sys

    light = ["modules.app.errors", "modules.app.fields", "modules.generation.options", "modules.images.pictures",
             "modules.images.infotext"]
    code = f"import importlib, sys; [importlib.import_module(m) for m in {light!r}]; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

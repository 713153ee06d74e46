"""The package's import graph, read from the source with ast: no circles, data flows one way,
and imports run down the README's list of modules.

Every ``import`` counts, at the top of a module or inside a function, except those under
``if TYPE_CHECKING:`` (never run). ``python tests/test_imports.py`` prints the graph.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "xpcnn"
#: Layers below the model: they never reach the model, saving or the command line.
LOWER = ("xpcnn.datasets", "xpcnn.layers", "xpcnn.ops", "xpcnn.backend")
UPPER = ("xpcnn.model", "xpcnn.training", "xpcnn.saving", "xpcnn.cli", "xpcnn.onnx_export")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {t for t in _imports(ast.parse(path.read_text()), package, set(files))
                       if t in files and t != name}
    return graph


def _imports(tree: ast.AST, package: str, modules: set[str]) -> set[str]:
    """``from P import m`` imports module P.m where there is one, else (a name) P itself."""
    found: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def _walk_runtime(node: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for orelse in child.orelse:
                yield orelse
                yield from _walk_runtime(orelse)
            continue
        yield child
        yield from _walk_runtime(child)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
    graph = import_graph()
    assert "xpcnn.saving.model_file" in graph["xpcnn.saving.checkpoint"]
    assert "xpcnn.saving" in graph["xpcnn.model"]  # the model imports saving, at the top
    assert "xpcnn.layers.base" in graph["xpcnn.layers.conv"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_data_flows_one_way():
    graph = import_graph()
    for module in graph:
        if _under(module, LOWER):
            above = sorted(m for m in reachable(graph, module) if _under(m, UPPER))
            assert not above, f"{module} imports {above}"
        if _under(module, ("xpcnn.saving",)):
            assert not {"xpcnn.model", "xpcnn.training"} & reachable(graph, module), module


def readme_import_order() -> list[set[str]]:
    """The README's order of the package's top-level modules (What is in the box: "Imports only
    run down this list"), as groups: a module may import only those of later groups."""
    text = " ".join((ROOT.parent / "README.md").read_text().split())
    listed = text.split("module importing only those after it: ", 1)[1].split(". ", 1)[0]
    return [set(re.findall(r"`(\w+)`", group)) for group in listed.split(" -> ")]


def test_imports_run_down_the_readme_list():
    order = readme_import_order()
    rank = {name: i for i, group in enumerate(order) for name in group}
    top = {name.split(".")[1] for name in import_graph() if "." in name} - {"__main__"}
    assert top == set(rank), f"modules the README's list lacks or names wrongly: {top ^ set(rank)}"
    for module, targets in import_graph().items():
        if module.count(".") < 1 or module.endswith("__main__"):
            continue
        for target in targets:
            me, other = module.split(".")[1], target.split(".")[1] if "." in target else None
            assert other is None or other == me or rank[other] > rank[me], \
                f"{module} imports {target}, listed above it in the README"


def test_no_private_names_are_imported_from_the_shared_helpers():
    """trainer.py imported 14 underscore helpers of training/arguments.py (whose every function
    was private though the module serves trainer.py), trainer.py and cli.py the checkpoints'
    _checkpoint_config (cli also _progress), two scripts cli's _split and _percent: what other
    modules use is public. (The package as imported, so that an older copy can be checked.)"""
    import xpcnn

    package = Path(xpcnn.__file__).resolve().parent
    guarded = {"xpcnn.training.arguments", "xpcnn.saving.checkpoint", "xpcnn.cli"}
    private = []
    for path in [*package.rglob("*.py"), *(ROOT.parent / "scripts").glob("*.py")]:
        inside = package in path.parents
        name = module_name(path, package) if inside else ""
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = node.module or ""
            if node.level:  # (relative: from the importing module's package)
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            if source in guarded:
                private += [f"{path.name}: {source}.{a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert private == []
    arguments = ast.parse((package / "training" / "arguments.py").read_text())
    assert not [f.name for f in arguments.body
                if isinstance(f, ast.FunctionDef) and f.name.startswith("_")]


if __name__ == "__main__":
    for module, targets in sorted(import_graph().items()):
        print(f"{module}: {', '.join(sorted(targets)) or '-'}")
    print("circle:", " -> ".join(find_cycle(import_graph()) or ["none"]))

"""Check that first-party imports point one way: no package cycles, no cycles hidden in functions, no upward imports.

Usage: ``python3 scripts/import_structure.py [REPO_ROOT]``; exit 1 when it finds anything.

Why: an import inside a function does not show up when Python loads a module, so two packages can
come to depend on each other (and a module-level cycle can be one refactor away) without any test
failing. This reads every module's source with :mod:`ast` only (nothing is imported) and reports:

* **package cycles**: packages that import each other through any of their modules, counting imports
  inside functions and under ``if TYPE_CHECKING`` (``paca_core.bench`` -> ``paca_core.plan`` ->
  ``paca_core.bench``). A package and its own subpackages are not compared (``paca_core`` holds them).
* **hidden cycles**: an import inside a function (it runs late) or under ``if TYPE_CHECKING`` (it never
  runs) that would close a module-level cycle if it were written at the top of its module.
* **module cycles**: modules that import each other when they are loaded (already a cycle).
* **upward imports**: a module importing from a layer above its own, for each chain in
  :data:`LAYERS` (lowest first).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

#: Top-level packages that are first-party code.
PACKAGES: tuple[str, ...] = ("devices", "backends", "paca_core")
#: Layer chains, lowest first: a module may import from its own layer or a lower one, never a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("devices", "backends", "paca_core"),
    # paca_core's packages, lowest first (docs/ARCHITECTURE.md draws them): what a training step is made of, then a
    # run, then what measures and plans runs (bench may use the planner, never the reverse), then the command line.
    (
        "paca_core.surgery", "paca_core.memory", "paca_core.distributed", "paca_core.layers", "paca_core.methods",
        "paca_core.files", "paca_core.data", "paca_core.train", "paca_core.flags", "paca_core.workloads",
        "paca_core.plan", "paca_core.bench", "paca_core.doctor", "paca_core.integrations", "paca_core.cli",
    ),
)

MODULE_LEVEL, IN_FUNCTION, TYPE_ONLY = "module", "function", "type-checking"


@dataclass(frozen=True)
class ImportEdge:
    """One first-party import: ``importer`` needs ``imported``; ``where`` says when it runs."""

    importer: str
    imported: str
    line: int
    where: str  # MODULE_LEVEL, IN_FUNCTION or TYPE_ONLY
    function: str | None = None


@dataclass
class Report:
    modules: dict[str, Path]
    edges: list[ImportEdge]
    package_cycles: list[list[str]] = field(default_factory=list)
    hidden_cycles: list[tuple[ImportEdge, list[str]]] = field(default_factory=list)
    module_cycles: list[list[str]] = field(default_factory=list)
    upward_imports: list[ImportEdge] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.package_cycles) + len(self.hidden_cycles) + len(self.module_cycles) + len(self.upward_imports)

    def lines(self) -> list[str]:
        out = [f"package cycle: {' -> '.join(cycle + cycle[:1])}" for cycle in self.package_cycles]
        for edge, path in self.hidden_cycles:
            where = f"inside {edge.function}()" if edge.where == IN_FUNCTION else "under TYPE_CHECKING"
            out.append(f"hidden cycle: {edge.importer} imports {edge.imported} {where} (line {edge.line}); "
                       f"at module level: {' -> '.join(path)}")
        out += [f"module cycle: {' -> '.join(cycle + cycle[:1])}" for cycle in self.module_cycles]
        out += [f"upward import: {e.importer} -> {e.imported} (line {e.line}, {e.where})" for e in self.upward_imports]
        in_functions = sum(e.where == IN_FUNCTION for e in self.edges)
        out.append(f"{len(self.modules)} modules, {len(self.edges)} first-party imports ({in_functions} inside functions); "
                   f"{len(self.package_cycles)} package cycles, {len(self.hidden_cycles)} hidden cycles, "
                   f"{len(self.module_cycles)} module cycles, {len(self.upward_imports)} upward imports")
        return out


def find_modules(root: Path, packages: Sequence[str] = PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}``; a package is named by its ``__init__.py``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, str, str | None]]:
    """Every import statement with when it runs (and the enclosing function's name, if any)."""

    def walk(node: ast.AST, where: str, function: str | None):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, where, function
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                name = getattr(child, "name", "<lambda>")
                yield from walk(child, IN_FUNCTION, name if function is None else f"{function}.{name}")
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and where == MODULE_LEVEL:
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), TYPE_ONLY, function)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), where, function)
            else:
                yield from walk(child, where, function)

    yield from walk(tree, MODULE_LEVEL, None)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module a dotted name refers to (its longest known prefix), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement loads: ``from a.b import c`` loads ``a.b.c`` if that is a module, else ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names]


def import_edges(modules: dict[str, Path]) -> list[ImportEdge]:
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, where, function in _imports(tree):
            resolved = {_resolve(target, modules) for target in _targets(node, module, path.name == "__init__.py")}
            for imported in sorted(resolved - {None, module}):
                edges.append(ImportEdge(module, imported, node.lineno, where, function))
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one node (Tarjan), each as a cycle through its members where one exists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(root: str) -> None:  # iterative, so deep graphs do not hit the recursion limit
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(_cycle_through(sorted(component), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle from the component's first member back to it, for messages (the component when none is short)."""
    start = component[0]
    path = shortest_path(graph, start, start, within=set(component))
    return path[:-1] if path else component


def shortest_path(graph: dict[str, set[str]], source: str, target: str, within: set[str] | None = None) -> list[str] | None:
    """Nodes from ``source`` to ``target`` along ``graph`` (breadth first), or None. ``source == target``: a cycle."""
    previous: dict[str, str] = {}
    frontier = [source]
    seen = {source} if source != target else set()
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if within is not None and child not in within:
                    continue
                if child == target:
                    path = [child, node]
                    while path[-1] != source:
                        path.append(previous[path[-1]])
                    return path[::-1]
                if child not in seen:
                    seen.add(child)
                    previous[child] = node
                    following.append(child)
        frontier = following
    return None


def _layer(module: str, chain: Sequence[str]) -> int | None:
    """Position of ``module`` in ``chain`` (its longest matching prefix), or None when it is in none."""
    matches = [(len(name), position) for position, name in enumerate(chain) if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def analyse(root: Path, packages: Sequence[str] = PACKAGES, layers: Sequence[Sequence[str]] = LAYERS) -> Report:
    modules = find_modules(root, packages)
    edges = import_edges(modules)
    report = Report(modules, edges)

    package_graph: dict[str, set[str]] = {}
    for edge in edges:
        a, b = package_of(edge.importer, modules), package_of(edge.imported, modules)
        if a != b and not a.startswith(b + ".") and not b.startswith(a + "."):
            package_graph.setdefault(a, set()).add(b)
    report.package_cycles = strongly_connected(package_graph)

    loaded: dict[str, set[str]] = {}  # what runs when a module is loaded
    for edge in edges:
        if edge.where == MODULE_LEVEL:
            loaded.setdefault(edge.importer, set()).add(edge.imported)
    report.module_cycles = strongly_connected(loaded)
    for edge in edges:
        if edge.where in (IN_FUNCTION, TYPE_ONLY):
            back = shortest_path(loaded, edge.imported, edge.importer)
            if back is not None:
                report.hidden_cycles.append((edge, [edge.importer] + back))

    for edge in edges:
        for chain in layers:
            low, high = _layer(edge.importer, chain), _layer(edge.imported, chain)
            if low is not None and high is not None and high > low:
                report.upward_imports.append(edge)
                break
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1]).resolve()
    report = analyse(root)
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

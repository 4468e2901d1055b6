"""gmbench's internal import graph, built from the source with ``ast`` (no module is imported).

Used by tests/test_import_graph.py; ``python tests/import_graph.py`` prints the graph's
numbers (modules, cycles, deferred imports, largest module).
"""

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it is imported as (pyproject's [tool.setuptools] package-dir).
SOURCE_ROOTS = {"gmbench": "gmbench", "backends": "gmbench.backends", "baselines": "gmbench.baselines"}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a gmbench module, or the top-level name of a third-party one
    line: int
    deferred: bool  # inside a function: runs on the call, not when the importer is imported
    internal: bool


@dataclass
class ImportGraph:
    modules: dict[str, Path]  # module name -> source file
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, set[str]]:
        """Internal edges, module-level and deferred alike: a deferred import closes a cycle too.

        Importing ``a.b.c`` runs ``a/b/__init__.py`` first, so an import also depends on the
        packages above the imported module -- except those above the importer, which are
        already being imported when it runs."""
        graph = {name: set() for name in self.modules}
        for item in self.imports:
            if not item.internal:
                continue
            own = set(_packages_above(item.importer))
            for target in [item.imported, *_packages_above(item.imported)]:
                if target != item.importer and target not in own and target in self.modules:
                    graph[item.importer].add(target)
        return graph

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (Tarjan), largest first."""
        graph = self.edges()
        index, low, on_stack, stack, found = {}, {}, set(), [], []
        counter = [0]

        def visit(start):
            # Iterative Tarjan: the recursion would go as deep as the longest import chain.
            work = [(start, iter(sorted(graph[start])))]
            index[start] = low[start] = counter[0]
            counter[0] += 1
            stack.append(start)
            on_stack.add(start)
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = counter[0]
                        counter[0] += 1
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(sorted(graph[child]))))
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
                        found.append(sorted(component))

        for name in sorted(graph):
            if name not in index:
                visit(name)
        return sorted(found, key=lambda c: (-len(c), c))

    def deferred(self) -> list[Import]:
        return [item for item in self.imports if item.deferred]

    def line_counts(self) -> dict[str, int]:
        return {name: len(path.read_text().splitlines()) for name, path in self.modules.items()}


def _packages_above(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_files() -> dict[str, Path]:
    modules = {}
    for root, package in SOURCE_ROOTS.items():
        for path in sorted((REPO / root).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(REPO / root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, graph: ImportGraph, module: str, is_package: bool):
        self.graph, self.module, self.is_package = graph, module, is_package
        self.depth = 0  # function nesting

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        # `if TYPE_CHECKING:` imports never run, so they are not edges; the else branch runs.
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def add(self, name: str, line: int):
        if name == "gmbench" or name.startswith("gmbench."):
            # Longest prefix that is a module: `from gmbench.mixture import pack` -> gmbench.mixture.
            while name not in self.graph.modules and "." in name:
                name = name.rsplit(".", 1)[0]
            self.graph.imports.append(Import(self.module, name, line, self.depth > 0, True))
        else:
            self.graph.imports.append(Import(self.module, name.split(".")[0], line, self.depth > 0, False))

    def visit_Import(self, node):
        for alias in node.names:
            self.add(alias.name, node.lineno)

    def visit_ImportFrom(self, node):
        if node.level:
            package = self.module if self.is_package else self.module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        for alias in node.names:
            # `from gmbench import training` imports the module gmbench.training, not gmbench/__init__.
            candidate = f"{base}.{alias.name}"
            self.add(candidate if candidate in self.graph.modules else base, node.lineno)


def build() -> ImportGraph:
    graph = ImportGraph(module_files())
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        _Collector(graph, name, path.name == "__init__.py").visit(tree)
    return graph


def summary(graph: ImportGraph) -> str:
    cycles = graph.cycles()
    deferred = graph.deferred()
    internal_deferred = [item for item in deferred if item.internal]
    internal = [item for item in graph.imports if item.internal]
    lines = graph.line_counts()
    largest = max(lines, key=lines.get)
    return "\n".join([
        f"modules: {len(graph.modules)}",
        f"internal imports: {len(internal)} ({len(internal_deferred)} deferred into functions)",
        f"deferred imports, all: {len(deferred)} (third-party: {len(deferred) - len(internal_deferred)})",
        f"cycles (strongly connected components > 1 module): {len(cycles)}, sizes {[len(c) for c in cycles]}",
        *(f"  cycle: {' '.join(c)}" for c in cycles),
        f"largest module: {largest} ({lines[largest]} lines)",
        f"modules over 400 lines: {sorted((n, c) for n, c in lines.items() if c > 400)}",
    ])


if __name__ == "__main__":
    print(summary(build()))

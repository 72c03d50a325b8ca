"""The package's import graph, read from the source (no module is imported): every ``import`` / ``from ... import``
statement anywhere in a module (top level, inside functions, under ``TYPE_CHECKING``) is an edge from that module to
the package module it names. It reports

- import circles: the strongly connected components of the graph with more than one module (or a module importing
  itself); a circle held apart only by imports inside functions is still a circle;
- private names imported across subpackages: ``from mit.a.b import _name`` where ``mit.a`` is not the importer's own
  subpackage.

Usage: ``python tools/import_graph.py [package_dir ...]`` (default ``mit mit_kernels``); exits 1 when either count is
not 0. ``tests/test_import_graph.py`` runs the same checks.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImportEdge:
    """``importer`` imports ``imported`` (a module of the scanned packages) at ``line``; ``names`` are the names
    taken from it by ``from ... import``."""

    importer: str
    imported: str
    line: int
    names: tuple[str, ...]


def module_name(root: Path, path: Path) -> str:
    """``mit/integrations/model.py`` -> ``mit.integrations.model``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(package_dirs: list[Path]) -> tuple[set[str], list[ImportEdge]]:
    """The modules of the packages and every import edge between them."""
    files: dict[str, Path] = {}
    for package in package_dirs:
        root = package.resolve().parent
        for path in sorted(package.resolve().rglob("*.py")):
            files[module_name(root, path)] = path
    modules = set(files)
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    edges: list[ImportEdge] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        here = name if name in packages else name.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known(alias.name, modules)
                    if target:
                        edges.append(ImportEdge(name, target, node.lineno, ()))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:  # `from pkg import submodule`
                        edges.append(ImportEdge(name, submodule, node.lineno, ()))
                    else:
                        target = _known(base, modules)
                        if target:
                            edges.append(ImportEdge(name, target, node.lineno, (alias.name,)))
    return modules, edges


def _known(dotted: str, modules: set[str]) -> str | None:
    """The longest prefix of ``dotted`` that is a scanned module (``import a.b.c`` imports ``a.b.c``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def circles(modules: set[str], edges: list[ImportEdge]) -> list[list[str]]:
    """The import circles: strongly connected components (Tarjan) of more than one module, or a self-import."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative Tarjan (no recursion limit)
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1 or node in graph[node]:
                        found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return sorted(found)


def subpackage(module: str) -> str:
    """The top two levels of a module's name (``mit.integrations.model`` -> ``mit.integrations``)."""
    return ".".join(module.split(".")[:2])


def private_imports(edges: list[ImportEdge]) -> list[ImportEdge]:
    """Edges taking a ``_private`` name from another subpackage's module (dunder names are not private)."""
    return [
        edge
        for edge in edges
        if subpackage(edge.importer) != subpackage(edge.imported)
        and any(n.startswith("_") and not n.startswith("__") for n in edge.names)
    ]


def main(argv: list[str]) -> int:
    roots = [Path(arg) for arg in argv] or [Path("mit"), Path("mit_kernels")]
    modules, edges = scan(roots)
    found = circles(modules, edges)
    private = private_imports(edges)
    print(f"{len(modules)} modules, {len(edges)} import edges")
    print(f"import circles: {len(found)}")
    for component in found:
        inside = sorted({(e.importer, e.line, e.imported) for e in edges if {e.importer, e.imported} <= set(component)})
        print("  " + " <-> ".join(component))
        for importer, line, imported in inside:
            print(f"    {importer}:{line} -> {imported}")
    print(f"private names imported across subpackages: {len(private)}")
    for edge in private:
        print(f"  {edge.importer}:{edge.line} takes {', '.join(edge.names)} from {edge.imported}")
    return 1 if found or private else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The package's import graph, read from the source by tools/import_graph.py: no import circle anywhere (imports
inside functions count), no private name imported across subpackages; and the checker itself finds both."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def checker():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


def test_the_packages_have_no_import_circle_and_take_no_private_name_across_subpackages():
    graph = checker()
    modules, edges = graph.scan([ROOT / "mit", ROOT / "mit_kernels"])
    assert {"mit.hf.classes", "mit.integrations.model", "mit.neural.model", "mit_kernels.backends"} <= modules
    assert graph.circles(modules, edges) == []
    assert graph.private_imports(edges) == []


def test_the_checker_finds_a_circle_through_a_function_level_import_and_a_private_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "a").mkdir(parents=True)
    (package / "b").mkdir()
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("from .one import thing\n")
    (package / "a" / "one.py").write_text("def thing():\n    from ..b.two import _hidden\n    return _hidden\n")
    (package / "b" / "__init__.py").write_text("")
    (package / "b" / "two.py").write_text("import pkg.a\n_hidden = 1\n")
    graph = checker()
    modules, edges = graph.scan([package])
    assert graph.circles(modules, edges) == [["pkg.a", "pkg.a.one", "pkg.b.two"]]
    assert [(e.importer, e.names) for e in graph.private_imports(edges)] == [("pkg.a.one", ("_hidden",))]
    assert graph.main([str(package)]) == 1

"""gmbench's import graph (built from the source with ast, tests/import_graph.py): no cycles
among gmbench's modules, and every import deferred into a function has a stated reason.

A deferred import still counts as an edge of the graph: it hides a cycle from the
interpreter, not from a reader, so it does not make a cycle acceptable.
"""

from fnmatch import fnmatchcase

import pytest

import import_graph

# Third-party (and platform-specific standard library) modules imported inside functions.
DEFERRED_THIRD_PARTY: dict[str, str] = {
    "torch": "start-up time: `gmbench --help`, `gmbench suites`, the plugin listing and the "
             "environment record run without importing torch (seconds)",
    "torch_geometric": "optional extra (PointNet++ baseline) and slow to import",
    "torch_cluster": "optional extra (PointNet++ sampling)",
    "matplotlib": "start-up time: only figures need it",
    "ray": "optional extra (--executor ray)",
    "tensorboard": "optional extra (tensorboard logger)",
    "mlflow": "optional extra (mlflow logger)",
    "alembic": "optional, comes with mlflow (its database migration logging is quietened)",
    "sqlalchemy": "optional, comes with mlflow",
    "triton": "optional extra, GPU only",
    "sklearn": "start-up time: only the digits data set uses it",
    "pandas": "start-up time: only the results table of `gmbench run` needs it there",
    "tqdm": "progress bars: imported only where a bar is drawn",
    "yaml": "CLI start-up: `gmbench suites` reads a suite only when asked to",
    "pathlib": "CLI start-up: the data sub-command loads nothing until it runs",
    "ctypes": "Linux only (prctl PR_SET_PDEATHSIG in a worker process)",
    "fcntl": "POSIX only (flock); imported where the lock is taken",
    "multiprocessing": "only the process-pool paths use it",
}

# Internal imports inside functions: "importer -> imported" (fnmatch patterns) and why.
DEFERRED_INTERNAL: dict[str, list[str]] = {
    "CLI start-up: `gmbench <command>` imports only the code of the command it runs": [
        "gmbench.commands.* -> *",
    ],
    "optional or heavy implementation, chosen at run time (triton kernels, the native CPU node fit, "
    "the PointNet++ sampling backend, every fitting/reduction plugin behind the fitting layer)": [
        "gmbench.backends.fused -> gmbench.backends.triton_kernels",
        "gmbench.reduction.implementation -> gmbench.backends.node_fit_cpu",
        "gmbench.reduction.implementation -> gmbench.backends.node_fit_triton",
        "gmbench.backends.node_fit_triton -> gmbench.backends.node_fit_triton_kernels",
        "gmbench.environment -> gmbench.baselines.sampling",
        "gmbench.models.gmcn -> gmbench.layers",
    ],
    "the mixture functions ask the active backend at call time; backend modules import gmbench.mixture": [
        "gmbench.mixture -> gmbench.backends",
    ],
    "start-up time: matplotlib, only when a report draws its figures": [
        "gmbench.report.document -> gmbench.report.figures",
    ],
}


@pytest.fixture(scope="module")
def graph():
    return import_graph.build()


def test_no_import_cycles_among_gmbench_modules(graph):
    cycles = graph.cycles()
    assert not cycles, f"import cycle(s) among gmbench's modules (each a set that import each other): {cycles}"


def test_every_deferred_third_party_import_has_a_reason(graph):
    unexplained = sorted({f"{i.importer}:{i.line} imports {i.imported}" for i in graph.deferred()
                          if not i.internal and i.imported not in DEFERRED_THIRD_PARTY})
    assert not unexplained, ("import these at module level, or add the module to DEFERRED_THIRD_PARTY "
                             f"with the reason it is deferred: {unexplained}")
    used = {i.imported for i in graph.deferred() if not i.internal}
    stale = sorted(set(DEFERRED_THIRD_PARTY) - used)
    assert not stale, f"no function imports these any more: remove them from DEFERRED_THIRD_PARTY: {stale}"


def test_every_deferred_internal_import_has_a_reason(graph):
    patterns = [p for group in DEFERRED_INTERNAL.values() for p in group]
    pairs = {f"{i.importer} -> {i.imported}": i for i in graph.deferred() if i.internal}
    unexplained = sorted(f"{pair} (line {i.line})" for pair, i in pairs.items()
                         if not any(fnmatchcase(pair, p) for p in patterns))
    assert not unexplained, ("import these at module level, or list them in DEFERRED_INTERNAL with the "
                             f"reason they are deferred: {unexplained}")
    stale = [p for p in patterns if not any(fnmatchcase(pair, p) for pair in pairs)]
    assert not stale, f"these DEFERRED_INTERNAL entries match nothing any more: {stale}"


def test_the_graph_sees_module_and_function_level_imports_and_finds_a_cycle(tmp_path, monkeypatch):
    """The builder itself: relative and absolute imports, both levels, TYPE_CHECKING skipped."""
    package = tmp_path / "gmbench"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from gmbench import b\n")
    (package / "b.py").write_text("def later():\n    from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gmbench import d\n"
        "import gmbench.a\n")
    (package / "d.py").write_text("from gmbench.sub.c import x\nimport matplotlib.pyplot\n")
    monkeypatch.setattr(import_graph, "REPO", tmp_path)
    monkeypatch.setattr(import_graph, "SOURCE_ROOTS", {"gmbench": "gmbench"})
    graph = import_graph.build()
    assert graph.cycles() == [["gmbench.a", "gmbench.b", "gmbench.sub.c"]]
    assert [(i.importer, i.imported) for i in graph.deferred()] == [("gmbench.b", "gmbench.sub.c")]
    assert ("gmbench.d", "matplotlib", False) in [(i.importer, i.imported, i.internal) for i in graph.imports]
    assert "gmbench.d" not in graph.edges()["gmbench.sub.c"]


def test_importing_a_submodule_depends_on_the_package_above_it(tmp_path, monkeypatch):
    """``import gmbench.pkg.leaf`` runs gmbench/pkg/__init__.py: a cycle through it counts."""
    package = tmp_path / "gmbench"
    (package / "pkg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pkg" / "__init__.py").write_text("from gmbench.pkg import user\n")
    (package / "pkg" / "user.py").write_text("from gmbench.pkg.sibling import x\nfrom gmbench import launcher\n")
    (package / "pkg" / "sibling.py").write_text("x = 1\n")
    (package / "launcher.py").write_text("from gmbench.pkg.sibling import x\n")
    monkeypatch.setattr(import_graph, "REPO", tmp_path)
    monkeypatch.setattr(import_graph, "SOURCE_ROOTS", {"gmbench": "gmbench"})
    graph = import_graph.build()
    # launcher -> gmbench.pkg (its __init__ runs first) -> user -> launcher
    assert graph.cycles() == [["gmbench.launcher", "gmbench.pkg", "gmbench.pkg.user"]]
    assert "gmbench.pkg" not in graph.edges()["gmbench.pkg.user"]  # its own package is already loading

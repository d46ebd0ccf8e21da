"""The shape of the code, checked from its imports, counting every import wherever it sits (inside functions and
under ``TYPE_CHECKING`` too, since each of those is a real dependency at some point):

* the package layers point one way: ``core`` (model, contracts) < ``connectors`` (Kafka, Redis, media, metrics)
  < ``stream`` (settings composition, runtime, commands). An upward import makes the lower layer unusable without
  the upper one (training would pull in the Kafka runtime);
* no import cycle among the modules of ``core``, ``connectors`` and ``stream``;
* inside ``core``: the paper's maths (``core.drf``) knows no encoder, the encoders know no model, checkpoint or
  inference (their build-time command, ``core/encoders/__main__.py``, is the one module that reads a checkpoint),
  and serving (``core.inference``) reaches neither training, evaluation nor matplotlib.

Each check fails with the file and line of the import that breaks it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "connectors", "stream")
#: Each package and the project packages it must never import.
FORBIDDEN = {"core": ("stream", "connectors"), "connectors": ("stream",), "stream": ()}
#: Inside core: (importer prefix, imported prefixes it must never reach directly, importers exempt).
CORE_RULES = [
    ("core.drf", ("core.encoders",), ()),
    ("core.encoders", ("core.model", "core.checkpoint", "core.inference"), ("core.encoders.__main__",)),
]
#: What serving must never load, directly or through anything it imports.
NOT_FOR_SERVING = ("core.training", "core.evaluation", "matplotlib")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module a file imports, wherever the import sits (function bodies and TYPE_CHECKING blocks too);
    ``from package import name`` also counts ``package.name`` when that is a module of the tree."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found.append((node.lineno, base))
            found += [
                (node.lineno, f"{base}.{alias.name}")
                for alias in node.names
                if _is_module(root, f"{base}.{alias.name}")
            ]
    return found


def _is_module(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def project_files(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> list[Path]:
    return sorted(p for package in packages for p in (root / package).rglob("*.py"))


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, dict[str, str]]:
    """module -> {imported project module: "file:line"}. Importing ``a.b.c`` from outside package ``a.b`` also
    runs ``a.b``'s ``__init__``, so that counts as an edge; inside ``a.b`` it does not (the package is already
    being imported)."""
    packages = tuple(packages)
    graph: dict[str, dict[str, str]] = {}
    for path in project_files(root, packages):
        name = module_name(path, root)
        edges = graph.setdefault(name, {})
        for line, imported in imported_modules(path, root):
            if imported.split(".")[0] not in packages:
                continue
            parts = imported.split(".")
            for depth in range(2, len(parts) + 1):
                target = ".".join(parts[:depth])
                inside = name == target or name.startswith(target + ".")
                if target != name and not inside and _is_module(root, target):
                    edges.setdefault(target, f"{path.relative_to(root)}:{line}")
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as its sorted module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def upward_imports(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in project_files(packages=(package,))
        for line, module in imported_modules(path)
        if module.split(".")[0] in forbidden
    ]


def reachable(graph: dict[str, dict[str, str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not, with the import that first reached it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        for target, where in graph.get(todo.pop(), {}).items():
            if target not in seen:
                seen[target] = where
                todo.append(target)
    return seen


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package: str) -> None:
    assert upward_imports(package) == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = import_cycles(graph)
    assert cycles == [], [
        [f"{m} -> {t} ({w})" for m in cycle for t, w in graph[m].items() if t in cycle] for cycle in cycles
    ]


@pytest.mark.parametrize(("importer", "forbidden", "exempt"), CORE_RULES)
def test_core_subpackages_keep_to_their_job(
    importer: str, forbidden: tuple[str, ...], exempt: tuple[str, ...]
) -> None:
    graph = import_graph()
    broken = [
        f"{where} imports {target}"
        for module, edges in graph.items()
        if (module == importer or module.startswith(importer + ".")) and module not in exempt
        for target, where in edges.items()
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert broken == []


def test_serving_reaches_no_trainer_evaluation_or_plotting() -> None:
    """Statically, counting imports inside functions: whatever code path serving takes, it cannot load them."""
    graph = import_graph()
    for path in project_files(packages=("core",)):
        graph.setdefault(module_name(path), {}).update(
            {m: f"{path.relative_to(ROOT)}:{line}" for line, m in imported_modules(path) if m == "matplotlib"}
        )
    reached = reachable(graph, "core.inference")
    assert {m: w for m, w in reached.items() if m.startswith(NOT_FOR_SERVING)} == {}


def test_the_checks_see_what_they_must(tmp_path: Path) -> None:
    """An upward import, a relative import, a cycle closed inside a function, and a package's __init__."""
    (tmp_path / "core" / "sub").mkdir(parents=True)
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "sub" / "__init__.py").write_text("from core.sub.b import B\n")
    (tmp_path / "core" / "a.py").write_text(
        "def f():\n    from stream.settings import Settings\n    import connectors.kafka\n    from core.sub import b\n"
    )
    (tmp_path / "core" / "sub" / "b.py").write_text("from .c import C\nB = 1\n")
    (tmp_path / "core" / "sub" / "c.py").write_text("def g():\n    from core import a\nC = 1\n")
    found = [m for _, m in imported_modules(tmp_path / "core" / "a.py", tmp_path)]
    assert found == ["stream.settings", "connectors.kafka", "core.sub", "core.sub.b"]
    graph = import_graph(tmp_path, ("core",))
    assert graph["core.sub.b"] == {"core.sub.c": "core/sub/b.py:1"}
    assert import_cycles(graph) == [["core.a", "core.sub", "core.sub.b", "core.sub.c"]]


def test_importing_inference_loads_no_trainer_and_core_no_service() -> None:
    code = (
        "import sys, core.contracts, core.data.jsonl, core.drf, core.inference; "
        "print(sorted({m for m in sys.modules if m.split('.')[0] in ('stream', 'connectors', 'matplotlib')"
        " or m.startswith(('core.training', 'core.evaluation'))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_is_packages_with_a_small_top_level() -> None:
    """At most 8 modules directly in core/, no file in the three packages over 450 lines."""
    top = sorted(p.name for p in (ROOT / "core").glob("*.py"))
    assert len(top) <= 8, top
    long = {
        str(p.relative_to(ROOT)): n for p in project_files() if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}

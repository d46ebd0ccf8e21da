"""The package layers point one way: ``core`` (model, contracts) < ``connectors`` (Kafka, Redis, media, metrics)
< ``stream`` (settings composition, runtime, commands). An upward import makes the lower layer unusable
without the upper one (training would pull in the Kafka runtime), so it fails here, with the line."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Each package and the project packages it must never import.
FORBIDDEN = {"core": ("stream", "connectors"), "connectors": ("stream",), "stream": ()}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, wherever the import sits (function bodies and TYPE_CHECKING blocks too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in forbidden
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package: str) -> None:
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stream.settings import Settings\n    import connectors.kafka\n")
    assert [m for _, m in imported_modules(bad)] == ["stream.settings", "connectors.kafka"]


def test_importing_core_loads_neither_stream_nor_connectors() -> None:
    import subprocess

    code = (
        "import sys, core.contracts, core.data.jsonl, core.distribution; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'stream', 'connectors'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

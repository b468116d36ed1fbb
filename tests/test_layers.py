"""tl_core's layers point down, and no import cycle exists anywhere in it (docs/design.md, "Layers").

The layers are the import-linter contract in pyproject.toml, run here in-process; the cycle check walks every import
grimp sees: at module level, inside functions and under ``TYPE_CHECKING``. Each check is first shown to fail on a
package that breaks it, so a green run means something.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import importlinter.api  # noqa: F401  (importing it configures import-linter, as its command does)
import pytest
from importlinter.application import use_cases

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _lint(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    """Run import-linter's contracts of ``config`` in this process: (kept, the report it printed)."""
    kept = use_cases.lint_imports(config_filename=str(config), cache_dir=None, no_logo=True)
    return kept, capsys.readouterr().out


def import_cycles(package: str) -> list[tuple[str, ...]]:
    """Every import cycle among the modules of ``package``, one shortest loop per strongly connected group.

    Returns:
        Loops such as ``("a.x", "a.y", "a.x")``; empty when the import graph has none.
    """
    graph = grimp.build_graph(package, cache_dir=None)
    cycles: list[tuple[str, ...]] = []
    seen: set[frozenset[str]] = set()
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None and frozenset(back) not in seen:
                seen.add(frozenset(back))
                cycles.append((importer, *back))
    return cycles


def test_the_layers_contract_is_kept(capsys):
    kept, report = _lint(PYPROJECT, capsys)
    assert kept, f"an import runs up the layers (fix the import, or the layers in pyproject.toml):\n{report}"


def test_the_contract_fails_on_an_import_that_runs_up(tmp_path, capsys):
    # the CLI imports the jobs layer: with the two swapped, the same machinery must report it
    config = tmp_path / "pyproject.toml"
    config.write_text('[tool.importlinter]\nroot_package = "tl_core"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "swapped"\ntype = "layers"\nlayers = ["tl_core.runs", "tl_core.cli"]\n')
    kept, report = _lint(config, capsys)
    assert not kept
    assert "tl_core.cli is not allowed to import tl_core.runs" in report


def test_no_import_cycle_in_tl_core():
    cycles = import_cycles("tl_core")
    assert not cycles, "import cycles in tl_core (move the shared part down a layer):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_inside_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "ringpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a  # hidden in a function: still a cycle\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_cycles("ringpkg") == [("ringpkg.a", "ringpkg.b", "ringpkg.a")]
    finally:
        sys.modules.pop("ringpkg", None)

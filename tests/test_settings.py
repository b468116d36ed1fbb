"""The ``TL_*`` settings table (tl_core/settings.py): validated, listed by `tl-core settings`, documented, and the
only reader of ``TL_*`` variables; and the documentation's shape (README in one screen, links that resolve)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT, cli_fail, cli_json
from tl_core.errors import ConfigError
from tl_core.settings import SETTINGS, setting

DOCS = sorted((ROOT / "docs").glob("*.md"))


def _python_sources() -> list[Path]:
    return sorted((ROOT / "tl_core").rglob("*.py")) + sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py"]


def _environ_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``os.environ.get("TL_X")``, ``os.environ["TL_X"]``, ``os.getenv("TL_X")`` reads in a module: (line, name)."""
    out = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            text = ast.unparse(f)
            if text in ("os.environ.get", "environ.get", "os.getenv", "getenv", "os.environ.setdefault"):
                name = node.args[0].value
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ") \
                and isinstance(node.slice, ast.Constant) and isinstance(node.ctx, ast.Load):
            name = node.slice.value
        if isinstance(name, str) and name.startswith("TL_"):
            out.append((node.lineno, name))
    return out


def test_only_the_settings_module_reads_tl_variables():
    offenders = []
    for path in _python_sources():
        if path.name == "settings.py" and path.parent.name == "tl_core":
            continue
        for line, name in _environ_reads(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(ROOT)}:{line} reads {name}")
    assert not offenders, "read TL_* settings with tl_core.settings.setting(): " + "; ".join(offenders)


def test_the_reader_finder_finds_reads():
    """The check above would pass on a finder that finds nothing: it must see each form of read."""
    src = 'import os\na = os.environ.get("TL_A")\nb = os.environ["TL_B"]\nc = os.getenv("TL_C", "1")\n' \
          'os.environ["TL_D"] = "1"\ne = os.environ.get("HOME")\n'
    assert [n for _, n in _environ_reads(ast.parse(src))] == ["TL_A", "TL_B", "TL_C"]


def test_every_tl_variable_named_in_the_engine_is_a_setting():
    """A ``TL_*`` name written in a string of tl_core (outside the settings table) is a setting, so a new one
    cannot be read by some other path (``{**os.environ}`` lookups, a helper) without entering the table."""
    names = set()
    for path in (ROOT / "tl_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names |= set(re.findall(r"^(TL_[A-Z_]+)$", node.value))
    assert names and names <= set(SETTINGS), names - set(SETTINGS)


def test_every_setting_is_documented():
    text = "\n".join(p.read_text() for p in DOCS)
    missing = [name for name in SETTINGS if f"`{name}`" not in text]
    assert not missing, f"document these settings in docs/settings.md: {missing}"
    table = (ROOT / "docs" / "settings.md").read_text()
    for s in SETTINGS.values():
        assert s.help in table, f"docs/settings.md: {s.name}'s help differs from tl_core/settings.py"


def test_defaults_and_values(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert setting("TL_CACHE_MAX_GB") == 5.0 and setting("TL_ENGINE") == "auto"
    assert setting("TL_MAX_WORKERS") >= 1 and setting("TL_DECODE_THREADS") >= 1
    assert setting("TL_HOME") == Path.home() / ".tl_studio"
    assert setting("TL_CACHE_DIR", Path("/x")) == Path("/x")  # the caller's default when unset
    monkeypatch.setenv("TL_MAX_WORKERS", " 3 ")
    monkeypatch.setenv("TL_ENGINE", "ONNX")
    monkeypatch.setenv("TL_TRAIN_PROCS", "all")
    monkeypatch.setenv("TL_CACHE_MAX_GB", "0.5")
    assert (setting("TL_MAX_WORKERS"), setting("TL_ENGINE"), setting("TL_TRAIN_PROCS"),
            setting("TL_CACHE_MAX_GB")) == (3, "onnx", "all", 0.5)
    monkeypatch.setenv("TL_MAX_WORKERS", "")  # empty = unset
    assert setting("TL_MAX_WORKERS") == SETTINGS["TL_MAX_WORKERS"].default or setting("TL_MAX_WORKERS") >= 1


@pytest.mark.parametrize("name,bad", [("TL_CACHE_MAX_GB", "5GB"), ("TL_MAX_WORKERS", "0"),
                                      ("TL_INTERACTIVE_IDLE_S", "-1"), ("TL_TRAIN_PROCS", "two"),
                                      ("TL_ENGINE", "fastest"), ("TL_TASK_KEEP_DAYS", "nan"),
                                      ("TL_ONNX_MIN_IMAGES", "-5")])
def test_a_typo_is_a_config_error_naming_the_variable(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(ConfigError, match=f"{name}='{re.escape(bad)}' is not valid: {name} takes "):
        setting(name)


def test_the_cache_cap_refuses_a_typo_instead_of_crashing(monkeypatch, tmp_path):
    """cache.py parsed TL_CACHE_MAX_GB itself and crashed with a ValueError on '5GB'."""
    from tl_core.cache import enforce_cache_limit

    monkeypatch.setenv("TL_CACHE_MAX_GB", "5GB")
    with pytest.raises(ConfigError, match="TL_CACHE_MAX_GB"):
        enforce_cache_limit(tmp_path)


def test_tl_core_settings_lists_every_setting(capsys, monkeypatch):
    monkeypatch.setenv("TL_MAX_WORKERS", "two")
    rows = cli_json(capsys, "settings", "--json")  # listing works with a bad value, and says what is wrong
    assert [r["name"] for r in rows] == list(SETTINGS)
    by = {r["name"]: r for r in rows}
    assert by["TL_MAX_WORKERS"]["value"] == "two" and "TL_MAX_WORKERS" in by["TL_MAX_WORKERS"]["error"]
    assert by["TL_ENGINE"]["default"] == "auto" and by["TL_ENGINE"]["error"] is None
    # every other command refuses to start: one error line, exit 2
    assert "TL_MAX_WORKERS='two'" in cli_fail(capsys, "runs")  # (with --json also a JSON document: test_cli.py)


# -- the documentation ----------------------------------------------------------------------------------
def test_the_readme_fits_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    text = "\n".join(lines)
    assert "make app" in text and "make test" in text


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


# written by other parts of the same change; the README links them already
def test_every_relative_link_resolves_inside_the_repository():
    seen = 0
    for path in [ROOT / "README.md", *DOCS]:
        for link in _links(path):
            if re.match(r"[a-z]+:", link) or link.startswith("#"):
                assert not link.startswith("file:"), (path.name, link)
                continue
            seen += 1
            target = (path.parent / link.split("#")[0]).resolve()
            assert target.is_relative_to(ROOT), f"{path.name} links outside the repository: {link}"
            rel = target.relative_to(ROOT).as_posix()
            assert target.exists(), f"{path.name}: broken link {link}"
    assert seen >= 10

"""The engine stays UI-free (DESIGN.md convention 1) and documents its public surface, in every sub-package."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tl_core

ENGINE = Path(tl_core.__file__).parent


def _modules() -> list[pkgutil.ModuleInfo]:
    """Every module and sub-package of tl_core, at any depth."""
    return list(pkgutil.walk_packages(tl_core.__path__, prefix="tl_core."))


def test_the_walk_sees_every_sub_package():
    names = {m.name for m in _modules()}
    for pkg in ("storage", "data", "models", "runs", "insight", "share"):
        assert f"tl_core.{pkg}" in names
    assert {"tl_core.storage.files", "tl_core.share.loading", "tl_core.models.training", "tl_core.cache"} <= names
    # every .py file of the engine is a module the checks below import
    files = {".".join(("tl_core", *p.relative_to(ENGINE).with_suffix("").parts)).removesuffix(".__init__")
             for p in ENGINE.rglob("*.py")}
    assert files == names | {"tl_core"}


@pytest.mark.processes
def test_tl_core_never_imports_streamlit():
    code = (
        "import pkgutil, importlib, sys, tl_core\n"
        "for m in pkgutil.walk_packages(tl_core.__path__, prefix='tl_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('streamlit' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for f in ENGINE.rglob("*.py"):
        text = f.read_text()
        assert "import streamlit" not in text and "from streamlit" not in text, f


def test_every_module_declares_all_and_documents_public_functions():
    documented = 0
    for m in _modules():
        mod = importlib.import_module(m.name)
        assert mod.__doc__, f"{m.name} has no module docstring"
        if m.ispkg or m.name.endswith("__main__"):
            continue  # a sub-package's __init__ only says what it holds; import from its modules
        assert hasattr(mod, "__all__"), f"{m.name} lacks __all__"
        for name in mod.__all__:
            assert hasattr(mod, name), f"{m.name}.__all__ names {name}, which it does not define"
            obj = getattr(mod, name)
            if callable(obj) and not isinstance(obj, type) and getattr(obj, "__module__", "") == mod.__name__:
                assert obj.__doc__, f"{m.name}.{name} has no docstring"
                documented += 1
    assert documented >= 100, f"only {documented} public functions were checked: is the filter still right?"


def test_torch_load_is_always_weights_only():
    for f in ENGINE.rglob("*.py"):
        for line in f.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"

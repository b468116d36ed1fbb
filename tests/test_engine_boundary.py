"""The engine stays UI-free (DESIGN.md convention 1) and documents its public surface."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import tl_core

ENGINE = Path(tl_core.__file__).parent


def test_tl_core_never_imports_streamlit():
    code = (
        "import pkgutil, importlib, sys, tl_core\n"
        "for m in pkgutil.iter_modules(tl_core.__path__):\n"
        "    importlib.import_module('tl_core.' + m.name)\n"
        "print('streamlit' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for f in ENGINE.glob("*.py"):
        text = f.read_text()
        assert "import streamlit" not in text and "from streamlit" not in text, f.name


def test_every_module_declares_all_and_documents_public_functions():
    for m in pkgutil.iter_modules(tl_core.__path__):
        mod = importlib.import_module("tl_core." + m.name)
        assert mod.__doc__, f"{m.name} has no module docstring"
        if m.name in ("__main__",):
            continue
        assert hasattr(mod, "__all__"), f"{m.name} lacks __all__"
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and not isinstance(obj, type) and getattr(obj, "__module__", "") == mod.__name__:
                assert obj.__doc__, f"{m.name}.{name} has no docstring"


def test_torch_load_is_always_weights_only():
    for f in ENGINE.glob("*.py"):
        for line in f.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f.name}: {line.strip()}"

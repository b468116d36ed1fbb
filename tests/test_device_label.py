"""The device line the app shows before anything runs says "1 core", not "1 cores"."""

from __future__ import annotations

import pytest

from tl_core.models import devices


@pytest.mark.parametrize("n, text", [(1, "CPU (1 core)"), (2, "CPU (2 cores)"), (16, "CPU (16 cores)")])
def test_the_cpu_line_counts_cores_in_words(monkeypatch, n, text):
    monkeypatch.setattr(devices.Path, "glob", lambda self, pattern: iter(()))  # no /dev/nvidia*
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no nvidia-smi
    monkeypatch.setattr(devices.platform, "system", lambda: "Linux")
    monkeypatch.setattr(devices, "cpu_count", lambda: n)
    assert devices.describe_auto_device() == text

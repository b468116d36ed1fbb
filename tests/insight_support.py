"""Shared data for the insight tests (advisor, audit, embedding, explain, calibrate, lab).

Everything lives under the session's ``shared_cache`` folder and is built idempotently, so the test files
share one workspace (one feature cache: each image is embedded once per backbone for the whole session)
and small, real subsets of the sample data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import EMOJI, FASHION

#: Images per class of the small emoji subset (5 classes), and of the small Fashion-MNIST subset (10 classes).
EMOJI_PER_CLASS = 12
FASHION_PER_CLASS = 8


def copy_subset(src: Path, dst: Path, per_class: int, offset: int = 0) -> Path:
    """Copy the first ``per_class`` files (sorted, after ``offset``) of every class folder of ``src``."""
    done = dst / ".complete"
    if done.exists():
        return dst
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / cls.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[offset:offset + per_class]:
            shutil.copy(f, out / f.name)
    done.write_text("ok")
    return dst


def insight_home(shared_cache: Path) -> Path:
    """The workspace folder the insight tests share."""
    return shared_cache / "insight_home"


def insight_workspace(shared_cache: Path):
    """The shared :class:`Workspace`."""
    from tl_core.storage.workspace import Workspace

    return Workspace(insight_home(shared_cache))


def emoji_small(shared_cache: Path) -> Path:
    """5 classes x 12 real emoji PNGs (transparent 64 px)."""
    return copy_subset(EMOJI, shared_cache / "emoji12", EMOJI_PER_CLASS)


def fashion_small(shared_cache: Path) -> Path:
    """10 classes x 8 real Fashion-MNIST training images (28 px grayscale), no test split."""
    return copy_subset(FASHION / "train", shared_cache / "fashion8", FASHION_PER_CLASS)

"""Names and places of datasets: file-system-safe names, the sample datasets that ship with the repository,
and a new folder name that takes no existing one. The bottom of the data catalogue: the versions and the
library both use it."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

__all__ = ["REPO_ROOT", "SAMPLE_DATA_DIR", "safe_name", "unique_dir", "is_dataset_name"]

REPO_ROOT = Path(__file__).resolve().parents[2]  # tl_core/data/names.py -> the repository


#: The sample datasets that ship with the repository (``scripts/build_sample_data.py``).
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, fallback: str = "dataset", max_len: int = 64) -> str:
    """A file-system-safe version of a user-given name: ASCII letters, digits, ``.``, ``_``, ``-``.

    Accents are stripped (``café`` → ``cafe``), every other run of characters becomes ``_``, leading dots
    and underscores are removed (no hidden files, no ``..``), and an empty result becomes ``fallback``.
    """
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", ascii_name).strip("._- ")[:max_len].strip("._- ")
    return cleaned or fallback


def unique_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``, … when that exists already."""
    candidate = parent / name
    n = 2
    while candidate.exists():
        candidate = parent / f"{name}-{n}"
        n += 1
    return candidate


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` can name a folder of ``<workspace>/datasets`` (already safe, not hidden)."""
    return bool(name) and name == safe_name(name, fallback="") and not name.startswith(".")

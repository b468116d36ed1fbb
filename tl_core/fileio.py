"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The one way the engine replaces a file in place (run files, dataset versions, caches, ONNX engines, task
results, reports): write a temporary file beside the target, then ``os.replace`` it over the target (atomic on
POSIX within a file system, including NFS renames). The temporary name is hidden (a leading dot), unique per
process and thread, and ends in ``.tmp`` (so no cache listing or glob of ``*.json``/``*.npy`` sees it); it is
removed when the write fails. This module is at the bottom of the layers: it imports nothing of ``tl_core``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

__all__ = ["write_atomic", "write_json_atomic", "writing_atomic"]


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}")


@contextlib.contextmanager
def writing_atomic(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to, for writers that want a file name (``np.save``,
    safetensors, an ONNX export); when the block ends without an exception it replaces ``path``.

    Args:
        path: the file to replace (its folder is created if missing).
        suffix: appended to the temporary name, for writers that go by the extension (``.onnx``).

    Yields:
        The temporary path; whatever is left there after an exception is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` (text is encoded with ``encoding``), atomically.

    Args:
        path: the file to write (its folder is created if missing).
        data: the whole new content.
        encoding: the text encoding when ``data`` is a ``str``.

    Raises:
        OSError: the write failed (disk full, read-only); ``path`` still holds its old content.
    """
    with writing_atomic(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically; ``obj`` is encoded first, so a value JSON cannot encode
    raises ``TypeError`` with nothing written.

    Args:
        path: the file to write.
        obj: a JSON-encodable value.
        indent: ``json.dumps``' indent (``None``: one line).
        **dumps: other ``json.dumps`` options (``separators``, ``default``).
    """
    write_atomic(path, json.dumps(obj, indent=indent, **dumps))

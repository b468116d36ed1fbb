"""The content-keyed caches of the workspace (``<TL_HOME>/cache/``), their usage and eviction.

- ``decoded/``: images decoded and resized once per (content, size, interpolation), as uint8 arrays;
- ``features/``: pooled backbone features per (content, backbone, weights, preprocessing);
- results measured once on cached features and recorded beside them (:func:`recorded`: ``auto``'s feature
  choice, the cross-validated estimate, out-of-fold probabilities as ``.json``, the refitted linear heads as
  ``.npy``; tl_core.runs.training): every file under ``features/`` that is not a cached vector;
- ``engines/``: the ONNX feature engines and their verification records (tl_core.models.engines);
- ``exports/``: the verified ONNX exports of runs, made once per run and reused by every later export of it (ONNX
  file, web page, TFLite; tl_core.share.export): ``<key>.onnx`` and its record ``<key>.onnx.json``;
- ``checked.sqlite``: each image's check result by content hash, and each file's content hash by
  (path, size, modification time), so that opening the same data again reads no image and hashes no file.

Every entry is keyed by content, so identical images are processed once whichever dataset, project or run
they come from; a damaged entry is rebuilt, never trusted. This module counts every one of them
(:func:`cache_summary`), caps their disk use together (:func:`enforce_cache_limit`: least recently used first;
``$TL_CACHE_MAX_GB``, default 5) and clears them (:func:`clear_cache`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .data.images import center_box, file_sha256, load_image, resize_shorter
from .fileio import write_json_atomic, writing_atomic
from .settings import setting

__all__ = ["DecodedImageCache", "ImageCheckCache", "FeatureCache", "recorded", "cache_usage", "enforce_cache_limit",
           "clear_cache", "cache_summary", "CACHE_KINDS", "EXPORTS"]

log = logging.getLogger(__name__)

#: Cached vectors (decoded images, features) are spread over folders named by the first characters of their hash.
_SHARD_CHARS = 2


def _vector_file(folder: Path, sha: str) -> Path:
    """Where a cached vector of the image ``sha`` lives under ``folder``: ``<folder>/<sha[:2]>/<sha>.npy`` (one
    layout, read back by :func:`_sharded` when the cache is counted and evicted)."""
    return folder / sha[:_SHARD_CHARS] / f"{sha}.npy"


class CachedImage(Protocol):
    """What the decoded-image cache needs of an image: its file and content hash (a
    :class:`tl_core.data.intake.ImageItem` is one; the cache sits below the intake, which uses it)."""

    path: Path
    sha256: str


#: Every cache under ``cache/``, as :func:`cache_summary` counts them: decoded images and features (arrays, one
#: per image: ``<folder>/<sha[:2]>/<sha>.npy``), the results recorded beside the features (:func:`recorded`:
#: ``auto``'s feature choice, cross-validated estimates, out-of-fold probabilities, refitted linear heads), the
#: ONNX feature engines (``engines/``), the runs' verified ONNX exports (``exports/``) and the image checks
#: (``checked.sqlite``).
CACHE_KINDS = ("decoded", "features", "choices", "engines", "exports", "checks")
#: The folder of the runs' verified ONNX exports (tl_core.share.export): ``<key>.onnx`` + ``<key>.onnx.json``.
EXPORTS = "exports"
#: The backbones recorded for a warm linear run (:func:`tl_core.models.backbones.record_backbone`):
#: ``features/<this>/<key>/`` holds ``trunk.safetensors`` and ``record.json``, one entry of the features cache.
BACKBONE_RECORDS = "backbones"


class DecodedImageCache:
    """Decode each image once per (content, resize) and keep it as a uint8 array, in memory and on disk.

    Disk entries live in ``<dir>/<size>-<interp>/<sha[:2]>/<sha>.npy``; a file that fails to load or has
    the wrong shape is rebuilt, never trusted. The disk cache is capped by ``Workspace.enforce_cache_limit``
    (least recently used evicted). The in-memory layer holds at most ``max_memory_bytes``; beyond that,
    entries are re-read from disk: an ``np.load`` of a ~200 KB file from the OS page cache takes ~0.1 ms
    against ~50 ms of training per image, and page-cache memory is not the process's to hold, so the
    layer is kept small (64 MB, ~330 images at 256 px) and a 2,000-image fine-tuning run stays within its
    memory budget (benchmarks/RESULTS.md, row 4).
    """

    def __init__(self, directory: str | os.PathLike | None, max_memory_bytes: int = 64 * 1024**2):
        self.dir = Path(directory) if directory else None
        self.max_memory_bytes = max_memory_bytes
        self._mem: dict[tuple[str, int, str], np.ndarray] = {}
        self._mem_bytes = 0
        self._touched: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()  # get() runs on decoding threads (tl_core.models.pipeline)
        self.hits = 0
        self.misses = 0

    def _file(self, sha: str, size: int, interp: str) -> Path | None:
        if self.dir is None:
            return None
        return _vector_file(self.dir / f"{size}-{interp}", sha)

    def get(self, item: CachedImage, resize: int, interpolation: str = "bicubic", keep: bool = True,
            crop: int | None = None) -> np.ndarray:
        """HWC uint8 array of the image resized so that its shorter side is ``resize`` pixels; with ``crop``, its
        centre ``crop`` x ``crop`` square only (contiguous; read-only when decoded for this call only, then cut
        before it becomes an array: half the copying, ~0.1 ms an image).

        ``keep=False``: an image not cached yet is decoded for this call only, neither kept in memory nor
        written to disk. Feature extraction asks so: it sees each image once (its features are what is cached),
        and writing a ~200 KB array per image cost ~1 ms of a 2-core machine's time (a third of the decoding
        work); fine-tuning decodes and keeps every image before its first epoch.
        """
        key = (item.sha256 or str(item.path), resize, interpolation)
        with self._lock:
            arr = self._mem.get(key)
            if arr is not None:
                self.hits += 1
                return _cropped(arr, crop)
        f = self._file(key[0], resize, interpolation) if item.sha256 else None
        if f is not None and f.exists():
            try:
                arr = np.load(f, allow_pickle=False)
                if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) != resize:
                    raise ValueError("unexpected shape")
                with self._lock:
                    touch = key not in self._touched  # mark as recently used for eviction, once per cache object
                    self._touched.add(key)
                    self.hits += 1
                    self._remember(key, arr)
                if touch:
                    os.utime(f)
                return _cropped(arr, crop)
            except Exception as e:  # corrupt/partial file: rebuild
                log.warning("decoded-image cache entry %s is unusable (%s); rebuilding", f, e)
                f.unlink(missing_ok=True)
        img = resize_shorter(load_image(item.path), resize, interpolation)
        if not keep:
            with self._lock:
                self.misses += 1
            if crop is not None:
                return np.asarray(img.crop(center_box(img.width, img.height, crop)))
            return np.array(img, dtype=np.uint8)  # writable: torch wants it
        arr = np.array(img, dtype=np.uint8)
        with self._lock:
            self.misses += 1
            if f is None:
                self._mem[key] = arr  # nowhere else to keep it
            else:
                self._remember(key, arr)
        if f is not None:
            try:  # a half-written temporary file is removed (it would keep the disk full)
                with writing_atomic(f) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
            except OSError as e:  # disk full or read-only: keep going from memory
                log.warning("could not write decoded-image cache (%s); continuing without it", e)
        return _cropped(arr, crop)

    def _remember(self, key: tuple[str, int, str], arr: np.ndarray) -> None:
        if self._mem_bytes + arr.nbytes <= self.max_memory_bytes:
            self._mem[key] = arr
            self._mem_bytes += arr.nbytes


def _cropped(arr: np.ndarray, crop: int | None) -> np.ndarray:
    """The centre ``crop`` square of a resized array, contiguous (the array itself when ``crop`` is None)."""
    if crop is None:
        return arr
    left, top, right, bottom = center_box(arr.shape[1], arr.shape[0], crop)
    return np.ascontiguousarray(arr[top:bottom, left:right])


@functools.lru_cache(maxsize=16)
def _npy_header(dim: int) -> bytes:
    """The header ``np.save`` writes before a little-endian float32 vector of ``dim`` values."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (dim,)})
    return buf.getvalue()


class FeatureCache:
    """Per-image feature vectors on disk: ``<dir>/<key>/<sha[:2]>/<sha>.npy``."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.dir = Path(directory) / key
        self.hits = 0
        self.misses = 0

    def _file(self, sha: str) -> Path:
        return _vector_file(self.dir, sha)

    def get(self, sha: str, dim: int | None = None) -> np.ndarray | None:
        """The vector recorded for an image, or None (none recorded; an unusable file is removed and logged).

        Args:
            sha: the image's content hash.
            dim: the width expected; a vector of another width is unusable.
        """
        f = self._file(sha)
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("feature cache entry %s is unreadable (%s); recomputing", f, e)
            return None
        try:
            head = _npy_header(dim) if dim is not None else b""
            if head and raw.startswith(head) and len(raw) == len(head) + 4 * dim:
                # what np.save wrote for a float32 vector of this width (the common case): no header parsing,
                # ~5x faster than np.load on a warm re-train's few hundred vectors
                v = np.frombuffer(raw, np.float32, offset=len(head)).copy()
            else:
                v = np.load(io.BytesIO(raw), allow_pickle=False)
            if v.dtype != np.float32 or v.ndim != 1 or (dim is not None and v.shape[0] != dim) or not np.isfinite(v).all():
                raise ValueError(f"unexpected array {v.dtype} {v.shape}")
            return v
        except Exception as e:
            log.warning("feature cache entry %s is unusable (%s); recomputing", f, e)
            f.unlink(missing_ok=True)
            return None

    def touch(self, sha: str) -> None:
        """Mark an entry as recently used (the cache evicts least recently used first)."""
        try:
            os.utime(self._file(sha))
        except OSError:
            pass

    def put(self, sha: str, vec: np.ndarray) -> None:
        f = self._file(sha)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with writing_atomic(f) as tmp, open(tmp, "wb") as fh:
                np.save(fh, vec.astype(np.float32), allow_pickle=False)
        except OSError as e:  # disk full: features still returned, just not cached
            log.warning("could not write feature cache (%s)", e)



def recorded(path: Path, compute: Callable[[], Any], check: Callable[[Any], None] | None = None) -> tuple[Any, bool]:
    """A result measured once and recorded under the feature cache (cleared and evicted with it: least recently
    used first), read back by every later call with the same ``path`` (a key of what the result depends on).

    ``path`` ends in ``.json`` (a JSON-able result) or ``.npy`` (an array). A file that cannot be read, or that
    ``check`` rejects (it raises ``ValueError``), is measured again with a warning; a result that cannot be
    written (a read-only or full disk) is returned all the same, and measured again next time.

    Args:
        path: ``<cache>/features/.../<key>.json`` or ``.npy``.
        compute: measures the result.
        check: raises ``ValueError`` for a recorded result that is not usable (e.g. an array of the wrong shape).
    Returns:
        (the result, whether it was read back)
    """
    array = path.suffix == ".npy"
    try:
        out = np.load(path, allow_pickle=False) if array else json.loads(path.read_text())
        if check is not None:
            check(out)
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: evicted after the results used less recently
        return out, True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as e:
        log.warning("recorded result %s is unusable (%s); measuring again", path, e)
    out = compute()
    try:
        if array:
            with writing_atomic(path, ".npy") as tmp:
                np.save(tmp, out, allow_pickle=False)
        else:
            write_json_atomic(path, out, indent=None)
    except OSError as e:
        log.warning("could not record %s (%s)", path.name, e)
    return out, False


def _sharded(f: Path) -> bool:
    """A cached vector's file (:func:`_vector_file`: in a folder named by :data:`_SHARD_CHARS` characters), not a
    recorded result (:func:`recorded`: ``<folder>/<name>/<key>``, a name longer than that)."""
    return f.suffix == ".npy" and len(f.parent.name) == _SHARD_CHARS


#: Bump when the loading rules change, so that old check results are not trusted.
_CHECK_VERSION = 1


class ImageCheckCache:
    """What opening a dataset learns about each file, remembered in ``cache/checked.sqlite``.

    - content hash → (width, height, error) of every image checked before: each content is decoded once;
    - (path, size, modification time) → content hash: a file that has not changed is not read again.

    A dataset of thousands of images then re-opens with one ``stat`` per file. A cache that cannot be
    opened or written is worked around (everything is recomputed), never fatal.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mem: dict[str, tuple[int, int, str | None]] = {}
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # no fsync per recorded check (WAL stays consistent; a crash can only lose the last checks, which are
            # made again): opening 1,000 new images spent 1.7 s in fsyncs
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS checked (sha TEXT PRIMARY KEY, w INTEGER, h INTEGER, "
                             "error TEXT, version INTEGER)")
            self._db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                             "mtime_ns INTEGER, sha TEXT)")
        except Exception as e:  # unreadable cache: work without it
            log.warning("image check cache %s unusable (%s); checking every image", self.path, e)
            self._db = None

    def _query(self, sql: str, args: tuple) -> tuple | None:
        if self._db is None:
            return None
        try:
            return self._db.execute(sql, args).fetchone()
        except Exception as e:
            log.warning("image check cache read failed (%s)", e)
            return None

    def _write(self, sql: str, args: tuple) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(sql, args)
        except Exception as e:
            log.warning("could not record an image check (%s)", e)

    def get(self, sha: str) -> tuple[int, int, str | None] | None:
        """(width, height, error or None) of content ``sha`` when it was checked before."""
        hit = self._mem.get(sha)
        if hit is None:
            row = self._query("SELECT w, h, error FROM checked WHERE sha=? AND version=?", (sha, _CHECK_VERSION))
            if row is not None:
                hit = self._mem[sha] = (row[0], row[1], row[2])
        return hit

    def put(self, sha: str, w: int, h: int, error: str | None) -> None:
        self._mem[sha] = (w, h, error)
        self._write("INSERT OR REPLACE INTO checked VALUES (?,?,?,?,?)", (sha, w, h, error, _CHECK_VERSION))

    def sha256(self, path: Path) -> str:
        """The content hash of ``path``, read from the cache while the file's size and mtime are unchanged.

        Raises:
            OSError: the file cannot be read.
        """
        st = path.stat()
        key = str(path.resolve())
        row = self._query("SELECT size, mtime_ns, sha FROM hashes WHERE path=?", (key,))
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        sha = file_sha256(path)
        self._write("INSERT OR REPLACE INTO hashes VALUES (?,?,?,?)", (key, st.st_size, st.st_mtime_ns, sha))
        return sha


# --------------------------------------------------------------------------------------------------
# usage and eviction: every cache under the folder
# --------------------------------------------------------------------------------------------------
def _stat(f: Path) -> tuple[float, int] | None:
    try:
        st = f.stat()
    except OSError:  # removed meanwhile (another process evicting or rebuilding)
        return None
    return st.st_mtime, st.st_size


def _entries(cache_dir: Path) -> list[tuple[float, int, str, list[Path]]]:
    """Every evictable entry under ``cache_dir``: (last use, bytes, kind, its files).

    An entry is what is evicted at once: one array (decoded image or features), one recorded result, one ONNX
    engine with the small files recorded beside it (``<key>.verified``, ``.failed``, ``.images``: its last use
    is the newest of them; :func:`tl_core.models.engines.feature_engine` touches the ONNX file when it loads it),
    one run's ONNX export with its record (``exports/<key>.*``: the newest again; a reuse touches the ONNX file),
    and the check database with its WAL files (its last use is its last write).
    """
    out: list[tuple[float, int, str, list[Path]]] = []
    records = cache_dir / "features" / BACKBONE_RECORDS
    for sub in ("decoded", "features"):
        d = cache_dir / sub
        if not d.exists():
            continue
        for f in d.rglob("*.*"):
            if f.parent.parent == records:
                continue  # a backbone record: one entry of its own, below
            # a cached vector, or a recorded result (:func:`recorded`: counted and evicted as a choice)
            kind = sub if _sharded(f) else "choices" if f.suffix in (".json", ".npy") else None
            st = _stat(f) if kind and not _writing(f) else None
            if st is not None:
                out.append((st[0], st[1], kind, [f]))
    if records.is_dir():  # a backbone's tensors and its record.json, evicted together (features: what they serve)
        for rec in records.iterdir():
            files = [(f, st) for f in rec.iterdir() if not _writing(f) and (st := _stat(f)) is not None] \
                if rec.is_dir() else []
            if files:
                out.append((max(st[0] for _, st in files), sum(st[1] for _, st in files), "features",
                            [f for f, _ in files]))
    engines: dict[str, list[tuple[float, int, Path]]] = {}
    d = cache_dir / "engines"
    if d.exists():
        for f in d.iterdir():
            st = _stat(f) if f.suffix in _ENGINE_SUFFIXES and not _writing(f) else None
            if st is not None:
                engines.setdefault(f.stem, []).append((st[0], st[1], f))
    for files in engines.values():
        out.append((max(t for t, _, _ in files), sum(s for _, s, _ in files), "engines", [f for _, _, f in files]))
    exports: dict[str, list[tuple[float, int, Path]]] = {}
    d = cache_dir / EXPORTS
    if d.exists():
        for f in d.iterdir():  # <key>.onnx and <key>.onnx.json: one entry per key
            st = _stat(f) if not _writing(f) and f.is_file() else None
            if st is not None:
                exports.setdefault(f.name.split(".")[0], []).append((st[0], st[1], f))
    for files in exports.values():
        out.append((max(t for t, _, _ in files), sum(s for _, s, _ in files), "exports", [f for _, _, f in files]))
    checks = [(f, st) for f in _check_files(cache_dir) if (st := _stat(f)) is not None]
    if checks:
        out.append((max(st[0] for _, st in checks), sum(st[1] for _, st in checks), "checks", [f for f, _ in checks]))
    return out


def _writing(f: Path) -> bool:
    """A temporary file being written (tl_core.fileio's ``.<name>.<pid>.<thread>.tmp[suffix]``): not an entry yet."""
    return f.name.startswith(".")


#: The files of one ONNX engine (tl_core.models.engines): the graph and what is recorded beside it.
_ENGINE_SUFFIXES = (".onnx", ".verified", ".failed", ".images")


def _check_files(cache_dir: Path) -> list[Path]:
    return [cache_dir / f for f in ("checked.sqlite", "checked.sqlite-wal", "checked.sqlite-shm")]


def cache_summary(cache_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Entries and bytes of each cache under ``cache_dir``, by kind (:data:`CACHE_KINDS`, all present).

    Returns:
        ``{kind: {"entries": n, "bytes": b}}``; an ONNX engine with its records is one entry, a run's ONNX export
        with its record one entry, the check database one entry.
    """
    out = {kind: {"entries": 0, "bytes": 0} for kind in CACHE_KINDS}
    for _, size, kind, _ in _entries(Path(cache_dir)):
        out[kind]["entries"] += 1
        out[kind]["bytes"] += size
    return out


def cache_usage(cache_dir: str | os.PathLike) -> dict[str, int]:
    """Bytes used by each cache under ``cache_dir``, by kind (:data:`CACHE_KINDS`, all present)."""
    return {kind: v["bytes"] for kind, v in cache_summary(cache_dir).items()}


def _remove(files: list[Path]) -> None:
    for f in files:
        try:
            f.unlink(missing_ok=True)
        except OSError as e:  # read-only or in use elsewhere: it stays, and is counted again next time
            log.warning("could not remove cache file %s (%s)", f, e)


def enforce_cache_limit(cache_dir: str | os.PathLike, max_bytes: int | None = None) -> int:
    """Evict least-recently-used entries of every cache above the cap.

    Arrays, recorded results, ONNX engines and the runs' ONNX exports compete in one order of last use (a cache hit
    touches the file). The check database is never evicted here: the server and the workers keep it open (SQLite in WAL
    mode), and removing its files under an open connection can lose or corrupt it; it holds a few hundred bytes
    an image (a million images: a few hundred MB), counts towards the cap, and goes only with
    :func:`clear_cache`.

    Args:
        cache_dir: the workspace's cache folder.
        max_bytes: the cap; default ``$TL_CACHE_MAX_GB`` (5 GB).
    Returns:
        Bytes freed.
    """
    if max_bytes is None:
        max_bytes = int(setting("TL_CACHE_MAX_GB") * 1024**3)
    entries = _entries(Path(cache_dir))
    total = sum(e[1] for e in entries)
    freed = 0
    for _, size, _, files in sorted((e for e in entries if e[2] != "checks"), key=lambda e: (e[0], str(e[3][0]))):
        if total - freed <= max_bytes:
            break
        _remove(files)
        freed += size
    return freed


def clear_cache(cache_dir: str | os.PathLike) -> int:
    """Delete every cache under ``cache_dir`` (runs are kept: the next run decodes and extracts again).

    Returns:
        Bytes freed.
    """
    cache_dir = Path(cache_dir)
    freed = sum(cache_usage(cache_dir).values())
    for sub in ("decoded", "features", "engines", EXPORTS):
        shutil.rmtree(cache_dir / sub, ignore_errors=True)
    _remove(_check_files(cache_dir))
    return freed

"""Managed datasets and their versions: every change (exclude, relabel, restore, add images) is a new version.

A managed dataset is a folder of the workspace, ``<workspace>/datasets/<name>/``, holding the images in
``[split/]class/`` folders (the managed copy: files are added, never rewritten or removed), and its history in
``<name>/.tl/``:

- ``versions/<id>.json``: a version's manifest, one row per image: ``file`` (its path inside the dataset, e.g.
  ``cats/img_001.png``), ``sha256`` of its bytes, ``label``, ``excluded`` (and ``split`` for a
  ``train/``/``test/`` layout). The version id is a short hash of the rows: the same rows are the same id, so
  restoring a version makes a new history entry with that version's id.
- ``history.jsonl``: one line per change (version, when, what changed, counts); the last line is the current
  version.

Versions are opened (:func:`open_version`) straight from their rows: an image keeps its file, a relabelled
image takes its new label, an excluded one is left out. ``NAME`` and ``NAME@VERSION`` work wherever ``DATA`` is
taken (:func:`tl_core.data.library.open_data`), and a run records the version it trained on (:func:`pin`).

The user's original files are never touched: importing copies them in. A dataset uploaded into the workspace
(a zip, images class by class) is managed where it lies; its first version is recorded when it is first
versioned (uploaded, trained on, changed or listed), from the images its folder holds then.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..cache import ImageCheckCache
from ..errors import CancelledError, DatasetError
from ..fileio import write_atomic
from .images import IMAGE_EXTENSIONS, file_sha256
from .intake import (Dataset, ImageItem, MIN_IMAGES_PER_CLASS, SkippedFile, _find_dataset_root, checked_image,
                     find_multi_label_csv, open_dataset, split_layout)
from .names import SAMPLE_DATA_DIR, is_dataset_name, safe_name, unique_dir

if TYPE_CHECKING:
    from ..storage.workspace import Workspace

__all__ = [
    "VersionRef",
    "parse_ref",
    "pin",
    "is_managed",
    "changed_version",
    "ensure_versions",
    "import_dataset",
    "managed_datasets",
    "history",
    "current_version",
    "version_rows",
    "resolve_version",
    "open_version",
    "exclude_images",
    "relabel_images",
    "restore_version",
    "add_images",
    "file_in_dataset",
    "dataset_for_changes",
    "managed_copy",
    "class_counts",
    "images_root",
]

log = logging.getLogger(__name__)

META_DIR = ".tl"


@dataclass(frozen=True)
class VersionRef:
    """A managed dataset and, optionally, one of its versions (``None``: the current one)."""

    name: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


# --------------------------------------------------------------------------------------------------
# where things are
# --------------------------------------------------------------------------------------------------
def _folder(ws: "Workspace", name: str) -> Path:
    if not is_dataset_name(name):
        raise DatasetError(f"{name!r} is not the name of a dataset in the workspace; `tl-core data list` shows them.")
    folder = ws.datasets_dir / name
    if not folder.is_dir():
        raise DatasetError(f"No dataset called {name!r} in the workspace; `tl-core data list` shows them "
                           "(`tl-core data import PATH` adds one).")
    return folder


def _meta(folder: Path) -> Path:
    return folder / META_DIR


def is_managed(ws: "Workspace", name: str) -> bool:
    """Whether the workspace dataset ``name`` has a version history already."""
    return (ws.datasets_dir / name / META_DIR / "history.jsonl").is_file()


def changed_version(folder: Path) -> str | None:
    """The current version of a dataset folder once it has changed since its first version, else None.

    The first version is the folder's images as they are (recorded when the folder is first trained on or
    changed): a fingerprint of the files alone already names it. Later versions change labels and exclusions in
    the manifest only, not the image files, so the id tells them apart. Read for
    :func:`tl_core.data.library.dataset_signature`.
    """
    try:
        lines = (folder / META_DIR / "history.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        return None
    try:
        return str(json.loads(lines[-1])["version"])
    except (ValueError, KeyError, TypeError):
        return "unreadable"  # a damaged history: a signature of its own, never the unchanged folder's


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time for a dataset's history (two tabs clicking at once make two versions, in turn)."""
    meta = _meta(folder)
    meta.mkdir(exist_ok=True)
    with open(meta / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# references: NAME, NAME@VERSION, a managed dataset's folder
# --------------------------------------------------------------------------------------------------
def parse_ref(ws: "Workspace", data: Any) -> VersionRef | None:
    """The managed dataset ``data`` names, or None when it is an ordinary path (folder, zip, CSV).

    ``NAME@VERSION`` and ``NAME`` name a dataset of the workspace (a path that exists wins over a name), as does
    the path of a dataset's folder inside the workspace (``<workspace>/datasets/NAME``).

    Raises:
        DatasetError: ``NAME@VERSION`` where no dataset is called NAME.
    """
    if not isinstance(data, (str, os.PathLike)):
        return None
    s = str(data)
    p = Path(s).expanduser()
    if p.exists():
        try:
            p = p.resolve()
        except OSError:
            return None
        if p.is_dir() and p.parent == ws.datasets_dir.resolve() and not p.name.startswith("."):
            return VersionRef(p.name)
        return None
    if "/" in s or os.sep in s:
        return None
    name, at, version = s.partition("@")
    if at:
        _folder(ws, name)
        if not version:
            raise DatasetError(f"{s!r} names no version; write NAME@VERSION (`tl-core data versions {name}` lists them).")
        return VersionRef(name, version)
    if (ws.datasets_dir / name).is_dir() and not name.startswith("."):
        return VersionRef(name)
    return None


MULTI_LABEL_NOT_VERSIONED = ("is multi-label (its label sets live in labels.csv), and multi-label datasets are not "
                             "versioned yet: fix its labels.csv and upload it again")


def is_multi_label_folder(folder: Path) -> bool:
    """A workspace folder labelled by a multi-label ``labels.csv``: used as the folder it is, never versioned
    (versions hold one label per image)."""
    return find_multi_label_csv(folder) is not None


def pin(ws: "Workspace", data: str | os.PathLike) -> str:
    """What a run records as its data: ``NAME@VERSION`` for a managed dataset (the current version when none is
    given), else the absolute path.

    Raises:
        DatasetError: the path does not exist, or the dataset or version is unknown.
    """
    ref = parse_ref(ws, data)
    if ref is not None:
        if not ref.version and is_multi_label_folder(_folder(ws, ref.name)):
            return str(_folder(ws, ref.name).resolve())
        ensure_versions(ws, ref.name)
        return f"{ref.name}@{resolve_version(ws, ref.name, ref.version)}"
    p = Path(data).expanduser().resolve()
    if not p.exists():
        raise DatasetError(f"{data} does not exist; give a folder with one sub-folder per class, a .zip of one, "
                           "a CSV of path,label, or the name of a dataset of the workspace (`tl-core data list`).")
    return str(p)


# --------------------------------------------------------------------------------------------------
# manifests and history
# --------------------------------------------------------------------------------------------------
def _version_id(rows: list[dict[str, Any]]) -> str:
    canon = json.dumps(sorted(rows, key=lambda r: r["file"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:10]


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [r for r in rows if not r["excluded"]]
    by_class = Counter(r["label"] for r in kept)
    return {"images": len(kept), "excluded": len(rows) - len(kept), "classes": dict(sorted(by_class.items()))}


def history(ws: "Workspace", name: str) -> list[dict[str, Any]]:
    """The dataset's versions, newest first: ``{version, when, change, counts}`` (``when`` in Unix seconds;
    ``counts`` = images kept, excluded, and images per class). Records the first version when there is none;
    a multi-label dataset has none (it is not versioned)."""
    folder = _folder(ws, name)
    if is_multi_label_folder(folder):
        return []
    ensure_versions(ws, name)
    lines = (_meta(folder) / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in reversed(lines) if line.strip()]


def current_version(ws: "Workspace", name: str) -> str:
    """The id of the dataset's current version."""
    versions = history(ws, name)
    if not versions:
        raise DatasetError(f"{name!r} {MULTI_LABEL_NOT_VERSIONED}.")
    return versions[0]["version"]


def resolve_version(ws: "Workspace", name: str, version: str | None) -> str:
    """The full id of ``version`` (a unique prefix of four characters or more will do); the current one for None.

    Raises:
        DatasetError: no version of the dataset starts with ``version``.
    """
    if not version:
        return current_version(ws, name)
    vdir = _meta(_folder(ws, name)) / "versions"
    hits = sorted(p.stem for p in vdir.glob("*.json") if p.stem.startswith(version.lower())) if len(version) >= 4 else []
    if len(hits) != 1:
        raise DatasetError(f"Dataset {name!r} has no version {version!r}; `tl-core data versions {name}` lists its "
                           "versions.")
    return hits[0]


def version_rows(ws: "Workspace", name: str, version: str | None = None) -> list[dict[str, Any]]:
    """The manifest rows of a version (default the current one)."""
    vid = resolve_version(ws, name, version)
    data = json.loads((_meta(_folder(ws, name)) / "versions" / f"{vid}.json").read_text(encoding="utf-8"))
    return data["rows"]


def images_root(folder: Path) -> Path:
    """The folder the rows' paths are relative to (the managed folder, or its single wrapper folder)."""
    try:
        base = json.loads((_meta(folder) / "dataset.json").read_text(encoding="utf-8")).get("base", "")
    except (OSError, ValueError):
        base = ""
    return folder / base if base else folder


def _commit(folder: Path, rows: list[dict[str, Any]], change: str) -> dict[str, Any]:
    """Write the rows as a version (if new) and append it to the history; the caller holds the lock."""
    rows = sorted(rows, key=lambda r: r["file"])
    vid = _version_id(rows)
    vfile = _meta(folder) / "versions" / f"{vid}.json"
    if not vfile.exists():
        write_atomic(vfile, json.dumps({"version": vid, "rows": rows}, separators=(",", ":")))
    entry = {"version": vid, "when": round(time.time(), 3), "change": change, "counts": _counts(rows)}
    with open(_meta(folder) / "history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("dataset %s: version %s (%s)", folder.name, vid, change)
    return entry


def _scan_rows(ws: "Workspace", folder: Path) -> tuple[str, list[dict[str, Any]], list[dict[str, str]]]:
    """(base, rows, skipped) of the images a folder holds now (read by the ordinary intake rules)."""
    ds = open_dataset(folder, min_per_class=1, check_cache=ws.cache_dir / "checked.sqlite")
    base = str(ds.root.relative_to(folder)) if ds.root != folder else ""
    rows = []
    for item in ds.items:
        row = {"file": item.path.relative_to(ds.root).as_posix(), "sha256": item.sha256, "label": item.label,
               "excluded": False}
        if item.split:
            row["split"] = item.split
        rows.append(row)
    return base, rows, [{"path": k.path, "reason": k.reason} for k in ds.skipped]


def ensure_versions(ws: "Workspace", name: str, change: str = "first version (the images the folder held)") -> None:
    """Record the first version of a workspace dataset that has none yet (a dataset uploaded before versions)."""
    folder = _folder(ws, name)
    if is_managed(ws, name) or is_multi_label_folder(folder):
        return
    with _locked(folder):
        if is_managed(ws, name):
            return
        base, rows, skipped = _scan_rows(ws, folder)
        # what the folder held that is no image to train on: the report keeps listing it
        write_atomic(_meta(folder) / "dataset.json", json.dumps({"base": base, "skipped": skipped}))
        _commit(folder, rows, change)


def workspace_datasets(ws: "Workspace") -> list[dict[str, str]]:
    """Datasets in the workspace (``datasets/<name>/``), newest first: ``{name, path, origin}`` (origin: where it
    came from, :func:`origin`)."""
    d = ws.datasets_dir
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [{"name": p.name, "path": str(p), "origin": origin(p)} for p in dirs]


def managed_datasets(ws: "Workspace") -> list[dict[str, Any]]:
    """Every dataset of the workspace: ``{name, path, version, when, change, counts}`` (version fields None for a
    dataset not versioned yet), newest change first."""
    out = []
    for d in workspace_datasets(ws):
        entry: dict[str, Any] = {"name": d["name"], "path": d["path"], "version": None, "when": None,
                                 "change": None, "counts": None}
        if is_managed(ws, d["name"]):
            lines = (ws.datasets_dir / d["name"] / META_DIR / "history.jsonl").read_text(encoding="utf-8").splitlines()
            last = json.loads(lines[-1])
            entry.update({k: last[k] for k in ("version", "when", "change", "counts")})
        out.append(entry)
    out.sort(key=lambda e: -(e["when"] or 0))
    return out


# --------------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------------
def import_dataset(ws: "Workspace", src: str | os.PathLike, name: str | None = None,
                   unique: bool = False) -> dict[str, Any]:
    """Copy a folder, zip or CSV dataset into the workspace as a managed dataset, its first version.

    The images are copied into ``datasets/<name>/[split/]<class>/`` (files that are not usable images are left
    out, as training would leave them out); the source is only read.

    Args:
        src: folder, zip or CSV.
        name: the dataset's name (default: the source's name), sanitised.
        unique: add ``-2``, ``-3`` … when the name is taken, instead of refusing.
    Returns:
        ``{name, path, version, counts, skipped}``.
    Raises:
        DatasetError: the source cannot be used, or (without ``unique``) the name is taken.
    """
    src = Path(src).expanduser()
    if not src.exists():
        raise DatasetError(f"{src} does not exist; give a folder with one sub-folder per class, a .zip of one, or a "
                           "CSV of path,label.")
    wanted = safe_name(name if name else (src.stem if src.is_file() else src.resolve().name))
    target = ws.datasets_dir / wanted
    if target.exists():
        if not unique:
            raise DatasetError(f"A dataset called {wanted!r} exists already; choose another name with --name.")
        target = unique_dir(ws.datasets_dir, wanted)
    ws.datasets_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=ws.datasets_dir))
    try:
        ds = open_dataset(src, extract_dir=tmp / ".unzipped", min_per_class=1,
                          check_cache=ws.cache_dir / "checked.sqlite")
        if ds.multi_label:
            raise DatasetError(f"{src.name} is multi-label (label sets joined by ';'); multi-label datasets are not "
                               "versioned yet: train on it directly (tl-core train " + str(src) + ").")
        stage = tmp / "dataset"
        rows = []
        for item in ds.items:
            rel_dir = Path(item.split or "") / safe_name(item.label, fallback="class")
            (stage / rel_dir).mkdir(parents=True, exist_ok=True)
            stem, ext = safe_name(item.path.stem, fallback="image"), item.path.suffix.lower()
            dest = stage / rel_dir / f"{stem}{ext}"
            n = 2
            while dest.exists():
                dest = stage / rel_dir / f"{stem}-{n}{ext}"
                n += 1
            shutil.copyfile(item.path, dest)
            row = {"file": dest.relative_to(stage).as_posix(), "sha256": item.sha256,
                   "label": safe_name(item.label, fallback="class"), "excluded": False}
            if item.split:
                row["split"] = item.split
            rows.append(row)
        if not rows:
            raise DatasetError(f"{src.name} holds no usable images; put them in one sub-folder per class.")
        _meta(stage).mkdir(parents=True)
        info: dict[str, Any] = {"base": "", "source": str(src.resolve()),
                                "skipped": [{"path": k.path, "reason": k.reason} for k in ds.skipped]}
        if src.is_dir() or ds.root.resolve() == src.resolve().parent:  # a folder or a CSV: its paths map to ours
            root = ds.root.resolve()
            info["source_root"] = str(root)
            info["files"] = {str(i.path.resolve().relative_to(root)): r["file"] for i, r in zip(ds.items, rows)
                             if i.path.resolve().is_relative_to(root)}
        write_atomic(_meta(stage) / "dataset.json", json.dumps(info))
        # what changed, in words the app can show (not the server's path: dataset.json keeps that)
        entry = _commit(stage, rows, f"imported ({origin(stage)})")
        try:
            os.rename(stage, target)
        except OSError as e:
            raise DatasetError(f"Could not create dataset {target.name!r} ({e.strerror or e}); choose another name.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"name": target.name, "path": str(target), "version": entry["version"], "counts": entry["counts"],
            "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped]}


# --------------------------------------------------------------------------------------------------
# opening a version
# --------------------------------------------------------------------------------------------------
def open_version(ws: "Workspace", name: str, version: str | None = None, *, min_per_class: int = MIN_IMAGES_PER_CLASS,
                 progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> Dataset:
    """A version of a managed dataset as a :class:`Dataset`: its kept rows, each with its version's label.

    Raises:
        DatasetError: unknown dataset or version, or the version cannot be trained on (one class, a class with
            too few images), in the words of :func:`tl_core.data.open_dataset`.
    """
    folder = _folder(ws, name)
    if is_multi_label_folder(folder):
        raise DatasetError(f"{name!r} {MULTI_LABEL_NOT_VERSIONED}.")
    ensure_versions(ws, name)
    vid = resolve_version(ws, name, version)
    rows = version_rows(ws, name, vid)
    root = images_root(folder)
    checks = ImageCheckCache(ws.cache_dir / "checked.sqlite")
    items: list[ImageItem] = []
    skipped = [SkippedFile(k["path"], k["reason"]) for k in _info(folder).get("skipped", [])]
    kept = [r for r in rows if not r["excluded"]]
    for n, r in enumerate(kept):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled while checking the images.")
        p = root / r["file"]
        known = checked_image(p, r["sha256"], checks)
        if not p.is_file():
            skipped.append(SkippedFile(r["file"], "missing from the dataset's folder"))
        elif known[2] is not None:
            skipped.append(SkippedFile(r["file"], known[2]))
        else:
            items.append(ImageItem(p, r["label"], r.get("split"), r["sha256"], known[0], known[1]))
        if progress:
            progress(n + 1, len(kept))
    ref = f"{name}@{vid}"
    classes = sorted({i.label for i in items})
    if len(classes) < 2:
        raise DatasetError(f"{ref} has {'only one class' if classes else 'no images'} left; a classifier needs at "
                           f"least two classes (restore an earlier version: `tl-core data versions {name}`).")
    counts = Counter(i.label for i in items if i.split != "test")
    too_few = [(c, counts.get(c, 0)) for c in classes if counts.get(c, 0) < min_per_class]
    if too_few:
        listing = ", ".join(f"{c!r} has {k}" for c, k in too_few[:5]) + (" …" if len(too_few) > 5 else "")
        raise DatasetError(f"Too few usable images in {ref}: {listing}; every class needs at least {min_per_class} "
                           "(10 or more recommended). Add images or restore an earlier version.")
    return Dataset(root=root, source=ref, classes=classes, items=items, skipped=skipped, version=ref)


# --------------------------------------------------------------------------------------------------
# changes: each one a new version
# --------------------------------------------------------------------------------------------------
def _info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((_meta(folder) / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def origin(folder: Path) -> str:
    """Where a workspace dataset came from, in a few words: ``uploaded`` (a zip, a folder, images, the camera),
    ``copy of sample emoji`` (the managed copy a change to a sample makes) or ``copy of folder pets`` (imported)."""
    src = _info(folder).get("source")
    if not src:
        return "uploaded"
    p = Path(src)
    if p.is_relative_to(SAMPLE_DATA_DIR.resolve()):
        return f"copy of sample {p.relative_to(SAMPLE_DATA_DIR.resolve()).parts[0]}"
    return f"copy of {'folder' if p.suffix.lower() not in ('.zip', '.csv') else p.suffix.lower().lstrip('.')} {p.stem if p.suffix else p.name}"


def file_in_dataset(ws: "Workspace", name: str, path: str | os.PathLike) -> str:
    """The path inside the dataset (``cats/img_001.png``) of ``path``: that already, an image's absolute path (as a
    :class:`Dataset` of the version lists it), or the path of the image it was imported from."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    folder = _folder(ws, name)
    try:
        return p.resolve().relative_to(images_root(folder).resolve()).as_posix()
    except ValueError:
        pass
    info = _info(folder)
    if info.get("source_root"):
        try:
            rel = str(p.resolve().relative_to(info["source_root"]))
        except ValueError:
            return str(path)
        return info.get("files", {}).get(rel, rel)
    return str(path)


def dataset_for_changes(ws: "Workspace", data: str | os.PathLike) -> tuple[str, bool]:
    """The managed dataset a change to ``data`` goes to: ``data``'s own (a workspace dataset, versioned now if it
    was not), else a copy of ``data`` in the workspace (the one made before, or a new one): the user's files
    and the sample datasets are never changed.

    Returns:
        (dataset name, whether a copy was made just now)
    """
    name = managed_copy(ws, data)
    if name is not None and is_multi_label_folder(_folder(ws, name)):
        raise DatasetError(f"{name!r} {MULTI_LABEL_NOT_VERSIONED}.")
    if name is not None:
        ensure_versions(ws, name)
        return name, False
    return import_dataset(ws, data, unique=True)["name"], True


def managed_copy(ws: "Workspace", data: str | os.PathLike) -> str | None:
    """The workspace dataset that ``data`` is (or was imported into), or None: changes to it go there."""
    ref = parse_ref(ws, data)
    if ref is not None:
        return ref.name
    src = str(Path(data).expanduser().resolve())
    for d in sorted(ws.datasets_dir.iterdir()) if ws.datasets_dir.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and _info(d).get("source") == src:
            return d.name
    return None


def _change(ws: "Workspace", name: str, files: Iterable[str | os.PathLike],
            apply: Callable[[dict[str, Any]], bool], describe: Callable[[list[str]], str]) -> dict[str, Any]:
    folder = _folder(ws, name)
    if is_multi_label_folder(folder):
        raise DatasetError(f"{name!r} {MULTI_LABEL_NOT_VERSIONED}.")
    ensure_versions(ws, name)
    wanted = [file_in_dataset(ws, name, f) for f in files]
    if not wanted:
        raise DatasetError("Name at least one image, by its path inside the dataset (e.g. cats/img_001.png).")
    with _locked(folder):
        rows = [dict(r) for r in version_rows(ws, name)]
        by_file = {r["file"]: r for r in rows}
        unknown = [f for f in wanted if f not in by_file]
        if unknown:
            example = next(iter(by_file), "cats/img_001.png")
            raise DatasetError(f"Dataset {name!r} has no image {unknown[0]!r}"
                               f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; name images by "
                               f"their path inside the dataset, e.g. {example}.")
        changed = [f for f in dict.fromkeys(wanted) if apply(by_file[f])]
        if not changed:
            head = json.loads((_meta(folder) / "history.jsonl").read_text(encoding="utf-8").splitlines()[-1])
            return {**head, "unchanged": True}
        _refuse_untrainable(name, [r for r in version_rows(ws, name)], rows)
        return {**_commit(folder, rows, describe(changed)), "unchanged": False}


def _refuse_untrainable(name: str, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Refuse a change that makes a trainable dataset untrainable (a dataset that was not already is let be)."""
    def counts(rows: list[dict[str, Any]]) -> Counter:
        return Counter(r["label"] for r in rows if not r["excluded"] and r.get("split") != "test")

    was, now = counts(before), counts(after)
    if len(now) < 2 <= len(was):
        raise DatasetError(f"That would leave {name!r} with fewer than two classes; a classifier needs two or more.")
    low = [(c, n) for c, n in sorted(now.items()) if n < MIN_IMAGES_PER_CLASS <= was.get(c, 0) or
           (n < MIN_IMAGES_PER_CLASS and c not in was)]
    if low:
        c, n = low[0]
        raise DatasetError(f"That would leave class {c!r} with {n} image; a class needs at least "
                           f"{MIN_IMAGES_PER_CLASS} (exclude all of its images to drop the class).")


def _files_text(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{len(files)} images"


def exclude_images(ws: "Workspace", name: str, files: Iterable[str | os.PathLike],
                   excluded: bool = True, why: str | None = None) -> dict[str, Any]:
    """Leave images out of the dataset (or take them back, ``excluded=False``) in a new version.

    Args:
        files: paths inside the dataset (``cats/img_001.png``) or the images' absolute paths.
        why: said in the history (e.g. "exact duplicate").
    Returns:
        The history entry ``{version, when, change, counts, unchanged}`` (``unchanged``: nothing to do).
    Raises:
        DatasetError: unknown dataset or image, or the change would leave fewer than two classes or a class with
            a single image.
    """
    def apply(r: dict[str, Any]) -> bool:
        if r["excluded"] == excluded:
            return False
        r["excluded"] = excluded
        return True

    verb = "excluded" if excluded else "included again"
    return _change(ws, name, files, apply, lambda ch: f"{verb} {_files_text(ch)}" + (f" ({why})" if why else ""))


def relabel_images(ws: "Workspace", name: str, files: Iterable[str | os.PathLike], to: str) -> dict[str, Any]:
    """Move images to class ``to`` (an existing class or a new one) in a new version; the files stay where they are.

    Raises:
        DatasetError: unknown dataset or image, a class name that is not a plain name, or a class left with a
            single image.
    """
    to = str(to).strip()
    if not to or safe_name(to, fallback="") != to:
        raise DatasetError(f"{to!r} is not a valid class name; use letters, digits, '-', '_' or '.' (e.g. cats).")

    def apply(r: dict[str, Any]) -> bool:
        if r["label"] == to:
            return False
        r["label"] = to
        return True

    return _change(ws, name, files, apply, lambda ch: f"moved {_files_text(ch)} to {to!r}")


def restore_version(ws: "Workspace", name: str, version: str) -> dict[str, Any]:
    """Make the current version equal to ``version`` (a new history entry with that version's id).

    Raises:
        DatasetError: unknown dataset or version.
    """
    folder = _folder(ws, name)
    if is_multi_label_folder(folder):
        raise DatasetError(f"{name!r} {MULTI_LABEL_NOT_VERSIONED}.")
    ensure_versions(ws, name)
    vid = resolve_version(ws, name, version)
    with _locked(folder):
        return _commit(folder, version_rows(ws, name, vid), f"restored {vid}")


def add_images(ws: "Workspace", name: str, added: list[tuple[str, str]], change: str,
               split: str | None = None) -> dict[str, Any] | None:
    """Record images just saved into the folder of a managed dataset (``[(path inside the dataset, label)]``, in
    the split ``split`` of a train/val/test layout) as a new version; nothing for a dataset not versioned yet (its
    first version will include them)."""
    folder = _folder(ws, name)
    if not is_managed(ws, name) or not added:
        return None
    root = images_root(folder)
    with _locked(folder):
        rows = [dict(r) for r in version_rows(ws, name)]
        known = {r["file"] for r in rows}
        for file, label in added:
            if file not in known:
                row = {"file": file, "sha256": file_sha256(root / file), "label": label, "excluded": False}
                if split:
                    row["split"] = split
                rows.append(row)
        return _commit(folder, rows, change)


def class_counts(ws: "Workspace", name: str) -> dict[str, int]:
    """Images per class of the workspace dataset ``name`` now (its current version; for a dataset not versioned
    yet, the image files in its class folders); empty when there is no such dataset."""
    folder = ws.datasets_dir / name
    if not folder.is_dir() or name.startswith("."):
        return {}
    if is_managed(ws, name):
        return dict(history(ws, name)[0]["counts"]["classes"])

    root = _find_dataset_root(images_root(folder))
    counts: dict[str, int] = {}
    for parent in list(split_layout(root) or {}) or [root]:
        for d in sorted(parent.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                counts[d.name] = counts.get(d.name, 0) + sum(1 for f in d.iterdir()
                                                             if f.suffix.lower() in IMAGE_EXTENSIONS)
    return dict(sorted(counts.items()))

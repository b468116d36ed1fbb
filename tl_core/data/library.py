"""The datasets a user can pick, and the one way every surface opens a dataset through the workspace.

The sample datasets ship in the repository's ``sample_data/``; uploads (a zip, or images added class by
class) are unpacked into ``<workspace>/datasets/<name>/`` under sanitised names. :func:`open_data` opens any
``DATA`` (folder, zip, CSV, or an already opened :class:`Dataset`) with the workspace's check cache and
zip folder, so a dataset is checked and hashed once whichever page, task or command opens it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from ..errors import CancelledError, DatasetError
from ..fileio import write_atomic
from ..storage.workspace import Workspace
from .images import IMAGE_EXTENSIONS, image_from_bytes
from .intake import (Dataset, _find_dataset_root, find_multi_label_csv, open_dataset, pack_uploaded_folder,
                     safe_extract_zip, split_layout)
from .names import REPO_ROOT, SAMPLE_DATA_DIR, is_dataset_name, safe_name, unique_dir
from .versions import (META_DIR, add_images, changed_version, ensure_versions, images_root, is_managed,
                       open_version, parse_ref, workspace_datasets)

__all__ = [
    "REPO_ROOT",
    "SAMPLE_DATA_DIR",
    "safe_name",
    "sample_datasets",
    "workspace_datasets",
    "dataset_signature",
    "open_data",
    "save_uploaded_zip",
    "save_uploaded_folder",
    "add_class_images",
    "save_upload",
    "uploaded_dataset_dir",
    "deleted_dataset",
    "UPLOAD_REPORT",
]

log = logging.getLogger(__name__)

#: Written into an unpacked upload: the files the zip held that are not in the folder, and why
#: (:func:`tl_core.data.report.dataset_overview` lists them).
UPLOAD_REPORT = ".upload-report.json"


# --------------------------------------------------------------------------------------------------
# which datasets there are, and opening one
# --------------------------------------------------------------------------------------------------
def sample_datasets(root: str | os.PathLike = SAMPLE_DATA_DIR) -> list[dict[str, str]]:
    """The sample datasets: every folder in ``root``.

    Returns:
        [{name, path}] sorted by name; empty when the folder is missing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return [{"name": d.name, "path": str(d)} for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith((".", "_"))]


def dataset_signature(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a dataset's files (names, sizes, mtimes) to key caches of its report.

    Changes when a file is added, removed or rewritten, and when a managed dataset moves to another version
    (labels or exclusions changed); does not read image contents. Recording a folder's first version (its images
    as they are, what a training does to a plain folder) changes nothing: a page that asked for a data check
    before a training started on the same folder still finds its check.
    """
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if not p.is_dir():
        return f"{p}:missing"
    parts = [f"version {v}"] if (v := changed_version(p)) else []
    for dirpath, dirnames, filenames in os.walk(p):
        if dirpath == str(p):
            dirnames[:] = [d for d in dirnames if d != META_DIR]  # the versions' records: the line above
        dirnames.sort()
        for fn in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, fn))
            except OSError:
                continue
            parts.append(f"{dirpath}/{fn}:{st.st_size}:{st.st_mtime_ns}")
    return f"{p.resolve()}:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def open_data(data: str | os.PathLike | Dataset, workspace: "Workspace | None" = None, *,
              min_per_class: int | None = None, progress: Callable[[int, int], None] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> Dataset:
    """Open any ``DATA`` (folder, zip, CSV, ``NAME`` or ``NAME@VERSION`` of a managed dataset) through the
    workspace, or pass a :class:`Dataset` through.

    The one way the engine, the pages and the command line open a dataset: zips unpack into the workspace's
    ``datasets/`` folder (once per content), and the workspace's check cache means an unchanged file is not
    read again. A dataset of the workspace (named, or by its folder) opens as its current version, or the
    version named (:mod:`tl_core.data.versions`).

    Args:
        data: dataset path or an already opened dataset.
        workspace: the workspace (default ``$TL_HOME``).
        min_per_class: the fewest usable images a class may have (default: enough to train on).
        progress: called with (done, total) while images are checked.
        should_cancel: polled while checking.
    Returns:
        The dataset.
    Raises:
        DatasetError: the data does not exist or cannot be used.
    """
    if isinstance(data, Dataset):
        return data
    if workspace is None:
        workspace = Workspace.default()
    extra = {} if min_per_class is None else {"min_per_class": min_per_class}
    ref = parse_ref(workspace, data)
    # NAME, NAME@VERSION, or the folder of a versioned dataset: that version's images and labels (a folder not
    # versioned yet opens as the folder it is, and is versioned when first trained on or changed)
    if ref is not None and (ref.version or is_managed(workspace, ref.name) or not Path(data).exists()):
        return open_version(workspace, ref.name, ref.version, progress=progress, should_cancel=should_cancel, **extra)
    src = Path(data)
    if not src.exists():
        raise DatasetError(f"{data} does not exist; give a folder with one sub-folder per class, a .zip of one, "
                           "a CSV of path,label, or the name of a dataset of the workspace (`tl-core data list`).")
    return open_dataset(src, extract_dir=None if src.is_dir() else workspace.datasets_dir / src.stem,
                        check_cache=workspace.cache_dir / "checked.sqlite", progress=progress,
                        should_cancel=should_cancel, **extra)


# --------------------------------------------------------------------------------------------------
# uploads
# --------------------------------------------------------------------------------------------------
def save_uploaded_zip(ws: Workspace, filename: str, data: bytes | os.PathLike, labels_csv: bytes | None = None, *,
                      progress: Callable[[str, int, int], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None) -> Path:
    """Unpack an uploaded dataset zip into ``<workspace>/datasets/<safe name>/`` and return that folder.

    The zip goes through :func:`tl_core.data.safe_extract_zip` (no path traversal, symlinks, zip bombs);
    the folder name comes from the file name, sanitised, with ``-2``, ``-3`` … added when it exists.
    Images are labelled by their class folder, or by a CSV of ``path,label`` rows: ``labels_csv`` uploaded
    next to the zip, or the one ``.csv`` inside it. With a CSV the images are sorted into class folders,
    and rows that point outside the archive (absolute paths, ``..``) are refused. Files left out are
    recorded for the dataset report.

    The unpacked folder must make a dataset (two classes or more, enough usable images in each) before it
    is moved into place: a zip that cannot is refused with one message and leaves nothing behind.

    Args:
        ws: the workspace.
        filename: the upload's name (names the dataset and the messages).
        data: the zip's bytes, or the file that holds them (an upload the server wrote for the ``intake``
            task; left where it is).
        labels_csv: a labels CSV uploaded next to the zip.
        progress: called with (stage, done, total) while unpacking and checking.
        should_cancel: polled while unpacking and checking; True raises :class:`CancelledError`.
    Returns:
        The new dataset's folder.
    Raises:
        DatasetError: not a zip, unsafe, encrypted, too large, no images, one class only, too few usable
            images in a class, or an unusable CSV.
        CancelledError: ``should_cancel`` said so (nothing is left behind).
    """
    given = Path(data) if isinstance(data, (str, os.PathLike)) else None
    if (given.stat().st_size == 0 if given is not None else not data):
        raise DatasetError(f"{filename} is empty; upload a .zip with one folder per class.")
    stem = Path(filename).stem if filename.lower().endswith(".zip") else Path(filename).name
    target = unique_dir(ws.datasets_dir, safe_name(stem))
    tmp_zip = given or ws.datasets_dir / f".upload-{os.getpid()}-{time.time_ns()}.zip"
    tmp_dir = ws.datasets_dir / f".unpack-{os.getpid()}-{time.time_ns()}"
    sorted_dir = ws.datasets_dir / f".sorted-{os.getpid()}-{time.time_ns()}"
    stage = (lambda what: lambda done, total: progress(what, done, total)) if progress else (lambda what: None)
    try:
        if given is None:
            tmp_zip.write_bytes(data)
        if not zipfile.is_zipfile(tmp_zip):
            raise DatasetError(f"{filename} is not a zip archive; upload a .zip with one folder per class.")
        try:
            _, skipped, _ = safe_extract_zip(tmp_zip, tmp_dir, progress=stage(f"Unpacking {filename}"),
                                             should_cancel=should_cancel)
        except (DatasetError, CancelledError) as e:  # named after the upload, not the file it waits in
            raise type(e)(str(e).replace(tmp_zip.name, filename)) from None
        images = [f for f in tmp_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise DatasetError(f"{filename} holds no images; put the images in one folder per class "
                               "(e.g. cats/1.jpg, dogs/1.jpg)"
                               + (" and zip that." if filename.lower().endswith(".zip") else "."))
        csv_name, csv_text = _labels_csv(tmp_zip, labels_csv)
        report = {"source": filename, "skipped": [{"path": s.path, "reason": s.reason} for s in skipped
                                                  if not (csv_name and s.path == csv_name)]}
        result = tmp_dir
        if csv_text is not None:
            report["skipped"] += _sort_by_csv(tmp_dir, csv_name, csv_text, sorted_dir)
            result = sorted_dir
        # refused here, before anything is in the dataset list
        _check_trainable(result, filename, ws, progress=stage("Checking the images"), should_cancel=should_cancel)
        # what was left out, for the dataset report (the folder no longer shows it)
        (result / UPLOAD_REPORT).write_text(json.dumps(report))
        if progress:
            progress("Recording the first version", 0, 1)
        os.replace(result, target)
        ensure_versions(ws, target.name, change=f"uploaded {filename}")
        if report["skipped"]:
            log.info("%s: %d file(s) left out", filename, len(report["skipped"]))
    finally:
        if given is None:
            tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(sorted_dir, ignore_errors=True)
    return target


def save_uploaded_folder(ws: Workspace, files: Iterable[tuple[str, bytes]]) -> Path:
    """Save a folder uploaded from the browser (``[(path inside the folder, bytes)]``, each path starting with the
    folder's own name, e.g. ``pets/cats/1.jpg``) as a new dataset, through the same checks as a zip: it is
    packed into one and goes through :func:`save_uploaded_zip` (safe paths and sizes, class folders or a
    ``train/``/``val/``/``test/`` layout, a labels CSV inside, one class or no images refused with nothing saved).

    Raises:
        DatasetError: no files, a path that leaves the folder, or whatever :func:`save_uploaded_zip` refuses.
    """
    buf = io.BytesIO()
    name = pack_uploaded_folder(files, buf)
    return save_uploaded_zip(ws, name, buf.getvalue())


def _check_trainable(folder: Path, filename: str, ws: Workspace, progress: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> None:
    """Raise the reason an unpacked upload cannot be trained on (one class, a class without usable images), in
    the words of :func:`open_dataset`, naming the upload instead of the temporary folder."""
    try:
        open_dataset(folder, check_cache=ws.cache_dir / "checked.sqlite", progress=progress,
                     should_cancel=should_cancel)
    except DatasetError as e:
        msg = str(e).replace(f"{folder.name}/", "").replace(folder.name, filename)
        raise DatasetError(msg) from None

_MAX_CSV_BYTES = 20 * 1024**2


def _labels_csv(zip_path: Path, uploaded: bytes | None) -> tuple[str | None, str | None]:
    """(name inside the zip or None, text) of the labels CSV: the uploaded one, else the zip's only .csv."""
    if uploaded is not None:
        raw = uploaded
        name = None
    else:
        with zipfile.ZipFile(zip_path) as zf:
            csvs = [i for i in zf.infolist() if i.filename.lower().endswith(".csv") and not i.is_dir()
                    and not any(part.startswith((".", "__MACOSX")) for part in i.filename.split("/"))]
            if len(csvs) != 1:
                return None, None
            if csvs[0].file_size > _MAX_CSV_BYTES:
                raise DatasetError(f"{csvs[0].filename} is larger than {_MAX_CSV_BYTES // 1024**2} MB; is it a labels CSV?")
            name = csvs[0].filename
            raw = zf.read(csvs[0])
    if len(raw) > _MAX_CSV_BYTES:
        raise DatasetError(f"The labels CSV is larger than {_MAX_CSV_BYTES // 1024**2} MB; is it a labels CSV?")
    try:
        return name, raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError("The labels CSV is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in spreadsheet apps).") from None


def _unsafe_csv_path(cell: str) -> bool:
    p = cell.strip().replace("\\", "/")
    return p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in p.split("/")


def _sort_by_csv(root: Path, csv_name: str | None, text: str, dest: Path) -> list[dict[str, str]]:
    """Copy the images a labels CSV names into ``dest/<label>/`` (rows pointing outside ``root`` refused).

    The CSV is read by :func:`tl_core.data.open_dataset` (paths relative to the CSV's folder; a CSV
    uploaded separately is placed where its paths resolve: the archive root or its single top folder).
    """
    import csv as csv_mod

    rows = list(csv_mod.reader(io.StringIO(text)))
    refused = [{"path": r[0] if r else "", "reason": "points outside the archive; refused"}
               for r in rows if any(_unsafe_csv_path(c) for c in r)]
    safe_rows = [r for r in rows if not any(_unsafe_csv_path(c) for c in r)]
    if csv_name:
        csv_path = root / csv_name
    else:
        tops = [d for d in root.iterdir() if d.is_dir()]
        base = root
        first = next((c.strip() for r in safe_rows for c in r
                      if Path(c.strip()).suffix.lower() in IMAGE_EXTENSIONS), None)
        if first and not (root / first).is_file() and len(tops) == 1 and (tops[0] / first).is_file():
            base = tops[0]
        csv_path = base / "labels.csv"
    buf = io.StringIO()
    csv_mod.writer(buf).writerows(safe_rows)
    csv_path.write_text(buf.getvalue(), encoding="utf-8")
    ds = open_dataset(csv_path, min_per_class=1)
    dest.mkdir(parents=True, exist_ok=True)
    root_resolved = root.resolve()
    skipped = refused + [{"path": s.path, "reason": s.reason} for s in ds.skipped]
    if ds.multi_label:  # no class folders for label sets: images/ and a labels.csv that opens as this dataset
        return _copy_multi_label(ds, root_resolved, dest, skipped)
    for item in ds.items:
        src = Path(item.path).resolve()
        if root_resolved not in src.parents:
            skipped.append({"path": str(item.path.name), "reason": "points outside the archive; refused"})
            continue
        cls_dir = dest / safe_name(item.label, fallback="class")
        cls_dir.mkdir(parents=True, exist_ok=True)
        target = cls_dir / src.name
        n = 2
        while target.exists():
            target = cls_dir / f"{src.stem}-{n}{src.suffix}"
            n += 1
        shutil.copyfile(src, target)
    if not any(dest.iterdir()):
        raise DatasetError("No row of the labels CSV names an image inside the zip; paths must be relative to "
                           "the CSV (e.g. images/001.jpg,cat).")
    return skipped


def _copy_multi_label(ds: Dataset, root: Path, dest: Path, skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    """Copy a multi-label CSV's images into ``dest/images/`` and write ``dest/labels.csv`` (``path,labels``)."""
    import csv as csv_mod

    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels"]]
    for item in ds.items:
        src = Path(item.path).resolve()
        if root not in src.parents:
            skipped.append({"path": str(item.path.name), "reason": "points outside the archive; refused"})
            continue
        target = dest / "images" / src.name
        n = 2
        while target.exists():
            target = dest / "images" / f"{src.stem}-{n}{src.suffix}"
            n += 1
        shutil.copyfile(src, target)
        rows.append([f"images/{target.name}", item.label])
    if len(rows) == 1:
        raise DatasetError("No row of the labels CSV names an image inside the zip; paths must be relative to "
                           "the CSV (e.g. images/001.jpg,dog;ball).")
    buf = io.StringIO()
    csv_mod.writer(buf).writerows(rows)
    (dest / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
    return skipped


def add_class_images(ws: Workspace, dataset: str, class_name: str,
                     files: Iterable[tuple[str, bytes]]) -> tuple[Path, list[str], list[dict[str, str]]]:
    """Save uploaded images into ``<workspace>/datasets/<dataset>/<class>/`` (both names sanitised).

    Every file is decoded first; one that is not a readable image is skipped with the reason. Name
    clashes get a numeric suffix, never overwrite.

    Returns:
        (dataset folder, saved file names, skipped [{path, reason}])
    Raises:
        DatasetError: the class name is empty, or no file was a usable image.
    """
    if not str(class_name).strip():
        raise DatasetError("Give the class a name (for example 'cats') before adding its images.")
    ds_dir = ws.datasets_dir / safe_name(dataset)
    if find_multi_label_csv(ds_dir) is not None:  # images of a multi-label set are labelled by its CSV, not a folder
        raise DatasetError(f"'{ds_dir.name}' is multi-label: its images are labelled by its labels.csv, not by class "
                           "folders; upload a new zip with the images and their rows in labels.csv instead.")
    managed = is_managed(ws, ds_dir.name)
    root = images_root(ds_dir) if managed else _find_dataset_root(ds_dir) if ds_dir.is_dir() else ds_dir
    # a dataset with a train/ (val/) (test/) layout takes new images into train/, next to its other class folders
    splits = split_layout(root)
    train_dir = next((d for d, s in (splits or {}).items() if s == "train" and any(c.is_dir() for c in d.iterdir())),
                     None)
    cls_dir = (train_dir or root) / safe_name(class_name, fallback="class")
    saved: list[str] = []
    skipped: list[dict[str, str]] = []
    for name, data in files:
        base = safe_name(Path(name).stem, fallback="image")
        ext = Path(name).suffix.lower()
        if ext not in IMAGE_EXTENSIONS:
            skipped.append({"path": name, "reason": f"not an image file ({ext or 'no extension'})"})
            continue
        try:
            image_from_bytes(data, name)
        except DatasetError as e:
            skipped.append({"path": name, "reason": str(e).split(": ", 1)[-1]})
            continue
        cls_dir.mkdir(parents=True, exist_ok=True)
        target = cls_dir / f"{base}{ext}"
        n = 2
        while target.exists():
            target = cls_dir / f"{base}-{n}{ext}"
            n += 1
        target.write_bytes(data)
        saved.append(target.name)
    if not saved:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise DatasetError(f"None of the files could be added as images ({reasons or 'no files'}); "
                           "upload .jpg, .png, .webp or .bmp images.")
    if managed:  # a new version with the new images; a dataset not versioned yet takes them in its first one
        rel = cls_dir.relative_to(root).as_posix()
        add_images(ws, ds_dir.name, [(f"{rel}/{n}", cls_dir.name) for n in saved],
                   f"added {len(saved)} image(s) to {cls_dir.name!r}", split="train" if train_dir else None)
    return ds_dir, saved, skipped


def save_upload(ws: "Workspace", name: str, data: bytes) -> Path:
    """Keep an uploaded image for a task to read (``<workspace>/uploads/<sha256><ext>``, content-addressed:
    the same picture uploaded twice is one file, and a task keyed by its path is keyed by its content).

    Raises:
        DatasetError: the file is empty or has no image extension.
    """
    ext = Path(name).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        ext = ".jpg" if data[:3] == b"\xff\xd8\xff" else ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ""
    if not data or not ext:
        raise DatasetError(f"{name}: not an image file; upload .jpg, .png, .webp or .bmp images.")
    d = ws.home / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"{hashlib.sha256(data).hexdigest()}{ext}"
    if not target.exists():
        write_atomic(target, data)
    return target


# --------------------------------------------------------------------------------------------------
# uploaded datasets by name (which runs use one, renaming and deleting: tl_core.runs.datasets)
# --------------------------------------------------------------------------------------------------
def uploaded_dataset_dir(ws: Workspace, name: str) -> Path:
    """The folder of the uploaded dataset ``name`` (``<workspace>/datasets/<name>``).

    Raises:
        DatasetError: no uploaded dataset has that name (sample datasets are not managed here).
    """
    if not is_dataset_name(name):
        raise DatasetError(f"{name!r} is not the name of an uploaded dataset; the Data page lists them.")
    folder = ws.datasets_dir / name
    if not folder.is_dir():
        raise DatasetError(f"No uploaded dataset called {name!r}; only datasets uploaded into the workspace can be "
                           "renamed or deleted (the sample datasets ship with TL Studio).")
    return folder


def deleted_dataset(ws: Workspace, data: str | os.PathLike | None) -> str | None:
    """The name of the workspace dataset a run's ``data`` (a folder, ``NAME`` or ``NAME@VERSION``) names when it is
    no longer on this server (deleted), else None (it is there, or it was never a workspace dataset)."""
    text = str(data or "")
    if not text or Path(text).exists():
        return None
    name = Path(text.split("@", 1)[0]).name
    inside = Path(text).parent.resolve() == ws.datasets_dir.resolve() or not os.path.isabs(text)
    return name if inside and is_dataset_name(name) and not (ws.datasets_dir / name).is_dir() else None

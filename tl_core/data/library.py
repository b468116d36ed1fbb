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
import re
import shutil
import time
import unicodedata
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..access import Actor, require
from ..errors import DatasetError
from ..fileio import write_atomic
from .images import IMAGE_EXTENSIONS, image_from_bytes
from .intake import Dataset, _find_dataset_root, find_multi_label_csv, open_dataset, safe_extract_zip, split_layout
from .report import UPLOAD_REPORT

if TYPE_CHECKING:
    from ..runs.workspace import Workspace

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
    "dataset_runs",
    "dataset_users",
    "rename_dataset",
    "delete_dataset",
    "deleted_dataset",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # tl_core/data/library.py -> the repository


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


def _unique_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``, … when that exists already."""
    candidate = parent / name
    n = 2
    while candidate.exists():
        candidate = parent / f"{name}-{n}"
        n += 1
    return candidate



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


def workspace_datasets(ws: Workspace) -> list[dict[str, str]]:
    """Datasets in the workspace (``datasets/<name>/``), newest first: ``{name, path, origin}`` (origin: where it
    came from, :func:`tl_core.data.versions.origin`)."""
    from .versions import origin

    d = ws.datasets_dir
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [{"name": p.name, "path": str(p), "origin": origin(p)} for p in dirs]


def dataset_signature(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a dataset's files (names, sizes, mtimes) to key caches of its report.

    Changes when a file is added, removed or rewritten; does not read image contents.
    """
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if not p.is_dir():
        return f"{p}:missing"
    parts = []
    for dirpath, dirnames, filenames in os.walk(p):
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
        from ..runs.workspace import Workspace

        workspace = Workspace.default()
    extra = {} if min_per_class is None else {"min_per_class": min_per_class}
    from .versions import is_managed, open_version, parse_ref

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
def save_uploaded_zip(ws: Workspace, filename: str, data: bytes, labels_csv: bytes | None = None) -> Path:
    """Unpack an uploaded dataset zip into ``<workspace>/datasets/<safe name>/`` and return that folder.

    The zip goes through :func:`tl_core.data.safe_extract_zip` (no path traversal, symlinks, zip bombs);
    the folder name comes from the file name, sanitised, with ``-2``, ``-3`` … added when it exists.
    Images are labelled by their class folder, or by a CSV of ``path,label`` rows: ``labels_csv`` uploaded
    next to the zip, or the one ``.csv`` inside it. With a CSV the images are sorted into class folders,
    and rows that point outside the archive (absolute paths, ``..``) are refused. Files left out are
    recorded for the dataset report.

    The unpacked folder must make a dataset (two classes or more, enough usable images in each) before it
    is moved into place: a zip that cannot is refused with one message and leaves nothing behind.

    Raises:
        DatasetError: not a zip, unsafe, encrypted, too large, no images, one class only, too few usable
            images in a class, or an unusable CSV.
    """
    if not data:
        raise DatasetError(f"{filename} is empty; upload a .zip with one folder per class.")
    stem = Path(filename).stem if filename.lower().endswith(".zip") else Path(filename).name
    target = _unique_dir(ws.datasets_dir, safe_name(stem))
    tmp_zip = ws.datasets_dir / f".upload-{os.getpid()}-{time.time_ns()}.zip"
    tmp_dir = ws.datasets_dir / f".unpack-{os.getpid()}-{time.time_ns()}"
    sorted_dir = ws.datasets_dir / f".sorted-{os.getpid()}-{time.time_ns()}"
    try:
        tmp_zip.write_bytes(data)
        if not zipfile.is_zipfile(tmp_zip):
            raise DatasetError(f"{filename} is not a zip archive; upload a .zip with one folder per class.")
        _, skipped, _ = safe_extract_zip(tmp_zip, tmp_dir)
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
        _check_trainable(result, filename, ws)  # refused here, before anything is in the dataset list
        # what was left out, for the dataset report (the folder no longer shows it)
        (result / UPLOAD_REPORT).write_text(json.dumps(report))
        os.replace(result, target)
        from .versions import ensure_versions

        ensure_versions(ws, target.name, change=f"uploaded {filename}")
        if report["skipped"]:
            log.info("%s: %d file(s) left out", filename, len(report["skipped"]))
    finally:
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
    files = [(str(name).replace("\\", "/"), data) for name, data in files]
    if not files:
        raise DatasetError("The folder is empty; choose a folder with one sub-folder of images per class.")
    tops = {name.split("/", 1)[0] if "/" in name else "" for name, _ in files}
    folder = tops.pop() if len(tops) == 1 and "" not in tops else ""
    if folder:  # the dataset is named after the folder, and holds what the folder held
        files = [(name.split("/", 1)[1], data) for name, data in files]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files:
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not parts[-1]:
                raise DatasetError(f"{name}: not a file inside the folder; choose the folder again.")
            zf.writestr(name, data)
    return save_uploaded_zip(ws, folder or "folder", buf.getvalue())


def _check_trainable(folder: Path, filename: str, ws: Workspace) -> None:
    """Raise the reason an unpacked upload cannot be trained on (one class, a class without usable images), in
    the words of :func:`open_dataset`, naming the upload instead of the temporary folder."""
    try:
        open_dataset(folder, check_cache=ws.cache_dir / "checked.sqlite")
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
    from .versions import images_root, add_images, is_managed

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
# managing uploaded datasets: which runs use one, rename, delete
# --------------------------------------------------------------------------------------------------
def _uploaded_dir(ws: Workspace, name: str) -> Path:
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


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` can name a folder of ``<workspace>/datasets`` (already safe, not hidden)."""
    return bool(name) and name == safe_name(name, fallback="") and not name.startswith(".")


def _reads(data: str, folder: Path, ws: Workspace) -> bool:
    """Whether a run or task given ``data`` reads the files of ``folder``: the folder itself, a file or folder
    inside it, or a zip that :func:`open_data` unpacks into it (``datasets/<zip stem>``)."""
    if not isinstance(data, str) or not data:
        return False
    name, at, _ = data.partition("@")
    if at and "/" not in data:  # NAME@VERSION of a managed dataset
        return ws.datasets_dir.resolve() / name == folder
    p = Path(data).expanduser()
    try:
        p = p.resolve()
    except OSError:
        return False
    return p == folder or folder in p.parents or (
        p.suffix.lower() == ".zip" and ws.datasets_dir.resolve() / p.stem == folder)


def _param_paths(params: dict) -> Iterable[str]:
    for v in (params or {}).values():
        if isinstance(v, str):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, str))


def dataset_runs(ws: Workspace, name: str) -> list[dict]:
    """Every run of the workspace (any status) that trained or trains on the uploaded dataset ``name``."""
    folder = _uploaded_dir(ws, name).resolve()
    return [r for r in ws.store().list() if _reads(str(r.get("data") or ""), folder, ws)]


def dataset_users(ws: Workspace, name: str) -> list[str]:
    """What is reading the uploaded dataset ``name`` now: queued or running runs and tasks, one phrase each
    (``"run 20250101-… (running)"``, ``"a task checking the data (queued)"``); empty when nothing is."""
    from ..runs.store import ACTIVE_STATUSES

    folder = _uploaded_dir(ws, name).resolve()
    store = ws.store()
    users = [f"run {r['id']} ({r['status']})" for r in store.list()
             if r["status"] in ACTIVE_STATUSES and _reads(str(r.get("data") or ""), folder, ws)]
    for t in store.tasks():
        if t["status"] in ACTIVE_STATUSES and t["kind"] != "train" and any(
                _reads(v, folder, ws) for v in _param_paths(t.get("params") or {})):
            users.append(f"a task {_task_label(t['kind'])} ({t['status']})")
    return users


def _task_label(kind: str) -> str:
    from ..runs.kinds import KINDS

    label = KINDS[kind].label if kind in KINDS else kind.replace("_", " ")
    return label[:1].lower() + label[1:]


def _refuse_if_used(ws: Workspace, name: str, doing: str) -> None:
    users = dataset_users(ws, name)
    if users:
        raise DatasetError(f"Dataset {name!r} cannot be {doing} while it is in use by {', '.join(users[:3])}"
                           f"{' …' if len(users) > 3 else ''}; wait until it has finished or cancel it (runs on the "
                           "Train page), then try again.")


def rename_dataset(ws: Workspace, name: str, new_name: str, actor: Actor | None = None) -> Path:
    """Rename the uploaded dataset ``name`` to ``new_name`` (sanitised like every upload name).

    Runs that trained on it follow it: a ``NAME@VERSION`` reference takes the new name, and a finished run's saved
    predictions point at the pictures' new paths (its image views find them).

    Returns:
        The dataset's new folder.
    Raises:
        DatasetError: no such uploaded dataset, an empty new name, a dataset of that name exists already, or
            a queued or running run or task reads it.
        AccessError: ``actor`` is a student outside their own project (:mod:`tl_core.access`).
    """
    folder = _uploaded_dir(ws, name)
    require(actor, ws, f"rename the dataset {name!r}")
    if not str(new_name).strip():
        raise DatasetError("Give the dataset a new name (letters, digits, '-', '_' or '.').")
    target_name = safe_name(new_name, fallback="")
    if not target_name:
        raise DatasetError(f"{new_name!r} has no letter or digit; give the dataset a name such as 'my_photos'.")
    if target_name == name:
        return folder
    target = ws.datasets_dir / target_name
    if target.exists():
        raise DatasetError(f"A dataset called {target_name!r} exists already; choose another name.")
    _refuse_if_used(ws, name, "renamed")
    trained = [r for r in dataset_runs(ws, name) if r["status"] == "done"]
    try:
        os.rename(folder, target)  # atomic on one file system: the dataset is under one name or the other
    except OSError as e:
        raise DatasetError(f"Could not rename {name!r} to {target_name!r} ({e.strerror or e}).") from None
    from ..runs.files import RunFiles

    for r in trained:  # their image views (mistakes, Grad-CAM, maps) find the pictures under the new name
        try:
            RunFiles(ws.run_dir(r["id"])).move_images(folder.resolve(), target.resolve())
        except Exception as e:  # a run whose files are damaged keeps its old paths; the rename stands
            log.warning("run %s: image paths not updated after the rename (%s)", r["id"], e)
    # runs refer to a version by name (NAME@VERSION): they follow the dataset to its new name
    store = ws.store()
    for r in store.list():
        data = str(r.get("data") or "")
        if data.startswith(f"{name}@") and "/" not in data:
            summary = r.get("summary") or {}
            if summary.get("dataset_version") == data:
                summary = {**summary, "dataset_version": f"{target_name}@{data.split('@', 1)[1]}"}
            store.update(r["id"], data=f"{target_name}@{data.split('@', 1)[1]}", summary=summary or None)
    log.info("dataset %s renamed to %s", name, target_name)
    return target


def delete_dataset(ws: Workspace, name: str, actor: Actor | None = None) -> int:
    """Delete the uploaded dataset ``name`` and its images from the workspace.

    The folder is first moved out of the dataset list in one step (a hidden name), then removed, so the list
    never shows a half-deleted dataset. Runs that trained on it are kept (with their results); the caches keep
    nothing that names it.

    Returns:
        How many runs (finished, failed or cancelled) trained on it and are kept.
    Raises:
        DatasetError: no such uploaded dataset, or a queued or running run or task reads it.
        AccessError: ``actor`` is a student outside their own project (:mod:`tl_core.access`).
    """
    folder = _uploaded_dir(ws, name)
    require(actor, ws, f"delete the dataset {name!r}")
    _refuse_if_used(ws, name, "deleted")
    kept = len(dataset_runs(ws, name))
    trash = ws.datasets_dir / f".deleting-{name}-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(folder, trash)
    except OSError as e:
        raise DatasetError(f"Could not delete {name!r} ({e.strerror or e}).") from None
    shutil.rmtree(trash, ignore_errors=True)
    log.info("dataset %s deleted (%d run(s) trained on it are kept)", name, kept)
    return kept


def deleted_dataset(ws: Workspace, data: str | os.PathLike | None) -> str | None:
    """The name of the workspace dataset a run's ``data`` (a folder, ``NAME`` or ``NAME@VERSION``) names when it is
    no longer on this server (deleted), else None (it is there, or it was never a workspace dataset)."""
    text = str(data or "")
    if not text or Path(text).exists():
        return None
    name = Path(text.split("@", 1)[0]).name
    inside = Path(text).parent.resolve() == ws.datasets_dir.resolve() or not os.path.isabs(text)
    return name if inside and is_dataset_name(name) and not (ws.datasets_dir / name).is_dir() else None

"""Engine functions the web app needs that are not training itself: dataset intake from uploads, the
dataset and run listings, augmentation previews, local weights uploads and backbone timing.

No streamlit here (tl_core never imports it): the pages call these with plain bytes and paths and draw
the results. Everything writes inside the workspace only, under sanitised names.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import unicodedata
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data import IMAGE_EXTENSIONS, Dataset, image_from_bytes, safe_extract_zip
from .errors import DatasetError, WeightsError
from .runs import Workspace

__all__ = [
    "REPO_ROOT",
    "SAMPLE_DATA_DIR",
    "safe_name",
    "sample_datasets",
    "workspace_datasets",
    "dataset_signature",
    "save_uploaded_zip",
    "add_class_images",
    "class_thumbnails",
    "dataset_overview",
    "preprocess_for",
    "augmentation_preview",
    "weights_dir",
    "save_uploaded_weights",
    "local_weights",
    "time_backbone",
    "runs_rows",
    "normalise_rows",
    "describe_progress",
    "run_metrics",
    "BackgroundTask",
    "start_task",
    "get_task",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The sample datasets that ship with the repository (``scripts/build_sample_data.py``).
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"

#: Written into an unpacked upload: the files the zip held that are not in the folder, and why.
UPLOAD_REPORT = ".upload-report.json"

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
# datasets
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
    """Datasets uploaded into the workspace (``datasets/<name>/``), newest first."""
    d = ws.datasets_dir
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [{"name": p.name, "path": str(p)} for p in dirs]


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


def save_uploaded_zip(ws: Workspace, filename: str, data: bytes, labels_csv: bytes | None = None) -> Path:
    """Unpack an uploaded dataset zip into ``<workspace>/datasets/<safe name>/`` and return that folder.

    The zip goes through :func:`tl_core.data.safe_extract_zip` (no path traversal, symlinks, zip bombs);
    the folder name comes from the file name, sanitised, with ``-2``, ``-3`` … added when it exists.
    Images are labelled by their class folder, or by a CSV of ``path,label`` rows: ``labels_csv`` uploaded
    next to the zip, or the one ``.csv`` inside it. With a CSV the images are sorted into class folders,
    and rows that point outside the archive (absolute paths, ``..``) are refused. Files left out are
    recorded for the dataset report.

    Raises:
        DatasetError: not a zip, unsafe, encrypted, too large, no images, or an unusable CSV.
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
                               "(e.g. cats/1.jpg, dogs/1.jpg) and zip that.")
        csv_name, csv_text = _labels_csv(tmp_zip, labels_csv)
        report = {"source": filename, "skipped": [{"path": s.path, "reason": s.reason} for s in skipped
                                                  if not (csv_name and s.path == csv_name)]}
        result = tmp_dir
        if csv_text is not None:
            report["skipped"] += _sort_by_csv(tmp_dir, csv_name, csv_text, sorted_dir)
            result = sorted_dir
        # what was left out, for the dataset report (the folder no longer shows it)
        (result / UPLOAD_REPORT).write_text(json.dumps(report))
        os.replace(result, target)
        if report["skipped"]:
            log.info("%s: %d file(s) left out", filename, len(report["skipped"]))
    finally:
        tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(sorted_dir, ignore_errors=True)
    return target


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

    from .data import open_dataset

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
    cls_dir = ds_dir / safe_name(class_name, fallback="class")
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
    return ds_dir, saved, skipped


def class_thumbnails(ds: Dataset, per_class: int = 8) -> dict[str, list[str]]:
    """Up to ``per_class`` image paths per class (training images first, in file order)."""
    out: dict[str, list[str]] = {c: [] for c in ds.classes}
    for item in sorted(ds.items, key=lambda i: (i.split == "test", str(i.path))):
        lst = out.setdefault(item.label, [])
        if len(lst) < per_class:
            lst.append(str(item.path))
    return out


def dataset_overview(path: str | os.PathLike, val_split: float = 0.2, seed: int = 0,
                     thumbnails_per_class: int = 8) -> dict[str, Any]:
    """Everything the Data page shows about a dataset folder, as JSON-able data.

    :func:`tl_core.data.dataset_report` of the folder and its split, plus ``thumbnails`` (paths per class),
    ``split_by_class`` (train/val/test counts per class), and the files an uploaded zip held that were
    not unpacked (listed in ``skipped`` with the others).

    Raises:
        DatasetError: the folder cannot be used as a dataset (with what to do).
    """
    from .data import dataset_report, open_dataset, split_dataset

    ds = open_dataset(path)
    split = split_dataset(ds, val_split, seed)
    rep = dataset_report(ds, split)
    upload = Path(path) / UPLOAD_REPORT
    if upload.is_file():
        try:
            extra = json.loads(upload.read_text()).get("skipped", [])
        except (OSError, ValueError):
            extra = []
        if extra:
            rep["skipped"] = extra + rep["skipped"]
            note = f"{len(rep['skipped'])} file(s) were skipped; see the list for reasons."
            rep["warnings"] = [w for w in rep["warnings"] if "were skipped" not in w] + [note]
    rep["thumbnails"] = class_thumbnails(ds, per_class=thumbnails_per_class)
    rep["split_by_class"] = {
        name: {c: sum(1 for i in items if i.label == c) for c in ds.classes}
        for name, items in (("train", split.train), ("val", split.val), ("test", split.test))
    }
    return rep


# --------------------------------------------------------------------------------------------------
# preprocessing and augmentation preview
# --------------------------------------------------------------------------------------------------
def preprocess_for(backbone: str):
    """The eval preprocessing of a backbone from timm's pretrained config, without building the model.

    Returns:
        :class:`tl_core.transforms.Preprocess`; ImageNet defaults for names timm does not know.
    """
    import timm

    from .backbones import CATALOGUE
    from .transforms import Preprocess

    arch = CATALOGUE[backbone].timm_id if backbone in CATALOGUE else backbone
    cfg = None
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # unknown name: fall back below
        cfg = None
    if cfg is None:
        return Preprocess(224, 256, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return Preprocess.from_data_config({"input_size": cfg.input_size, "crop_pct": cfg.crop_pct,
                                        "interpolation": cfg.interpolation, "mean": cfg.mean, "std": cfg.std})


def augmentation_preview(paths: Sequence[str | os.PathLike], backbone: str, preset: str, copies: int = 3,
                         seed: int = 0) -> list[tuple[str, list[np.ndarray]]]:
    """What training images look like after augmentation: ``copies`` random draws per image.

    Uses exactly the training transform (``tl_core.transforms.train_transform``) and undoes the
    normalisation for display.

    Returns:
        [(file name, [HWC uint8 arrays])] per image.
    """
    import torch

    from .data import load_image
    from .transforms import train_transform

    pre = preprocess_for(backbone)
    tf = train_transform(pre, preset)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    torch.manual_seed(seed)
    out = []
    for p in paths:
        arr = np.array(pre.resized_array(load_image(p)))  # writable: torch.from_numpy warns on read-only arrays
        views = []
        for _ in range(copies):
            x = tf(arr) * std + mean
            views.append((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        out.append((Path(p).name, views))
    return out


# --------------------------------------------------------------------------------------------------
# local weights and backbone timing
# --------------------------------------------------------------------------------------------------
def weights_dir(ws: Workspace) -> Path:
    """``<workspace>/weights/``, where uploaded weights files are kept (created when missing)."""
    d = ws.home / "weights"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_uploaded_weights(ws: Workspace, filename: str, data: bytes, backbone: str) -> dict[str, Any]:
    """Save an uploaded ``.safetensors``/``.pth`` into ``<workspace>/weights/`` and check it fits ``backbone``.

    The file is loaded safely (safetensors, or ``torch.load(weights_only=True)``) and put into the
    architecture once; a file that does not fit is deleted again.

    Returns:
        {path, backbone, tensors, source}
    Raises:
        WeightsError: wrong extension, unsafe pickle, damaged file, or weights for another architecture.
    """
    from .backbones import build_model, load_state_dict_file

    ext = Path(filename).suffix.lower()
    if ext not in {".safetensors", ".pth", ".pt", ".bin"}:
        raise WeightsError(f"{filename}: upload a .safetensors (preferred) or .pth weights file.")
    if not data:
        raise WeightsError(f"{filename} is empty.")
    target = weights_dir(ws) / f"{safe_name(Path(filename).stem, fallback='weights')}{ext}"
    n = 2
    while target.exists():
        target = target.with_name(f"{safe_name(Path(filename).stem, fallback='weights')}-{n}{ext}")
        n += 1
    target.write_bytes(data)
    try:
        sd = load_state_dict_file(target)
        _, info = build_model(backbone, 2, weights=str(target))
    except Exception:
        target.unlink(missing_ok=True)
        raise
    return {"path": str(target), "backbone": backbone, "tensors": len(sd), "source": info.source}


def local_weights(ws: Workspace) -> list[dict[str, Any]]:
    """Weights files saved in the workspace: name, path, size in MB."""
    d = weights_dir(ws)
    return [{"name": p.name, "path": str(p), "mb": round(p.stat().st_size / 1e6, 1)}
            for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")]


def time_backbone(backbone: str, batch: int = 8, repeats: int = 2) -> float:
    """Milliseconds per image of a forward pass on this machine (random weights: speed only).

    Returns:
        The best of ``repeats`` timed batches after one warm-up, divided by ``batch``.
    """
    import timm
    import torch

    from .backbones import CATALOGUE

    arch = (CATALOGUE[backbone].timm_id if backbone in CATALOGUE else backbone).split(".")[0]
    pre = preprocess_for(backbone)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    x = torch.randn(batch, 3, pre.input_size, pre.input_size)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return round(best / batch * 1000, 1)


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def runs_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (one per run) for a runs table: id, status, when, data, config and results."""
    rows = []
    for r in runs:
        cfg = r.get("config") or {}
        s = r.get("summary") or {}
        w = r.get("weights") or s.get("weights") or {}
        linear = cfg.get("strategy") == "linear"
        rows.append({
            "run": r["id"],
            "status": r["status"],
            "data": Path(str(r.get("data", ""))).name,
            "backbone": cfg.get("backbone"),
            "strategy": cfg.get("strategy"),
            "val_accuracy": s.get("val_accuracy"),
            "test_accuracy": s.get("test_accuracy"),
            "seconds": s.get("seconds"),
            "epochs": cfg.get("epochs"),
            "best_epoch": s.get("best_epoch"),
            # the linear probe's solver has no learning rate, batches or augmentation: leave them blank
            "lr": None if linear else cfg.get("lr"),
            "batch_size": None if linear else cfg.get("batch_size"),
            "augment": None if linear else cfg.get("augment"),
            "seed": cfg.get("seed"),
            "weights": w.get("source"),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
            "error": r.get("error"),
        })
    return rows


def normalise_rows(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each row divided by its sum (rows of zeros stay zero): a confusion matrix as recall per class."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(sums > 0, m / np.where(sums == 0, 1, sums), 0.0)
    return out.tolist()


_STAGES = {
    "queued": "Waiting in the queue",
    "check": "Checking the images",
    "decode": "Decoding the images",
    "extract": "Computing features with the frozen backbone",
    "probe": "Fitting the linear probe (head initialisation)",
    "train": "Training",
    "epoch": "Training",
    "refit": "Refitting the head on training + validation images",
    "evaluate": "Evaluating the best checkpoint",
    "done": "Done",
}


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def describe_progress(status: str, progress: dict[str, Any] | None,
                      epochs: Sequence[dict[str, Any]] = ()) -> tuple[float, str]:
    """A progress fraction (0-1) and one line of text (stage, counts, time left) for a run.

    The time left is the engine's ``eta_s`` when the stage gives one, otherwise estimated from the mean
    epoch time (linear probe epochs can stop early, so it is an upper bound).
    """
    p = progress or {}
    stage = p.get("stage", "queued" if status == "queued" else "")
    if status == "done":
        return 1.0, "Done"
    if status in ("failed", "cancelled", "interrupted"):
        return 0.0, status.capitalize()
    text = _STAGES.get(stage, stage.capitalize() or "Starting")
    frac = 0.0
    eta = p.get("eta_s")
    if stage in ("epoch", "train", "probe") and p.get("epochs"):
        ep, total_ep = int(p.get("epoch") or 0), int(p["epochs"])
        if stage == "train" and p.get("total"):
            frac = float(p.get("done", 0)) / float(p["total"])
        else:
            frac = ep / max(1, total_ep)
        text += f": epoch {ep}/{total_ep}"
        if eta is None and epochs:
            secs = [float(e.get("seconds") or 0) for e in epochs if not e.get("probe")]  # epoch 0: the probe
            if secs:
                eta = sum(secs) / len(secs) * (total_ep - ep)
    elif p.get("total"):
        frac = float(p.get("done", 0)) / float(p["total"])
        text += f": {p.get('done', 0)}/{p['total']} images"
    elif stage == "evaluate":
        frac = 1.0
    if eta is not None and status == "running":
        text += f" · about {_duration(float(eta))} left"
    return min(1.0, max(0.0, frac)), text


def refitted(ws: Workspace, run_id: str) -> bool:
    """Whether the run's saved head was refitted on training + validation images (reads ``meta.json`` only)."""
    from .export import refitted as meta_refitted

    try:
        return meta_refitted(json.loads((ws.run_dir(run_id) / "meta.json").read_text()))
    except (OSError, ValueError):
        return False


def run_metrics(ws: Workspace, run_id: str) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run.

    Raises:
        RunError: the run has no metrics (not finished, or its folder was removed).
    """
    from .errors import RunError

    f = ws.run_dir(run_id) / "metrics.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise RunError(f"Run {run_id} has no results yet (not finished, or its files were deleted).") from None
    except (OSError, ValueError) as e:
        raise RunError(f"The results of run {run_id} cannot be read ({e}); train it again.") from None


# --------------------------------------------------------------------------------------------------
# background tasks: engine computations that outlive a page run (the transfer-vs-scratch lab)
# --------------------------------------------------------------------------------------------------
class BackgroundTask:
    """One engine call run on a thread of the server process, with progress, result and cooperative cancel.

    For computations of a minute or two that write nothing to the run store (the lab): the page starts it
    and polls it, so the user may switch pages, refresh, or open another tab and find it again by its key.
    The function must accept ``progress`` (called with a dict) and ``should_cancel`` keyword arguments.
    Trainings do not use this: they run in worker processes (:mod:`tl_core.jobs`).
    """

    def __init__(self, key: str, fn: Any, kwargs: dict[str, Any]):
        self.key = key
        self.status = "running"  # running | done | failed | cancelled
        self.progress: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.result: Any = None
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, kwargs), name=f"tl-task-{key[:40]}",
                                        daemon=True)

    def _on_progress(self, event: dict[str, Any]) -> None:
        self.progress = dict(event)
        if len(self.events) < 10_000:  # every event, for pages that count finished steps
            self.events.append(dict(event))

    def _run(self, fn: Any, kwargs: dict[str, Any]) -> None:
        from .errors import CancelledError, TLError

        try:
            self.result = fn(progress=self._on_progress, should_cancel=self._cancel.is_set, **kwargs)
            self.status = "done"
        except CancelledError:
            self.status = "cancelled"
        except TLError as e:
            self.status, self.error = "failed", str(e)
        except Exception as e:  # a bug: keep the server alive, say it in one line, log the details
            log.exception("background task %s failed", self.key)
            self.status, self.error = "failed", f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            self.finished = time.time()

    def cancel(self) -> None:
        """Ask the task to stop at its next check point."""
        self._cancel.set()

    @property
    def active(self) -> bool:
        return self.status == "running"

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started


_TASKS: "dict[str, BackgroundTask]" = {}
_TASKS_LOCK = threading.Lock()
#: Finished tasks kept for their result (oldest dropped first).
MAX_FINISHED_TASKS = 8


def start_task(key: str, fn: Any, **kwargs: Any) -> BackgroundTask:
    """Start ``fn(**kwargs, progress=..., should_cancel=...)`` on a thread under ``key``, unless a task with that
    key is running or finished successfully (then that one is returned: same key, same result).

    Args:
        key: everything the result depends on, as a string.
        fn: the engine function.
        kwargs: its arguments.
    Returns:
        The task.
    """
    with _TASKS_LOCK:
        old = _TASKS.get(key)
        if old is not None and old.status in ("running", "done"):
            return old
        task = BackgroundTask(key, fn, kwargs)
        _TASKS[key] = task
        finished = [k for k, t in _TASKS.items() if not t.active]
        for k in finished[:max(0, len(finished) - MAX_FINISHED_TASKS)]:
            _TASKS.pop(k, None)
    task._thread.start()
    return task


def get_task(key: str) -> BackgroundTask | None:
    """The task started under ``key`` (running or finished), or None."""
    with _TASKS_LOCK:
        return _TASKS.get(key)

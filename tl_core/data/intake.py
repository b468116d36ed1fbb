"""Dataset intake: a folder with one sub-folder per class, a ``.zip`` of one (unpacked safely), or a CSV of
``path,label`` rows, opened into a validated :class:`Dataset`.

Every image is checked once (decoded by the loading rules of :mod:`tl_core.data.images`): unreadable files
are skipped and listed with a reason, never fatal; a class with too few usable images is an error that
gives the count. With a check cache (the workspace's ``cache/checked.sqlite``) a dataset opened again
decodes nothing and hashes no unchanged file.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterable

from ..cache import ImageCheckCache
from ..errors import CancelledError, DatasetError
from .images import ARCHIVE_EXTENSIONS, IMAGE_EXTENSIONS, file_sha256, load_image

__all__ = [
    "MIN_IMAGES_PER_CLASS",
    "LABEL_SEPARATOR",
    "ZipLimits",
    "ImageItem",
    "SkippedFile",
    "Dataset",
    "open_dataset",
    "find_multi_label_csv",
    "safe_extract_zip",
    "pack_uploaded_folder",
]

log = logging.getLogger(__name__)

#: A class needs at least this many usable images (one to train on, one to validate with).
MIN_IMAGES_PER_CLASS = 2

#: Joins the labels of one image in a multi-label CSV cell (``dog;ball``).
LABEL_SEPARATOR = ";"


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}



# --------------------------------------------------------------------------------------------------
# dataset model
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageItem:
    """One usable image: its file, class label, split given by the folder layout, and content hash.

    In a multi-label dataset ``labels`` holds the image's label set (sorted) and ``label`` the same set
    joined by ``;`` (so that fingerprints and listings keep working); single-label images leave it empty.
    """

    path: Path
    label: str
    split: str | None = None
    sha256: str = ""
    width: int = 0
    height: int = 0
    labels: tuple[str, ...] = ()

    @property
    def label_set(self) -> tuple[str, ...]:
        """The image's labels: its label set (multi-label), else its one class label."""
        return self.labels or (self.label,)


@dataclass
class SkippedFile:
    """A file that is not part of the dataset, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """A validated dataset: usable images, class names (sorted), and what was skipped."""

    root: Path
    source: str
    classes: list[str]
    items: list[ImageItem]
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: int = 0  # dot-files, __MACOSX, thumbs.db and the like: counted, not listed
    version: str = ""  # NAME@VERSION of a managed dataset's version (tl_core.data.versions); "" for a plain path
    multi_label: bool = False  # a CSV whose label cells hold label sets (``dog;ball``)
    notes: list[str] = field(default_factory=list)  # how the data was read (shown with the report's warnings)

    @property
    def fingerprint(self) -> str:
        """A hash of (content, label) of every image: same data, same fingerprint."""
        h = hashlib.sha256()
        for item in sorted(self.items, key=lambda i: (i.label, i.sha256, str(i.split))):
            h.update(f"{item.label}\0{item.sha256}\0{item.split}\n".encode())
        return h.hexdigest()[:16]

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Images per class (multi-label: images carrying each label)."""
        c = Counter(lab for i in self.items if split is None or i.split == split for lab in i.label_set)
        return {k: c.get(k, 0) for k in self.classes}


def _is_junk(name: str) -> bool:
    low = name.lower()
    return low.startswith(".") or low in {"__macosx", "thumbs.db", "desktop.ini"} or low.startswith("._")



# --------------------------------------------------------------------------------------------------
# zip intake
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZipLimits:
    """Caps that make a zip bomb fail fast instead of filling the disk."""

    max_entries: int = 50_000
    max_total_bytes: int = 4 * 1024**3
    max_entry_bytes: int = 512 * 1024**2
    max_ratio: float = 200.0


def _zip_entry_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike,
                     limits: ZipLimits = ZipLimits(), progress: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> tuple[Path, list[SkippedFile], int]:
    """Extract a dataset zip into ``dest`` refusing anything that could escape or explode.

    Path traversal (``..``, absolute names, drive letters) and symlinks refuse the whole archive, as do
    encryption and the size/count/ratio caps; the byte count is enforced while writing, so a lying header
    cannot get past it. Non-images and nested archives are skipped and listed.

    Args:
        zip_path: the archive.
        dest: the folder to unpack into (created).
        limits: the caps.
        progress: called with (bytes written, bytes to write) while unpacking.
        should_cancel: polled between entries; returning True raises :class:`CancelledError` (what was
            written stays in ``dest``: the caller unpacks into a folder it removes).
    Returns:
        (root folder of the extracted dataset, skipped files, ignored junk count)
    Raises:
        DatasetError: the archive is corrupt, encrypted, unsafe or too large.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    name = zip_path.name
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DatasetError(f"{name} is not a readable zip archive ({e}); re-create it with your system's 'compress' tool.") from None
    skipped: list[SkippedFile] = []
    ignored = 0
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise DatasetError(f"{name} has {len(infos)} entries, above the limit of {limits.max_entries}; split the dataset.")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_total_bytes:
            raise DatasetError(f"{name} would unpack to {_size_text(declared)}, above the {_size_text(limits.max_total_bytes)} limit; "
                               "split the dataset or downscale the images.")
        packed = sum(i.compress_size for i in infos)
        if declared > 10_000_000 and declared > limits.max_ratio * max(packed, 1):
            # many small entries that each stay under the per-entry ratio check add up to a bomb too
            raise DatasetError(f"{name} expands {declared / max(packed, 1):.0f}x overall ({_size_text(packed)} to "
                               f"{_size_text(declared)}), which looks like a zip bomb; refused.")
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in infos:
            raw = info.filename.replace("\\", "/")
            p = PurePosixPath(raw)
            if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or ".." in p.parts:
                raise DatasetError(f"{name} contains the unsafe path {info.filename!r} (it points outside the archive); refused.")
            if _zip_entry_is_symlink(info):
                raise DatasetError(f"{name} contains a symbolic link ({info.filename!r}); refused. Zip the real files instead.")
            if info.flag_bits & 0x1:
                raise DatasetError(f"{name} is encrypted (password-protected); upload an unencrypted zip.")
            if info.is_dir():
                continue
            if any(_is_junk(part) for part in p.parts):
                ignored += 1
                continue
            ext = p.suffix.lower()
            if ext in ARCHIVE_EXTENSIONS:
                skipped.append(SkippedFile(raw, "nested archive: not unpacked; unzip it and add its images directly"))
                continue
            if ext not in IMAGE_EXTENSIONS and p.name.lower() != "labels.csv":  # a multi-label zip's labels
                skipped.append(SkippedFile(raw, f"not an image file ({ext or 'no extension'})"))
                continue
            if info.file_size > limits.max_entry_bytes:
                raise DatasetError(f"{name}: {raw} unpacks to {info.file_size / 1e6:.0f} MB, above the per-file limit of {limits.max_entry_bytes / 1e6:.0f} MB.")
            if info.compress_size > 0 and info.file_size / info.compress_size > limits.max_ratio and info.file_size > 1_000_000:
                raise DatasetError(f"{name}: {raw} expands {info.file_size / info.compress_size:.0f}x, which looks like a zip bomb; refused.")
            plan.append((info, p))
        dest.mkdir(parents=True, exist_ok=True)
        dest_resolved = dest.resolve()
        written = 0
        to_write = sum(info.file_size for info, _ in plan)
        for info, p in plan:
            if should_cancel and should_cancel():
                raise CancelledError(f"Cancelled while unpacking {name}.")
            if progress:
                progress(written, to_write)
            target = (dest / Path(*p.parts)).resolve()
            if dest_resolved not in target.parents:
                raise DatasetError(f"{name} contains the unsafe path {info.filename!r}; refused.")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    entry = 0
                    while block := src.read(1 << 20):
                        entry += len(block)
                        written += len(block)
                        if entry > limits.max_entry_bytes or written > limits.max_total_bytes:
                            raise DatasetError(f"{name} unpacks to more than its header says (a zip bomb?); refused.")
                        out.write(block)
            except DatasetError:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                try:
                    if target.is_file():
                        target.unlink()
                except OSError:  # the name itself is what failed (too long, clashes with a folder)
                    pass
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DatasetError(f"Not enough disk space to unpack {name} ({e.strerror}); free some space and try again.") from None
                if isinstance(e, zipfile.BadZipFile) and _longer_than_declared(zf, info):
                    raise DatasetError(f"{name}: {info.filename} holds more data than its header declares "
                                       f"({_size_text(info.file_size)}), which is how zip bombs hide; refused.") from None
                why = f"could not be unpacked ({e.strerror})" if isinstance(e, OSError) and e.strerror else f"damaged inside the zip ({e})"
                skipped.append(SkippedFile(str(p), why))
        if progress:
            progress(to_write, to_write)
    return dest, skipped, ignored


def pack_uploaded_folder(files: Iterable[tuple[str, bytes]], out: str | os.PathLike | IO[bytes]) -> str:
    """Pack a folder uploaded from the browser (``[(path inside the folder, bytes)]``, each path starting with the
    folder's own name, e.g. ``pets/cats/1.jpg``) into the zip ``out``, stored (no compression: copying the bytes
    is all it costs), so that it goes through the same intake as an uploaded zip. Nothing is decoded here.

    Args:
        files: (path, bytes) of every uploaded file.
        out: the zip file to write (a path or a binary file object).
    Returns:
        The name the dataset takes: the folder's own name, or ``"folder"`` when the files share none.
    Raises:
        DatasetError: no files, or a path that leaves the folder.
    """
    files = [(str(name).replace("\\", "/"), data) for name, data in files]
    if not files:
        raise DatasetError("The folder is empty; choose a folder with one sub-folder of images per class.")
    tops = {name.split("/", 1)[0] if "/" in name else "" for name, _ in files}
    folder = tops.pop() if len(tops) == 1 and "" not in tops else ""
    if folder:  # the dataset is named after the folder, and holds what the folder held
        files = [(name.split("/", 1)[1], data) for name, data in files]
    for name, _ in files:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or not parts[-1]:
            raise DatasetError(f"{name}: not a file inside the folder; choose the folder again.")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return folder or "folder"


def _size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _longer_than_declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether an entry that failed its CRC check holds more data than its header declares (a lying header).

    zipfile stops at the declared size, so nothing larger was written; this reads one byte past it, with a
    copy of the entry header that carries no CRC (so the read itself does not fail).
    """
    probe = zipfile.ZipInfo(info.filename, info.date_time)
    for attr in ("compress_type", "compress_size", "flag_bits", "header_offset", "extra", "create_system"):
        setattr(probe, attr, getattr(info, attr))
    probe.file_size = info.file_size + 1
    try:
        with zf.open(probe) as src:
            n = 0
            while block := src.read(1 << 20):  # in blocks: the declared size may be hundreds of MB
                n += len(block)
                if n > info.file_size:
                    return True
            return False
    except Exception:  # damaged in some other way: not a bomb
        return False



# --------------------------------------------------------------------------------------------------
# folder / CSV scanning
# --------------------------------------------------------------------------------------------------
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_junk(p.name))


def _find_dataset_root(root: Path) -> Path:
    """Descend through single wrapper folders (``archive.zip`` → ``archive/`` → classes)."""
    for _ in range(3):
        dirs = _visible_dirs(root)
        files = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if len(dirs) == 1 and not files and _visible_dirs(dirs[0]):
            root = dirs[0]
        else:
            break
    return root


def _collect_class_folder(cls_dir: Path, label: str, split: str | None, root: Path,
                          candidates: list[tuple[Path, str, str | None]], skipped: list[SkippedFile]) -> int:
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = str(p.relative_to(root))
            if _is_junk(fn):
                ignored += 1
            elif p.is_symlink():
                skipped.append(SkippedFile(rel, "symbolic link: not followed"))
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                candidates.append((p, label, split))
            elif p.suffix.lower() in ARCHIVE_EXTENSIONS:
                skipped.append(SkippedFile(rel, "nested archive: not unpacked; unzip it and add its images directly"))
            else:
                skipped.append(SkippedFile(rel, f"not an image file ({p.suffix.lower() or 'no extension'})"))
    return ignored


def split_layout(root: Path) -> dict[Path, str] | None:
    """The split folders of a ``train/`` (``val/``) (``test/``) layout of class folders (folder → split), or None
    when ``root`` holds class folders directly."""
    if not root.is_dir():
        return None
    dirs = _visible_dirs(root)
    split_dirs = {d: SPLIT_NAMES[d.name.lower()] for d in dirs if d.name.lower() in SPLIT_NAMES}
    if split_dirs and "train" in split_dirs.values() and len(split_dirs) == len(dirs):
        return split_dirs
    return None


def _scan_folder(root: Path) -> tuple[list[tuple[Path, str, str | None]], list[SkippedFile], int]:
    candidates: list[tuple[Path, str, str | None]] = []
    skipped: list[SkippedFile] = []
    ignored = 0
    dirs = _visible_dirs(root)
    split_dirs = split_layout(root)
    if split_dirs:
        # train/ (val/) (test/) layout, each holding class folders
        for d, split in split_dirs.items():
            for cls_dir in _visible_dirs(d):
                ignored += _collect_class_folder(cls_dir, cls_dir.name, split, root, candidates, skipped)
            for f in d.iterdir():
                if f.is_file() and not _is_junk(f.name):
                    skipped.append(SkippedFile(str(f.relative_to(root)), "not inside a class folder"))
    else:
        for cls_dir in dirs:
            ignored += _collect_class_folder(cls_dir, cls_dir.name, None, root, candidates, skipped)
    for f in sorted(root.iterdir()):
        if f.is_file():
            if _is_junk(f.name):
                ignored += 1
            elif f.suffix.lower() not in {".md", ".txt"} and f.name.upper() not in {"LICENSE", "LICENCE"}:
                skipped.append(SkippedFile(f.name, "not inside a class folder"))
    return candidates, skipped, ignored


_PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "img", "image_path")


_LABEL_COLUMNS = ("label", "labels", "class", "category", "tags", "target", "y")


def _label_set(cell: str) -> tuple[str, ...]:
    """The sorted, distinct, non-empty labels of a multi-label cell (``dog; ball;`` → ``('ball', 'dog')``)."""
    return tuple(sorted({p.strip() for p in cell.split(LABEL_SEPARATOR) if p.strip()}))


def _read_csv(csv_path: Path) -> tuple[list[tuple[Path, str, str | None]], list[SkippedFile], bool]:
    """The rows of a labels CSV: (image path, label, None) candidates, skipped rows, and whether it is multi-label.

    A CSV is multi-label when any label cell holds ``;``; then every cell is read as a label set (a cell with
    one label is a set of one) and each candidate's label is its set joined by ``;``, sorted.
    """
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{csv_path.name} is not UTF-8 text; save the CSV as UTF-8.") from None
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{csv_path.name} is empty; it needs one 'path,label' row per image.")
    header = [c.strip().lower() for c in rows[0]]
    pcol = next((header.index(c) for c in _PATH_COLUMNS if c in header), None)
    lcol = next((header.index(c) for c in _LABEL_COLUMNS if c in header), None)
    if pcol is not None and lcol is not None:
        body = rows[1:]
    elif pcol is None and lcol is None and len(header) == 2 and Path(rows[0][0]).suffix.lower() in IMAGE_EXTENSIONS:
        pcol, lcol, body = 0, 1, rows  # headerless path,label
    else:
        raise DatasetError(
            f"{csv_path.name} has columns {rows[0]}; it needs a 'path' column and a 'label' column "
            "(header row 'path,label', or 'path,labels' with labels joined by ';' for several per image)."
        )
    multi = any(len(r) > lcol and LABEL_SEPARATOR in r[lcol] for r in body)
    candidates: list[tuple[Path, str, str | None]] = []
    skipped: list[SkippedFile] = []
    for n, row in enumerate(body, start=2 if body is not rows else 1):
        if len(row) <= max(pcol, lcol):
            skipped.append(SkippedFile(f"{csv_path.name} line {n}", "row has too few columns"))
            continue
        rel, label = row[pcol].strip(), row[lcol].strip()
        if multi:
            label = LABEL_SEPARATOR.join(_label_set(label))
            if rel and not label:
                skipped.append(SkippedFile(f"{csv_path.name} line {n}",
                                           f"{rel} has an empty label set; give it at least one label"))
                continue
        if not rel or not label:
            skipped.append(SkippedFile(f"{csv_path.name} line {n}", "empty path or label"))
            continue
        p = Path(rel) if Path(rel).is_absolute() else base / rel
        if not p.is_file():
            skipped.append(SkippedFile(rel, "listed in the CSV but the file was not found"))
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"not an image file ({p.suffix.lower() or 'no extension'})"))
            continue
        candidates.append((p, label, None))
    return candidates, skipped, multi


def find_multi_label_csv(root: Path) -> Path | None:
    """The multi-label ``labels.csv`` at the top of a folder (an unpacked multi-label zip, the sample), or None.

    A folder of class folders has no multi-label form, so only a CSV whose label cells hold ``;`` is taken;
    a single-label ``labels.csv`` beside class folders is left alone (as before).
    """
    f = root / "labels.csv"
    if not f.is_file():
        return None
    try:
        return f if _read_csv(f)[2] else None
    except DatasetError:  # not a labels CSV: the folder is read as class folders, as before
        return None



# --------------------------------------------------------------------------------------------------
# opening a dataset
# --------------------------------------------------------------------------------------------------
def _extract_zip_once(src: Path, dest: Path, digest: str) -> None:
    """Unpack ``src`` into a private folder next to ``dest``, then rename it into place.

    A refused or damaged zip leaves nothing behind, a reader never sees half a dataset, and two processes
    unpacking the same zip at once (two queued runs) do not trample each other: the first rename wins.
    """
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        _, sk, ig = safe_extract_zip(src, tmp)
        (tmp / ".zip-report.json").write_text(json.dumps({"skipped": [s.__dict__ for s in sk], "ignored": ig}))
        (tmp / ".complete").write_text(digest)
        if dest.exists() and not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)  # left half-written by an older version or a crash
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():
                raise
            # another process finished the same extraction first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checked_image(path: Path, sha: str, checks: ImageCheckCache | None) -> tuple[int, int, str | None]:
    """(width, height, why it cannot be used or None) of the image ``path`` whose bytes hash to ``sha``: from the
    image-check cache ``checks`` when it has seen those bytes, else decoded once (and remembered there)."""
    known = checks.get(sha) if checks is not None else None
    if known is None:
        try:
            img = load_image(path)
            known = (img.width, img.height, None)
        except DatasetError as e:
            known = (0, 0, str(e).split(": ", 1)[-1])
        if checks is not None:
            checks.put(sha, *known)
    return known


def open_dataset(data: str | os.PathLike, extract_dir: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 min_per_class: int = MIN_IMAGES_PER_CLASS,
                 check_cache: str | os.PathLike | None = None) -> Dataset:
    """Open and validate a dataset: a class-per-folder directory, a ``.zip`` of one, or a CSV.

    Every image is decoded once to check it; files that fail are skipped with a reason.

    Args:
        data: folder, zip or CSV path.
        extract_dir: where a zip is unpacked (default: a folder next to it named after its hash).
        progress: called with (done, total) while images are checked.
        should_cancel: polled while checking; returning True raises :class:`CancelledError`.
        min_per_class: the fewest usable images a class may have.
        check_cache: a SQLite file remembering each file's content hash and each image's check result, so
            that re-opening the same data reads no unchanged file (the workspace passes ``cache/checked.sqlite``).
    Returns:
        The validated :class:`Dataset`.
    Raises:
        DatasetError: the path is missing or the dataset cannot be used (with what to do).
    """
    src = Path(data)
    if not src.exists():
        raise DatasetError(f"{src} does not exist; give a folder with one sub-folder per class, a .zip of one, or a CSV of path,label.")
    skipped: list[SkippedFile] = []
    ignored = 0
    multi = False
    if src.is_dir() and (ml_csv := find_multi_label_csv(_find_dataset_root(src))) is not None:
        root = ml_csv.parent
        candidates, sk, multi = _read_csv(ml_csv)
        skipped += sk
        kind = "csv"
    elif src.is_dir():
        root = _find_dataset_root(src)
        candidates, sk, ig = _scan_folder(root)
        skipped += sk
        ignored += ig
        kind = "folder"
    elif src.suffix.lower() == ".zip" or zipfile.is_zipfile(src):
        digest = file_sha256(src)[:16]
        dest = Path(extract_dir) if extract_dir else src.parent / f".{src.stem}-{digest}"
        if (dest / ".complete").exists() and (dest / ".complete").read_text() != digest:
            # another zip of the same name was unpacked here (and a run may still read it): never reuse it
            dest = dest.with_name(f"{dest.name}-{digest}")
        if not (dest / ".complete").exists():
            _extract_zip_once(src, dest, digest)
        rep = json.loads((dest / ".zip-report.json").read_text())
        skipped += [SkippedFile(**s) for s in rep["skipped"]]
        ignored += rep["ignored"]
        root = _find_dataset_root(dest)
        if (ml_csv := find_multi_label_csv(root)) is not None:  # a zip of images with a multi-label labels.csv
            candidates, sk, multi = _read_csv(ml_csv)
            skipped += sk
            kind = "csv"
        else:
            candidates, sk, ig = _scan_folder(root)
            skipped += sk
            ignored += ig
            kind = "zip"
    elif src.suffix.lower() in {".csv", ".tsv", ".txt"}:
        root = src.parent
        candidates, sk, multi = _read_csv(src)
        skipped += sk
        kind = "csv"
    else:
        raise DatasetError(f"{src.name} is neither a folder, a .zip nor a .csv; give one of those.")

    items: list[ImageItem] = []
    total = len(candidates)
    checks = ImageCheckCache(check_cache) if check_cache else None
    for n, (p, label, split) in enumerate(candidates):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled while checking the images.")
        try:
            rel = str(p.relative_to(root))
        except ValueError:
            rel = str(p)
        try:
            sha = checks.sha256(p) if checks is not None else file_sha256(p)
        except OSError as e:
            skipped.append(SkippedFile(rel, f"could not be read ({e.strerror or e})"))
            continue
        known = checked_image(p, sha, checks)
        if known[2] is None:
            items.append(ImageItem(p, label, split, sha, known[0], known[1],
                                   tuple(label.split(LABEL_SEPARATOR)) if multi else ()))
        else:
            skipped.append(SkippedFile(rel, known[2]))
        if progress:
            progress(n + 1, total)

    if multi:
        return _multi_label_dataset(src, root, candidates, items, skipped, ignored, min_per_class)
    labels = sorted({label for _, label, _ in candidates} | {i.label for i in items})
    if kind != "csv":
        # class folders that hold nothing usable still count: they are an error with the count
        if any(i.split for i in items) or any(s for _, _, s in candidates):
            pass
        else:
            labels = sorted(set(labels) | {d.name for d in _visible_dirs(root)})
    if not labels:
        raise DatasetError(
            f"No classes found in {src.name}: put images in one sub-folder per class "
            f"(e.g. {src.name}/cats/1.jpg, {src.name}/dogs/1.jpg)."
        )
    if len(labels) < 2:
        raise DatasetError(f"Only one class ({labels[0]!r}) found in {src.name}; a classifier needs at least two classes.")
    trainable = [i for i in items if i.split != "test"]
    counts = Counter(i.label for i in trainable)
    too_few = [(c, counts.get(c, 0)) for c in labels if counts.get(c, 0) < min_per_class]
    if too_few:
        listing = ", ".join(f"{c!r} has {n}" for c, n in too_few[:5]) + (" …" if len(too_few) > 5 else "")
        raise DatasetError(
            f"Too few usable images: {listing}; every class needs at least {min_per_class} "
            "(10 or more recommended). Add images or remove those classes."
        )
    return Dataset(root=root, source=str(src), classes=labels, items=items, skipped=skipped, ignored=ignored)



def _multi_label_dataset(src: Path, root: Path, candidates: list[tuple[Path, str, str | None]],
                         items: list[ImageItem], skipped: list[SkippedFile], ignored: int,
                         min_per_class: int) -> Dataset:
    """Validate a multi-label dataset: at least two labels, each on ``min_per_class`` usable images or more (a
    label on one image only is named with that image)."""
    notes = []
    singles = sum(1 for _, lab, _ in candidates if LABEL_SEPARATOR not in lab)
    if singles:
        notes.append(f"{src.name} is read as multi-label because some label cells hold ';'; the {singles} row(s) "
                     "with one label are images with a single label.")
    labels = sorted({lab for _, cell, _ in candidates for lab in cell.split(LABEL_SEPARATOR)})
    if len(labels) < 2:
        raise DatasetError(f"Only one label ({labels[0]!r}) found in {src.name}; a classifier needs at least two."
                           if labels else f"No labelled images found in {src.name}; give one 'path,labels' row per image.")
    per_label: dict[str, list[ImageItem]] = {lab: [] for lab in labels}
    for item in items:
        for lab in item.labels:
            per_label[lab].append(item)
    too_few = [(lab, per_label[lab]) for lab in labels if len(per_label[lab]) < min_per_class]
    if too_few:
        lab, its = too_few[0]
        where = f" (only on {its[0].path.name})" if len(its) == 1 else ""
        more = f"; also {', '.join(repr(x) for x, _ in too_few[1:4])}" if len(too_few) > 1 else ""
        raise DatasetError(f"The label {lab!r} is on {len(its)} usable image(s){where}{more}; every label needs at "
                           f"least {min_per_class} (10 or more recommended). Label more images with it or remove it.")
    return Dataset(root=root, source=str(src), classes=labels, items=items, skipped=skipped, ignored=ignored,
                   multi_label=True, notes=notes)

"""The dataset report: classes, counts, skipped files with reasons, image sizes, imbalance and warnings,
and the overview the Data page shows (the report plus thumbnails and per-class split counts)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .intake import Dataset
from .library import UPLOAD_REPORT, open_data
from .splits import Split, split_dataset

if TYPE_CHECKING:
    from ..storage.workspace import Workspace

__all__ = ["dataset_report", "dataset_overview", "class_thumbnails", "UPLOAD_REPORT"]



def dataset_report(ds: Dataset, split: Split | None = None) -> dict:
    """A JSON-able summary: classes, counts, skipped files with reasons, image sizes, imbalance, warnings."""
    counts = ds.counts()
    widths = [i.width for i in ds.items] or [0]
    heights = [i.height for i in ds.items] or [0]
    nonzero = [n for n in counts.values() if n > 0]
    imbalance = (max(nonzero) / min(nonzero)) if nonzero else 0.0
    warnings: list[str] = list(ds.notes)
    if imbalance >= 3:
        big = max(counts, key=counts.get)
        small = min(counts, key=counts.get)
        warnings.append(
            f"Classes are imbalanced ({imbalance:.1f}x: {big!r} has {counts[big]}, {small!r} has {counts[small]}); "
            "consider class balancing or adding images."
        )
    few = [c for c, n in counts.items() if n < 10]
    if few:
        warnings.append(f"{len(few)} class(es) have fewer than 10 images ({', '.join(few[:5])}); expect noisy results.")
    if min(widths) < 32 or min(heights) < 32:
        warnings.append(f"Some images are tiny (smallest {min(widths)}x{min(heights)} px); they are upscaled for the backbone.")
    if ds.skipped:
        warnings.append(f"{len(ds.skipped)} file(s) were skipped; see the list for reasons.")
    hashes = Counter(i.sha256 for i in ds.items)
    dups = sum(n - 1 for n in hashes.values() if n > 1)
    if dups:
        warnings.append(f"{dups} image(s) are exact duplicates of another image in the dataset.")
    rep = {
        "source": ds.source,
        "root": str(ds.root),
        "fingerprint": ds.fingerprint,
        "classes": ds.classes,
        "num_classes": len(ds.classes),
        "num_images": len(ds.items),
        "counts": counts,
        "split_counts": {s: ds.counts(s) for s in ("train", "val", "test") if any(i.split == s for i in ds.items)},
        "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped],
        "ignored": ds.ignored,
        "image_size": {"min_width": min(widths), "max_width": max(widths),
                       "min_height": min(heights), "max_height": max(heights)},
        "imbalance_ratio": round(imbalance, 3),
        "exact_duplicates": dups,
        "warnings": warnings,
        "multi_label": ds.multi_label,
    }
    if split is not None:
        rep["split"] = {"train": len(split.train), "val": len(split.val), "test": len(split.test)}
    return rep



def class_thumbnails(ds: Dataset, per_class: int = 8) -> dict[str, list[str]]:
    """Up to ``per_class`` image paths per class (training images first, in file order)."""
    out: dict[str, list[str]] = {c: [] for c in ds.classes}
    for item in sorted(ds.items, key=lambda i: (i.split == "test", str(i.path))):
        for label in item.label_set:  # a multi-label image shows under each of its labels
            lst = out.setdefault(label, [])
            if len(lst) < per_class:
                lst.append(str(item.path))
    return out


def dataset_overview(path: str | os.PathLike, workspace: "Workspace", val_split: float = 0.2, seed: int = 0,
                     thumbnails_per_class: int = 8) -> dict[str, Any]:
    """Everything the Data page shows about a dataset folder, as JSON-able data.

    :func:`tl_core.data.dataset_report` of the folder and its split, plus ``thumbnails`` (paths per class),
    ``split_by_class`` (train/val/test counts per class), and the files an uploaded zip held that were
    not unpacked (listed in ``skipped`` with the others).

    Raises:
        DatasetError: the folder cannot be used as a dataset (with what to do).
    """
    ds = open_data(path, workspace)
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
        name: {c: sum(1 for i in items if c in i.label_set) for c in ds.classes}
        for name, items in (("train", split.train), ("val", split.val), ("test", split.test))
    }
    return rep


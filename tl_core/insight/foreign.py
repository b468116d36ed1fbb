"""Foreign images: how many images a person knows to be foreign (things the model should call unknown) the run's
open-set threshold catches, with a Wilson 95% interval and the reason (style, content or both) of each catch.

The Evaluate page asks for it after training (a ``foreign_check`` task; the images are uploaded one by one or as a
zip); the numbers are those of :func:`tl_core.share.predict.predict_paths` on the same files, so the page, the
command line and a script agree.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.library import save_upload
from ..errors import ConfigError, DatasetError
from ..metrics import wilson_interval
from ..models.openset import UNKNOWN_NOTE
from ..storage.workspace import Workspace

__all__ = ["foreign_check", "save_foreign_upload", "caught_at"]


def caught_at(scores: Sequence[float], threshold: float) -> dict[str, Any]:
    """How many of ``scores`` a ``threshold`` calls unknown: {"caught", "images", "share", "interval"}."""
    n = len(scores)
    k = int(sum(1 for s in scores if s > threshold))
    lo, hi = wilson_interval(k, n)
    return {"caught": k, "images": n, "share": k / n if n else 0.0, "interval": [lo, hi]}


def save_foreign_upload(ws: Workspace, name: str, data: bytes) -> Path:
    """Keep an uploaded foreign image, or a zip of them, for a task to read (content-addressed under
    ``<workspace>/uploads``: the same file uploaded twice is one file, and the task keyed by its path is keyed by
    its content).

    Raises:
        DatasetError: empty, or neither an image nor a zip.
    """
    if not name.lower().endswith(".zip") and data[:4] != b"PK\x03\x04":
        return save_upload(ws, name, data)
    if not data:
        raise DatasetError(f"{name} is empty; upload images or a .zip of images.")
    d = ws.home / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"{hashlib.sha256(data).hexdigest()}.zip"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def foreign_check(run: str | os.PathLike, paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                  workspace: Workspace | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score images that should all be unknown with a run's open-set threshold.

    Args:
        run: a run directory (or bundle).
        paths: image files, folders and zips (as :func:`tl_core.share.predict.predict_paths` takes them).
        names: the name to report for each of ``paths`` (an upload's file name instead of its stored path).
        workspace: for a linear run, the feature cache to use.
        progress: called with (done, total).
    Returns:
        {"images", "caught", "share", "interval" [low, high] (Wilson 95%), "threshold", "by_reason" {style,
        content, both: count of the caught images}, "scores" (every image's ood_score, in order), "rows"
        [{"path", "label", "confidence", "unknown", "ood_score", "ood_reason", "ood_distances"}], "skipped"
        [{"path", "reason"}]}.
    Raises:
        ConfigError: the run has no open-set files (trained before they existed).
        DatasetError: no readable image among ``paths``.
    """
    from ..share.loading import load_model
    from ..share.predict import predict_paths
    tm = load_model(run)
    if tm.open_set is None:
        raise ConfigError(UNKNOWN_NOTE)
    rows, skipped = predict_paths(tm, [str(p) for p in paths], top_k=1, progress=progress, workspace=workspace)
    rename = {str(p): n for p, n in zip(paths, names or [])}

    def shown(path: str) -> str:
        for stored, name in rename.items():  # an upload (or a file inside an uploaded zip) by the name it had
            if path == stored or path.startswith(stored + "/"):
                return name + path[len(stored):]
        return path

    if not rows:
        raise DatasetError("None of the foreign images could be read"
                           + (f" ({skipped[0]['path']}: {skipped[0]['reason']})" if skipped else "")
                           + "; upload .jpg, .png, .webp or .bmp images, or a .zip of them.")
    scores = [float(r["ood_score"]) for r in rows]
    threshold = float(tm.open_set.threshold)
    reasons = Counter(r.get("ood_reason") or "content" for r in rows if r.get("unknown"))
    out = caught_at(scores, threshold)
    out.update({
        "threshold": threshold,
        "by_reason": {k: int(reasons.get(k, 0)) for k in ("style", "content", "both")},
        "scores": scores,
        "rows": [{"path": shown(r["path"]), **{k: r.get(k) for k in ("label", "confidence", "unknown", "ood_score",
                                                                    "ood_reason", "ood_distances")}} for r in rows],
        "skipped": [{"path": shown(s["path"]), "reason": s["reason"]} for s in skipped],
    })
    return out

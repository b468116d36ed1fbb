"""Predicting with a trained model: image files, folders and zips (a CSV of the answers), Pillow images (the
app), and evaluating on labelled data. Probabilities are softmax(logits / T) with the run's temperature
(:func:`tl_core.metrics.softmax`), as everywhere else."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..cache import DecodedImageCache
from ..data.images import IMAGE_EXTENSIONS, file_sha256, load_image
from ..data.intake import ImageItem, safe_extract_zip
from ..data.library import open_data
from ..errors import DatasetError
from ..metrics import compute_metrics, softmax, top_losses
from ..models.inference import CachedFeatures, logits_of_images, logits_of_items, logits_via_cache
from ..models.openset import Scores, open_set_fields
from ..storage.workspace import Workspace
from .loading import TrainedModel
from .multilabel import evaluate_multilabel, rows_of_logits, write_multilabel_csv

__all__ = ["evaluate_dataset", "logits_of_dataset_items", "expand_paths", "predict_pil", "predict_paths", "write_predictions_csv", "predictions_csv",
           "prediction_row"]

#: images per feature extraction when a linear run predicts files (see ``_predict_files_cached``): 512 makes a
#: job of a thousand files two calls, not thirty-two, and reaches the ONNX engine's export threshold (500)
PREDICT_CHUNK = 512


def evaluate_dataset(tm: TrainedModel, data: str | os.PathLike, workspace: Workspace | None = None) -> dict[str, Any]:
    """Evaluate on a labelled dataset: its ``test`` split when it has one, otherwise every image.

    Returns:
        accuracy, classes, confusion (rows = true class), per_class, count, evaluated, top_losses.
    Raises:
        DatasetError: the data has classes the model does not know.
    """
    workspace = workspace or Workspace.default()
    ds = open_data(data, workspace, min_per_class=1)
    items = [i for i in ds.items if i.split == "test"]
    evaluated = "test split"
    if not items:
        items, evaluated = list(ds.items), "all images"
    if tm.meta.multi_label or ds.multi_label:
        return _evaluate_multilabel(tm, ds, items, evaluated, workspace)
    unknown = sorted({i.label for i in items} - set(tm.classes))
    if unknown:
        raise DatasetError(f"The data has classes the model was not trained on: {', '.join(unknown[:10])}; "
                           f"the model knows {', '.join(tm.classes)}.")
    cidx = {c: i for i, c in enumerate(tm.classes)}
    out = logits_of_dataset_items(tm, items, workspace, with_features=tm.open_set is not None)
    logits, scores = _with_scores(tm, out)
    probs = softmax(logits, tm.temperature)
    y = [cidx[i.label] for i in items]
    rep = compute_metrics(y, probs, tm.classes)
    rep["evaluated"] = evaluated
    # share of the evaluated images the open-set threshold calls unknown (None: a model without open-set files)
    rep["unknown_share"] = float(tm.open_set.unknown(scores).mean()) if scores is not None and len(scores) else None
    rep["skipped"] = [{"path": s.path, "reason": s.reason} for s in ds.skipped]
    rep["top_losses"] = top_losses([str(i.path) for i in items], y, probs, tm.classes, k=20)
    return rep


def logits_of_dataset_items(tm: TrainedModel, items: Sequence[ImageItem], workspace: Workspace,
                            with_features: bool = False, batch_size: int = 32) -> Any:
    """Raw logits (and, ``with_features``, pre-logit features, and the style statistics when the model's
    open-set score needs them: (logits, features, style or None)) of ``tm`` on dataset items.

    A ``linear`` run goes through the feature cache (:meth:`TrainedModel.cached_features`): images whose features
    are cached (seen in training or an earlier evaluation) run through no network, the others are extracted
    once and cached. Any other run runs its whole network on every image. Both give the same numbers (tested
    within 1e-5).
    """
    decoded = DecodedImageCache(workspace.cache_dir / "decoded")
    source = tm.cached_features(workspace)
    if source is not None:
        return logits_via_cache(tm.model, items, tm.pre, decoded, source, batch_size=batch_size, runtime=tm.runtime,
                                with_features=with_features, style=_spec(tm, with_features))
    return logits_of_items(tm.model, items, tm.pre, decoded, batch_size=batch_size, runtime=tm.runtime,
                           with_features=with_features, style=_spec(tm, with_features))


def _spec(tm: TrainedModel, with_features: bool) -> Any:
    """The style statistics to compute with the features: the open-set score's, or None (asked without features,
    or a content-only bank). With a spec, ``logits_of_*`` return (logits, features, style)."""
    return tm.style_spec if with_features else None


def _evaluate_multilabel(tm: TrainedModel, ds: Any, items: list, evaluated: str, workspace: Workspace
                         ) -> dict[str, Any]:
    if not tm.meta.multi_label:
        raise DatasetError("The data is multi-label but the model predicts one class per image; train a model on "
                           "multi-label data to evaluate it.")
    rep = evaluate_multilabel(tm, items, logits_of_dataset_items(tm, items, workspace))
    rep["evaluated"] = evaluated
    rep["skipped"] = [{"path": s.path, "reason": s.reason} for s in ds.skipped]
    return rep


def expand_paths(paths: Iterable[str | os.PathLike], tmp: Path) -> tuple[list[tuple[Path, str]], list[dict[str, str]]]:
    """Image files to predict as (file on disk, name to report); folders walked, zips unpacked safely."""
    files: list[tuple[Path, str]] = []
    skipped: list[dict[str, str]] = []
    for n, raw in enumerate(paths):
        p = Path(raw)
        if p.is_dir():
            files += [(f, str(f)) for f in sorted(p.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file() and p.suffix.lower() == ".zip":
            try:
                dest, sk, _ = safe_extract_zip(p, tmp / f"zip{n}")
            except DatasetError as e:
                skipped.append({"path": str(p), "reason": str(e)})
                continue
            skipped += [{"path": f"{p}/{s.path}", "reason": s.reason} for s in sk]
            files += [(f, f"{p}/{f.relative_to(dest).as_posix()}") for f in sorted(dest.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file():
            files.append((p, str(p)))
        else:
            skipped.append({"path": str(p), "reason": "not found"})
    return files, skipped


def _with_scores(tm: TrainedModel, out: Any) -> tuple[np.ndarray, Scores | None]:
    """(logits, open-set scores or None) of a ``logits_of_*`` result asked with ``with_features`` when the
    model has an open-set bank (and with its style spec, when it has one)."""
    if tm.open_set is None:
        return out, None
    if len(out) == 3:
        logits, feats, style = out
    else:
        (logits, feats), style = out, None
    return logits, tm.open_set.scores(feats, style)


def _rows(tm: TrainedModel, images: Sequence[Any], top_k: int) -> list[dict[str, Any]]:
    """Prediction rows of Pillow images, with ``unknown`` and ``ood_score`` from the same forward pass."""
    with_features = tm.open_set is not None
    out = logits_of_images(tm.model, images, tm.pre, runtime=tm.runtime, with_features=with_features,
                           style=_spec(tm, with_features))
    return _rows_of(tm, out, top_k)


def _rows_of(tm: TrainedModel, out: Any, top_k: int) -> list[dict[str, Any]]:
    """Prediction rows of a ``logits_of_*`` result (asked ``with_features`` when the model has an open-set bank)."""
    logits, scores = _with_scores(tm, out)
    if tm.meta.multi_label:
        rows = rows_of_logits(tm, logits, top_k)
    else:
        rows = [prediction_row(p, tm.classes, top_k) for p in softmax(logits, tm.temperature)]
    return [{**row, **open_set_fields(n, scores, tm.open_set)} for n, row in enumerate(rows)]


def predict_pil(tm: TrainedModel, images: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
    """Top-k predictions for RGB Pillow images: label, confidence, top_k [{label, confidence}] (multi-label:
    labels [{label, p}] and probs too), unknown (the image is unlike the training images; None for a model
    without open-set files), ood_score, ood_reason (style | content | both, or None when not unknown),
    ood_distances {content, style} (1.0 = each one's threshold) and nearest (up to 3 training images by content,
    [{path, label, distance}]; None when the model keeps no paths) (:func:`tl_core.models.openset.open_set_fields`)."""
    return _rows(tm, images, top_k)


def prediction_row(p: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    """label, confidence and top_k [{label, confidence}] of one image's probabilities."""
    order = np.argsort(-p, kind="stable")[:max(1, top_k)]
    return {"label": classes[int(order[0])], "confidence": float(p[order[0]]),
            "top_k": [{"label": classes[int(i)], "confidence": float(p[i])} for i in order]}


def predict_paths(tm: TrainedModel, paths: Iterable[str | os.PathLike], top_k: int = 3, batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None, workspace: Workspace | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Predict image files, folders (recursively) and zips of images. Unreadable files are skipped.

    Args:
        tm: the loaded model.
        paths: files, folders and ``.zip`` files, in any mix.
        top_k: how many classes each row lists.
        batch_size: images per forward pass.
        progress: called with (done, total) after each batch.
        workspace: for a ``linear`` run, the workspace whose feature cache serves (and keeps) the features of the
            images (:func:`logits_of_dataset_items`; the same numbers); None: the whole network runs on every image.
    Returns:
        (rows of {path, label, confidence, top_k, unknown, ood_score, ood_reason, ood_distances, nearest} (see
        :func:`predict_pil`), skipped [{path, reason}]); the open-set fields are None for a model trained before
        open-set scores; an image inside a zip is
        reported as ``archive.zip/inner/path.png``.
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tl-predict-") as tmp:
        files, skipped = expand_paths(paths, Path(tmp))
        source = tm.cached_features(workspace) if workspace is not None else None
        if source is not None:
            rows = _predict_files_cached(tm, files, skipped, top_k, batch_size, progress, workspace, source)
            return rows, skipped
        for start in range(0, len(files), batch_size):
            batch, names = [], []
            for f, name in files[start:start + batch_size]:
                try:
                    batch.append(load_image(f))
                    names.append(name)
                except DatasetError as e:
                    skipped.append({"path": name, "reason": str(e).split(": ", 1)[-1]})
            if batch:
                rows += [{"path": n, **r} for n, r in zip(names, _rows(tm, batch, top_k))]
            if progress:
                progress(min(start + batch_size, len(files)), len(files))
    return rows, skipped


def _predict_files_cached(tm: TrainedModel, files: list[tuple[Path, str]], skipped: list[dict[str, str]], top_k: int,
                          batch_size: int, progress: Callable[[int, int], None] | None, workspace: Workspace,
                          source: CachedFeatures) -> list[dict[str, Any]]:
    """:func:`predict_paths` of a linear run through the feature cache ``source``; unreadable files go to
    ``skipped``. The files go to the feature extraction :data:`PREDICT_CHUNK` at a time (in batches of
    ``batch_size``): its fixed costs (the engine's choice, hashing the backbone's weights) are paid once a chunk,
    and a large job is large enough for the ONNX engine (``tl_core.models.engines``)."""
    rows: list[dict[str, Any]] = []
    decoded = DecodedImageCache(workspace.cache_dir / "decoded")  # one for every chunk
    start = 0

    def step(done: int, total: int) -> None:
        if progress:
            progress(min(start + done, len(files)), len(files))

    def logits(batch: list[ImageItem]) -> Any:
        with_features = tm.open_set is not None
        return logits_via_cache(tm.model, batch, tm.pre, decoded, source, batch_size=batch_size, runtime=tm.runtime,
                                with_features=with_features, progress=step, style=_spec(tm, with_features))

    for start in range(0, len(files), PREDICT_CHUNK):
        items, names = [], []
        for f, name in files[start:start + PREDICT_CHUNK]:
            try:
                items.append(ImageItem(path=f, label="", sha256=file_sha256(f)))
                names.append(name)
            except OSError as e:
                skipped.append({"path": name, "reason": f"cannot be read ({e.strerror or e})"})
        try:
            out = logits(items) if items else None
        except DatasetError:  # an unreadable image in the batch: check each one, predict the readable ones
            keep = []
            for item, name in zip(items, names):
                try:
                    load_image(item.path)
                    keep.append((item, name))
                except DatasetError as e:
                    skipped.append({"path": name, "reason": str(e).split(": ", 1)[-1]})
            items, names = [k for k, _ in keep], [n for _, n in keep]
            out = logits(items) if items else None
        if out is not None:
            rows += [{"path": n, **r} for n, r in zip(names, _rows_of(tm, out, top_k))]
        step(PREDICT_CHUNK, PREDICT_CHUNK)
    return rows


def write_predictions_csv(rows: Sequence[dict[str, Any]], out: str | os.PathLike | io.StringIO) -> None:
    """CSV with path, label, confidence, top-k as 'label:conf;label:conf', unknown (true/false, empty for a model
    without open-set files), ood_score, ood_reason, ood_content and ood_style (the normalised distances) and
    nearest (the nearest training image's path).

    Multi-label rows (they carry ``probs``) make :func:`tl_core.share.multilabel.write_multilabel_csv`'s CSV:
    path, labels (``a;b``), one ``p_<label>`` column per label, unknown and ood_score.
    """
    if rows and "probs" in rows[0]:
        write_multilabel_csv(rows, list(rows[0]["probs"]), out)
        return
    own = not isinstance(out, io.StringIO)
    f = open(out, "w", newline="", encoding="utf-8") if own else out
    try:
        w = csv.writer(f)
        w.writerow(["path", "label", "confidence", "top_k", "unknown", "ood_score", "ood_reason", "ood_content",
                    "ood_style", "nearest"])
        for r in rows:
            unknown, score = r.get("unknown"), r.get("ood_score")
            dist, near = r.get("ood_distances") or {}, r.get("nearest") or []
            w.writerow([r["path"], r["label"], f"{r['confidence']:.6f}",
                        ";".join(f"{t['label']}:{t['confidence']:.6f}" for t in r["top_k"]),
                        "" if unknown is None else str(bool(unknown)).lower(),
                        "" if score is None else f"{score:.6f}", r.get("ood_reason") or "",
                        "" if dist.get("content") is None else f"{dist['content']:.6f}",
                        "" if dist.get("style") is None else f"{dist['style']:.6f}",
                        near[0]["path"] if near else ""])
    finally:
        if own:
            f.close()


def predictions_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The CSV of :func:`write_predictions_csv` as a string (for a download button)."""
    buf = io.StringIO()
    write_predictions_csv(rows, buf)
    return buf.getvalue()


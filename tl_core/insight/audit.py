"""Data audit before training: duplicates, train/validation leakage, imbalance, odd images, label errors.

- **Exact duplicates**: identical file content (SHA-256), within and across classes.
- **Near duplicates**: the same picture resized, re-encoded or retouched. Backbone features (from the
  shared cache) propose pairs with cosine similarity above a threshold; a pixel check confirms them (the
  correlation of 32x32 grayscale thumbnails). Pairs the features call alike but whose pixels differ are
  listed apart as **look-alikes** (different pictures of nearly the same thing: worth a look, not a leak).
- **Leakage**: an exact or near duplicate that sits on both sides of the split training will use (train vs.
  validation or test), which inflates validation accuracy.
- **Class imbalance** with a one-click fix: a ``TrainConfig`` patch (``class_balance`` = ``weights`` or
  ``sampler``, both implemented by training).
- **Tiny or blank images**: far smaller than the rest of the dataset, or (nearly) a single colour.
- **Likely label errors**: cross-validated linear-probe predictions (each image scored by a probe that
  never saw it) that confidently disagree with the given label (confident learning, Northcutt et al., JAIR
  2021) and rate it below chance; with a verdict on how far the probe can be trusted.

Compute here, show in pages: :func:`audit_dataset` returns plain dicts and lists.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..cache import DecodedImageCache, FeatureCache
from ..config import TrainConfig
from ..errors import ConfigError
from ..data.intake import Dataset, ImageItem
from ..data.library import open_data
from ..data.splits import sample_items, split_dataset
from ..models.devices import single_threaded
from ..models.feature_variants import apply_variant, block_scales, recorded_extractor
from ..models.features import extract_features, feature_key
from ..models.preprocess import resolve_preprocess
from ..metrics import wilson_interval
from ..models.probe import fit_linear_head
from ..storage.workspace import Workspace
from .embedding import embed_items, load_backbone

__all__ = [
    "NEAR_DUPLICATE_THRESHOLD",
    "PIXEL_MATCH_THRESHOLD",
    "LOOKALIKE_THRESHOLD",
    "thumbnail_correlation",
    "LABEL_CHECK_MIN_ACCURACY",
    "LABEL_CHECK_MIN_LOW",
    "LABEL_CHECK_MIN_IMAGES",
    "LABEL_CHECK_BELOW_CHANCE",
    "label_check_verdict",
    "confident_label_issues",
    "exact_duplicates",
    "near_duplicates",
    "find_leakage",
    "class_imbalance",
    "odd_images",
    "cross_validated_probs",
    "depths_features",
    "label_issues",
    "audit_dataset",
]

log = logging.getLogger(__name__)

#: Cosine similarity of pooled features at or above which two different files are near-duplicate candidates.
#: On the emoji sample a 48-px copy of a 64-px icon scores 0.94, a darker copy 0.97 and a JPEG re-encode
#: 0.92, but distinct look-alike icons score as high (emoji 'confused' vs 'slightly_frowning_face' 0.99,
#: British-territory flags 0.96-0.97): features alone cannot tell a copy from a look-alike.
NEAR_DUPLICATE_THRESHOLD = 0.90
#: Correlation of 32x32 grayscale thumbnails at or above which a candidate pair is the same picture. Copies
#: above (resized, JPEG, darker: >= 0.9998) score above it; the closest distinct emoji (two flags that
#: differ only in a small crest) score 0.993.
PIXEL_MATCH_THRESHOLD = 0.995
#: Feature similarity at or above which a pair that fails the pixel check is listed as a look-alike.
LOOKALIKE_THRESHOLD = 0.97
#: The label check is trusted when its probe's out-of-fold accuracy against the given labels reaches this ...
#: Measured (benchmarks/label_check.py): probes 82-93% accurate on clean labels agree with 69-79% of the labels
#: once 10% are flipped at random, so a bar at 70% would switch the check off exactly where it is needed.
LABEL_CHECK_MIN_ACCURACY = 0.65
#: ... the low end of its Wilson 95% interval reaches this (60 images at 68%: 56%, not enough) ...
LABEL_CHECK_MIN_LOW = 0.60
#: ... and it rests on at least this many images.
LABEL_CHECK_MIN_IMAGES = 30
#: A label is flagged only when the probe gives it less than this share of a uniform guess (1 / classes): see
#: :func:`confident_label_issues`. 1 = below chance, not tuned (on last-layer features 0.5 flagged fewer clean
#: Fashion-MNIST images, 4.8%, but found 57% of the digits flips, under the 60% bar).
LABEL_CHECK_BELOW_CHANCE = 1.0


def exact_duplicates(items: Sequence[ImageItem]) -> list[dict[str, Any]]:
    """Groups of images with identical content.

    Args:
        items: the images (``sha256`` set).
    Returns:
        [{"sha256", "paths", "labels", "splits", "conflicting_labels"}], largest groups first.
    """
    groups: dict[str, list[ImageItem]] = defaultdict(list)
    for it in items:
        groups[it.sha256 or str(it.path)].append(it)
    out = [{"sha256": sha, "paths": [str(i.path) for i in g], "labels": [i.label for i in g],
            "splits": [i.split or "" for i in g], "conflicting_labels": len({i.label for i in g}) > 1}
           for sha, g in groups.items() if len(g) > 1]
    out.sort(key=lambda d: (-len(d["paths"]), d["paths"][0]))
    return out


def near_duplicates(features: np.ndarray, items: Sequence[ImageItem], threshold: float = NEAR_DUPLICATE_THRESHOLD,
                    max_pairs: int = 1000, block: int = 1024) -> list[dict[str, Any]]:
    """Pairs of different files whose features have cosine similarity >= ``threshold``.

    Args:
        features: (N, D) features of ``items``.
        items: the images.
        threshold: similarity cut-off.
        max_pairs: at most this many pairs (most similar first).
        block: rows per block of the similarity matrix (bounds memory for large datasets).
    Returns:
        [{"a", "b", "label_a", "label_b", "split_a", "split_b", "similarity", "same_label"}], most similar first.
    """
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pairs: list[tuple[float, int, int]] = []
    for s in range(0, len(x), block):
        sim = x[s:s + block] @ x.T
        ii, jj = np.nonzero(sim >= threshold)
        for i, j in zip(ii + s, jj):
            if j > i and items[i].sha256 != items[j].sha256:
                pairs.append((float(sim[i - s, j]), int(i), int(j)))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"a": str(items[i].path), "b": str(items[j].path), "label_a": items[i].label, "label_b": items[j].label,
             "split_a": items[i].split or "", "split_b": items[j].split or "", "similarity": round(min(s, 1.0), 4),
             "same_label": items[i].label == items[j].label} for s, i, j in pairs[:max_pairs]]


def thumbnail_correlation(a: np.ndarray, b: np.ndarray, size: int = 32) -> float:
    """Pearson correlation of two images' ``size`` x ``size`` grayscale thumbnails (1.0 = same picture).

    Insensitive to resizing, re-encoding and uniform brightness or contrast changes; sensitive to any
    change of content or position.

    Args:
        a, b: HWC uint8 RGB arrays (any sizes).
        size: thumbnail side.
    Returns:
        The correlation in [-1, 1] (1.0 when both thumbnails are flat and equal, 0.0 when only one is).
    """
    from PIL import Image

    def thumb(x: np.ndarray) -> np.ndarray:
        t = np.asarray(Image.fromarray(x).convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64).ravel()
        return t - t.mean()

    ta, tb = thumb(a), thumb(b)
    na, nb = np.linalg.norm(ta), np.linalg.norm(tb)
    if na < 1e-6 or nb < 1e-6:
        return 1.0 if (na < 1e-6 and nb < 1e-6) else 0.0
    return float(ta @ tb / (na * nb))


def find_leakage(train: Sequence[ImageItem], held_out: Sequence[tuple[str, ImageItem]],
                 near: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Held-out images (validation/test) that duplicate a training image exactly or nearly.

    Args:
        train: training images of the split.
        held_out: (split name, image) pairs of the validation and test images.
        near: near-duplicate pairs from :func:`near_duplicates` over the same images.
    Returns:
        [{"held_out", "split", "train", "kind" (exact|near), "similarity", "same_label"}].
    """
    by_sha: dict[str, list[ImageItem]] = defaultdict(list)
    for it in train:
        by_sha[it.sha256].append(it)
    train_paths = {str(i.path): i for i in train}
    held = {str(i.path): (s, i) for s, i in held_out}
    out: list[dict[str, Any]] = []
    for split, it in held_out:
        for t in by_sha.get(it.sha256, []):
            out.append({"held_out": str(it.path), "split": split, "train": str(t.path), "kind": "exact",
                        "similarity": 1.0, "same_label": t.label == it.label})
    for p in near:
        for h, t in ((p["a"], p["b"]), (p["b"], p["a"])):
            if h in held and t in train_paths:
                split, it = held[h]
                out.append({"held_out": h, "split": split, "train": t, "kind": "near", "similarity": p["similarity"],
                            "same_label": train_paths[t].label == it.label})
    out.sort(key=lambda r: (r["kind"] != "exact", -r["similarity"], r["held_out"]))
    return out


def class_imbalance(counts: dict[str, int]) -> dict[str, Any]:
    """Imbalance ratio and the suggested fix.

    Args:
        counts: images per class (training images).
    Returns:
        {"counts", "ratio" (largest / smallest), "largest", "smallest", "imbalanced" (ratio >= 1.5),
        "suggestion" (none|weights|sampler), "config_patch" (dict to apply to ``TrainConfig``), "reason"}.
    """
    nonzero = {c: n for c, n in counts.items() if n > 0}
    if not nonzero:
        return {"counts": counts, "ratio": 0.0, "largest": None, "smallest": None, "imbalanced": False,
                "suggestion": "none", "config_patch": {}, "reason": "No images."}
    big = max(nonzero, key=nonzero.get)
    small = min(nonzero, key=nonzero.get)
    ratio = nonzero[big] / nonzero[small]
    if ratio < 1.5:
        sugg, reason = "none", f"Classes are balanced (largest/smallest = {ratio:.1f}); nothing to fix."
    elif ratio < 5:
        sugg = "weights"
        reason = (f"{big!r} has {ratio:.1f}x the images of {small!r}; weighting the loss by inverse class frequency "
                  "keeps the model from favouring the big classes.")
    else:
        sugg = "sampler"
        reason = (f"{big!r} has {ratio:.1f}x the images of {small!r}; balanced sampling shows every class equally "
                  "often (loss weights this large make training unstable). Adding images to the small classes helps most.")
    return {"counts": counts, "ratio": round(ratio, 3), "largest": big, "smallest": small, "imbalanced": ratio >= 1.5,
            "suggestion": sugg, "config_patch": {} if sugg == "none" else {"class_balance": sugg}, "reason": reason}


def odd_images(items: Sequence[ImageItem], decoded: DecodedImageCache | None = None, resize: int = 64,
               interpolation: str = "bilinear", min_side: int = 16, blank_std: float = 3.0) -> list[dict[str, Any]]:
    """Images that are tiny (absolutely, or far smaller than the dataset's typical image) or blank.

    Args:
        items: the images (with width/height).
        decoded: decoded-image cache used to look at the pixels.
        resize: shorter side the pixels are examined at.
        interpolation: resize filter.
        min_side: a shorter side below this many pixels is always tiny.
        blank_std: pixel standard deviation (0-255) below which an image counts as blank.
    Returns:
        [{"path", "label", "reason", "width", "height"}].
    """
    if not items:
        return []
    sides = np.array([min(i.width, i.height) for i in items], dtype=np.float64)
    median = float(np.median(sides))
    cache = decoded or DecodedImageCache(None)
    out = []
    for it, side in zip(items, sides):
        reasons = []
        if side < min_side:
            reasons.append(f"tiny ({it.width}x{it.height} px)")
        elif median >= 64 and side < median / 4:
            reasons.append(f"much smaller than the others ({it.width}x{it.height} px; typical shorter side {median:.0f} px)")
        try:
            arr = cache.get(it, resize, interpolation)
            std = float(arr.reshape(-1, 3).std(0).max())
            if std < blank_std:
                colour = tuple(int(v) for v in arr.reshape(-1, 3).mean(0).round())
                reasons.append(f"blank (a single colour, RGB {colour})")
        except Exception as e:  # unreadable now (deleted since opening): say so instead of failing the audit
            reasons.append(f"could not be read again ({e})")
        if reasons:
            out.append({"path": str(it.path), "label": it.label, "reason": "; ".join(reasons),
                        "width": it.width, "height": it.height})
    return out


def cross_validated_probs(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5,
                          seed: int = 0, linear_c: float = 1.0) -> np.ndarray:
    """Out-of-fold class probabilities: each image scored by a linear probe fitted without it.

    Args:
        features: (N, D) features.
        labels: N class indices.
        n_classes: number of classes.
        folds: stratified folds (capped so that each fold is non-empty).
        seed: fold assignment seed.
        linear_c: probe regularisation, as ``TrainConfig.linear_c``.
    Returns:
        (N, n_classes) probabilities.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    folds = max(2, min(folds, n))
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + int(rng.integers(folds))) % folds
    cfg = TrainConfig(strategy="linear", linear_c=linear_c, seed=seed).resolved()
    probs = np.zeros((n, n_classes))
    x = np.asarray(features, dtype=np.float32)
    for f in range(folds):
        te, tr = fold == f, fold != f
        if not te.any():
            continue
        head, _ = fit_linear_head(x[tr], y[tr], x[te], y[te], n_classes, cfg)
        with torch.inference_mode():
            probs[te] = torch.softmax(head(torch.from_numpy(np.ascontiguousarray(x[te]))).double(), 1).numpy()
    return probs


def depths_features(items: Sequence[ImageItem], backbone: str, workspace: Workspace,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, int] | None:
    """The label check's probe input: features at several depths (:mod:`tl_core.models.feature_variants`, the
    ones a linear run with features ``auto`` caches), each stage scaled over ``items`` as ``auto`` scales them.

    One forward pass fills the several-depths cache and the last-layer cache (which the rest of the audit reads),
    so an audit after training, or training after an audit, extracts nothing again. Measured
    (benchmarks/label_check.py): out-of-fold accuracy 84.6% against 82.0% on the Fashion-MNIST sample, 87.7%
    against 81.7% on digits; flips found on digits 71% against 66%.

    Args:
        items: the images.
        backbone: catalogue or timm model name.
        workspace: cache location.
        progress, should_cancel: as :func:`~tl_core.insight.embedding.embed_items`.
    Returns:
        ((N, D) float32 scaled features, the last layer's width), or None when the backbone cannot give features
        at several depths (the caller keeps the last layer's).
    """
    model, info = load_backbone(backbone)
    pre = resolve_preprocess(model)
    feats = workspace.cache_dir / "features"
    fcache = FeatureCache(feats, feature_key(backbone, info.fingerprint, pre, "depths"))
    try:  # the widths training recorded beside the depths cache: no probe pass through the network
        ext = recorded_extractor(model, "depths", fcache)
    except ConfigError:
        return None
    raw = extract_features(ext, list(items), pre, DecodedImageCache(workspace.cache_dir / "decoded"), fcache,
                           progress=progress, should_cancel=should_cancel,
                           last_cache=FeatureCache(feats, feature_key(backbone, info.fingerprint, pre)))
    dims = list(ext.block_dims)
    return apply_variant(raw, "depths", ext.last_features, dims, block_scales(raw, ext.last_features, dims)), \
        ext.last_features


def label_check_verdict(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How far the label check can be trusted: the out-of-fold accuracy of its probe against the given labels.

    A probe that often disagrees with correct labels flags hard images, not wrong labels: on a clip-art set where
    it was ~55% accurate, 22% of correctly labelled images were flagged. The check is called reliable when the
    out-of-fold accuracy is at least :data:`LABEL_CHECK_MIN_ACCURACY`, the low end of its Wilson 95% interval at
    least :data:`LABEL_CHECK_MIN_LOW` and it rests on at least :data:`LABEL_CHECK_MIN_IMAGES` images. Wrong labels
    lower the measured accuracy too (10% flipped at random cost the measured probes 10-16 points), so the bar is
    well below the 80% a probe needs on clean labels; between 65% and ~75% many flags are hard images (the
    sentence says so). An unreliable check lists nothing (:func:`audit_dataset`): an overfitted weak probe is
    sure of its wrong answers too.

    Args:
        probs: (N, C) out-of-fold probabilities.
        labels: N given class indices.
    Returns:
        {"oof_accuracy", "oof_accuracy_ci" [low, high], "images", "reliable", "reason"}.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    correct = int((np.asarray(probs).argmax(1) == y).sum()) if n else 0
    acc = correct / n if n else 0.0
    lo, hi = wilson_interval(correct, n)
    reliable = False
    if n == 0:
        reason = "No images to check."
    elif acc < LABEL_CHECK_MIN_ACCURACY:
        reason = (f"The label check is not reliable here: a probe that never saw each image agrees with its label "
                  f"for only {acc:.0%} of the images (95% interval {lo:.0%}-{hi:.0%}), so it cannot tell a wrong "
                  "label from a hard image; it lists none.")
    elif n < LABEL_CHECK_MIN_IMAGES or lo < LABEL_CHECK_MIN_LOW:
        reason = (f"The label check is not reliable here: {n} images are too few to be sure of the probe it rests "
                  f"on ({acc:.0%} agreement, 95% interval {lo:.0%}-{hi:.0%}); it lists none.")
    else:
        reliable = True
        reason = (f"The label check rests on a probe that agrees with {acc:.0%} of the given labels on images it "
                  f"never saw (95% interval {lo:.0%}-{hi:.0%})."
                  + (" At this agreement many flags are hard images rather than wrong labels: look before you move "
                     "any." if acc < 0.8 else ""))
    return {"oof_accuracy": round(acc, 4), "oof_accuracy_ci": [round(lo, 4), round(hi, 4)], "images": n,
            "reliable": reliable, "reason": reason}


def confident_label_issues(probs: np.ndarray, labels: np.ndarray, min_class_size: int = 3) -> list[dict[str, Any]]:
    """Confident learning (Northcutt et al., JAIR 2021) on out-of-fold probabilities, kept to labels the probe
    rates below chance.

    Each class's threshold is its average self-confidence (the mean probability of class j over the images
    labelled j). An image labelled y is a candidate when some other class j reaches its own threshold (the most
    probable such j is the suggested class), its given label's probability is below y's threshold, and the probe
    puts the suggested class above the given one (cleanlab's "both" filter). Candidates are ranked by the margin
    p[suggested] - p[given].

    On top of that, the given label's probability must be below chance, 1 / C (:data:`LABEL_CHECK_BELOW_CHANCE`):
    the probe must think the given class *less* likely than a blind guess would. A wrong label names a class the
    image does not resemble, so the probe gives it almost nothing; a correct label on an ambiguous image (a shirt
    that looks like a T-shirt) keeps a fair share. Confident learning alone cannot tell the two apart, and
    flagged 9.8% of the correct Fashion-MNIST sample labels (last-layer features); with this bar 6.8%, while the
    flips it finds drop from 86% to 84% (benchmarks/label_check.py; on several depths 6.4% and 83%). It needs no tuned constant: with 2 classes it is the "both"
    filter itself.

    Args:
        probs: (N, C) out-of-fold probabilities.
        labels: N given class indices.
        min_class_size: classes with fewer images are not judged (their probe barely saw them).
    Returns:
        [{"index", "suggested" (class index), "confidence" (p[suggested]), "label_probability" (p[given]),
        "margin", "threshold" (the suggested class's)}], largest margin first.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, k = p.shape
    sizes = np.bincount(y, minlength=k)
    thr = np.array([p[y == j, j].mean() if sizes[j] else np.inf for j in range(k)])
    above = p >= thr[None, :]
    above[np.arange(n), y] = False  # another class than the given one
    masked = np.where(above, p, -1.0)
    sugg = masked.argmax(1)
    ps, py = p[np.arange(n), sugg], p[np.arange(n), y]
    cand = (above.any(1) & (py < thr[y]) & (ps > py) & (sizes[y] >= min_class_size)
            & (py < LABEL_CHECK_BELOW_CHANCE / k))
    out = [{"index": int(i), "suggested": int(sugg[i]), "confidence": round(float(ps[i]), 4),
            "label_probability": round(float(py[i]), 4), "margin": round(float(ps[i] - py[i]), 4),
            "threshold": round(float(thr[sugg[i]]), 4)} for i in np.flatnonzero(cand)]
    out.sort(key=lambda r: (-r["margin"], r["index"]))
    return out


def label_issues(probs: np.ndarray, items: Sequence[ImageItem], classes: Sequence[str],
                 min_class_size: int = 3) -> list[dict[str, Any]]:
    """Images whose out-of-fold prediction confidently names another class (:func:`confident_label_issues`).

    Args:
        probs: out-of-fold probabilities (from :func:`cross_validated_probs`).
        items: the images, aligned with ``probs``.
        classes: class names.
        min_class_size: classes with fewer images are not judged (their probe never saw them).
    Returns:
        [{"path", "label", "suggested", "confidence", "label_probability", "margin", "threshold"}], largest
        margin first.
    """
    cidx = {c: i for i, c in enumerate(classes)}
    y = np.array([cidx[i.label] for i in items], dtype=np.int64)
    out = []
    for r in confident_label_issues(probs, y, min_class_size):
        it = items[r.pop("index")]
        out.append({"path": str(it.path), "label": it.label, **r, "suggested": classes[r["suggested"]]})
    return out


def audit_dataset(data: str | os.PathLike | Dataset, backbone: str = "efficientnet_lite0",
                  workspace: Workspace | None = None, val_split: float = 0.2, seed: int = 0,
                  near_threshold: float = NEAR_DUPLICATE_THRESHOLD,
                  pixel_threshold: float = PIXEL_MATCH_THRESHOLD,
                  max_per_class: int | None = None,
                  folds: int = 5, progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Audit a dataset before training (everything the Data page shows).

    Args:
        data: dataset path (folder, zip, CSV) or opened dataset.
        backbone: backbone whose features find near duplicates and label errors.
        workspace: cache location (default ``$TL_HOME``).
        val_split, seed: the split to check for leakage (use the values you will train with).
        near_threshold: feature cosine similarity of near-duplicate candidates.
        pixel_threshold: thumbnail correlation that confirms a candidate as the same picture.
        max_per_class: audit at most this many images per class (seeded) for near duplicates and labels;
            exact duplicates, imbalance and odd images always cover everything.
        folds: cross-validation folds of the label check.
        progress: called with (done, total) during feature extraction.
        should_cancel: polled between batches.
    Returns:
        {"images", "classes", "counts", "split": {train, val, test}, "exact_duplicates",
        "near_duplicates" (pairs with "similarity" and "pixel_correlation"), "lookalikes" (same fields),
        "leakage", "imbalance" (see :func:`class_imbalance`), "odd_images",
        "label_issues", "suggested_config" (``TrainConfig`` fields to change), "findings" (plain-language
        lines, most important first), "backbone", "thresholds", "seconds"}.
    """
    t0 = time.perf_counter()
    ws = workspace or Workspace.default()
    ds = open_data(data, ws)
    split = split_dataset(ds, val_split, seed)
    exact = exact_duplicates(ds.items)
    subset = sample_items(ds.items, max_per_class, seed)
    # the label check scores train+val images (a test split stays untouched), on several depths' features: one
    # forward pass that also fills the last-layer cache embed_items reads next
    lab_idx = [n for n, i in enumerate(subset) if i.split != "test"]
    # the check runs on single-label data with two classes and enough images for its folds; otherwise its
    # features would be extracted for nothing
    checks_labels = (not ds.multi_label and len({subset[n].label for n in lab_idx}) >= 2
                     and len(lab_idx) >= 2 * folds)
    depths = depths_features([subset[n] for n in lab_idx], backbone, ws, progress, should_cancel) \
        if checks_labels else None
    emb = embed_items(subset, ds.classes, backbone, ws, progress=progress, should_cancel=should_cancel)
    decoded = DecodedImageCache(ws.cache_dir / "decoded")
    with single_threaded():
        candidates = near_duplicates(emb.features, subset, min(near_threshold, LOOKALIKE_THRESHOLD))
    by_path = {str(i.path): i for i in subset}
    near: list[dict[str, Any]] = []
    lookalikes: list[dict[str, Any]] = []
    for pair in candidates:
        a, b = by_path[pair["a"]], by_path[pair["b"]]
        try:
            pair["pixel_correlation"] = round(thumbnail_correlation(
                decoded.get(a, emb.pre.resize, emb.pre.interpolation), decoded.get(b, emb.pre.resize, emb.pre.interpolation)), 4)
        except Exception as e:  # a file deleted since it was opened: keep the feature evidence only
            log.warning("pixel check of %s / %s failed: %s", a.path, b.path, e)
            pair["pixel_correlation"] = None
        if pair["similarity"] >= near_threshold and (pair["pixel_correlation"] or 0.0) >= pixel_threshold:
            near.append(pair)
        elif pair["similarity"] >= LOOKALIKE_THRESHOLD:
            lookalikes.append(pair)
    held = [("val", i) for i in split.val] + [("test", i) for i in split.test]
    leaks = find_leakage(split.train, held, near)
    train_counts = Counter(lab for i in split.train for lab in i.label_set)  # multi-label: images per label
    imb = class_imbalance({c: train_counts.get(c, 0) for c in ds.classes})
    if ds.multi_label and imb["suggestion"] == "sampler":  # sampling balances classes, not labels: weigh instead
        imb.update(suggestion="weights", config_patch={"class_balance": "weights"},
                   reason=imb["reason"].split(";")[0] + "; weighting each label's positives (multi-label data) "
                          "keeps the model from ignoring the rare labels.")
    odd = odd_images(ds.items, decoded, emb.pre.resize, emb.pre.interpolation)
    issues: list[dict[str, Any]] = []
    notes: list[str] = []
    verdict: dict[str, Any] | None = None
    if ds.multi_label:  # the check compares one given class with one predicted class
        notes.append("The label-error check was skipped: it is for one label per image, and this dataset is "
                     "multi-label. Class counts are images per label.")
    elif checks_labels:
        with single_threaded():
            x = depths[0] if depths is not None else emb.features[lab_idx]
            probs = cross_validated_probs(x, emb.labels[lab_idx], len(ds.classes), folds, seed)
        verdict = label_check_verdict(probs, emb.labels[lab_idx])
        verdict["features"] = "depths" if depths is not None else "last"  # what its probe saw
        if verdict["reliable"]:
            issues = label_issues(probs, [subset[n] for n in lab_idx], ds.classes)
        else:  # its flags would be hard images, not wrong labels (an overfitted weak probe is even sure of them)
            notes.append(verdict["reason"])

    findings: list[str] = []
    if leaks:
        exact_n = sum(1 for r in leaks if r["kind"] == "exact")
        findings.append(f"{len(leaks)} validation/test image(s) duplicate a training image ({exact_n} exact, "
                        f"{len(leaks) - exact_n} near): validation accuracy will look better than it is. "
                        "Remove the copies before training.")
    conflicting = [g for g in exact if g["conflicting_labels"]]
    if conflicting:
        findings.append(f"{len(conflicting)} image(s) appear in more than one class folder (identical files with "
                        "different labels); keep each in its right class only.")
    if exact:
        findings.append(f"{sum(len(g['paths']) - 1 for g in exact)} exact duplicate file(s) in {len(exact)} group(s).")
    if near:
        findings.append(f"{len(near)} pair(s) of near-duplicate images (the same picture resized, re-encoded or "
                        "retouched).")
    if issues:
        findings.append(f"{len(issues)} image(s) look like another class to a probe that never saw them; check "
                        "their labels.")
    if imb["imbalanced"]:
        findings.append(imb["reason"])
    if odd:
        findings.append(f"{len(odd)} image(s) are tiny or blank.")
    if lookalikes:
        findings.append(f"{len(lookalikes)} pair(s) of different images look almost alike (feature similarity >= "
                        f"{LOOKALIKE_THRESHOLD:.2f}); fine if they are distinct pictures, a problem if one is a crop "
                        "or edit of the other.")
    if not findings:
        findings.append("No problems found: no duplicates or leakage, balanced classes, no odd images, no likely "
                        "label errors.")
    return {
        "images": len(ds.items),
        "classes": ds.classes,
        "counts": ds.counts(),
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "exact_duplicates": exact,
        "near_duplicates": near,
        "lookalikes": lookalikes,
        "leakage": leaks,
        "imbalance": imb,
        "odd_images": odd,
        "label_issues": issues,
        "label_check_reliable": None if verdict is None else verdict["reliable"],
        "oof_accuracy": None if verdict is None else verdict["oof_accuracy"],
        "oof_accuracy_ci": None if verdict is None else verdict["oof_accuracy_ci"],
        "label_check": verdict,
        "suggested_config": dict(imb["config_patch"]),
        "findings": findings,
        "notes": notes,
        "backbone": backbone,
        "audited_images": len(subset),
        "thresholds": {"near_duplicate": near_threshold, "pixel_match": pixel_threshold,
                       "lookalike": LOOKALIKE_THRESHOLD, "label_check_min_accuracy": LABEL_CHECK_MIN_ACCURACY,
                       "label_check_min_low": LABEL_CHECK_MIN_LOW, "label_check_min_images": LABEL_CHECK_MIN_IMAGES,
                       "label_check_below_chance": LABEL_CHECK_BELOW_CHANCE,
                       "val_split": val_split, "seed": seed},
        "seconds": round(time.perf_counter() - t0, 3),
    }

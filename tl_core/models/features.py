"""Feature extraction with the content-keyed feature cache (:class:`tl_core.cache.FeatureCache`).

A feature vector is keyed by (image content hash, backbone, weights fingerprint, preprocessing), so a
second run on the same data and backbone extracts nothing and adding ten images extracts ten. A
cache file that cannot be read or has the wrong shape is recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..cache import DecodedImageCache, FeatureCache
from ..data.intake import ImageItem
from ..errors import CancelledError
from .devices import Runtime
from .distributed import gather, shard
from .engines import FeatureEngine, feature_engine
from .pipeline import eval_batches
from .preprocess import Preprocess

__all__ = ["feature_key", "extract_features", "pooled_features", "engine_cache_dir"]

log = logging.getLogger(__name__)


def feature_key(backbone: str, weights_fingerprint: str, pre: Preprocess, variant: str = "last") -> str:
    """The cache namespace of one (backbone, weights, preprocessing, feature variant) combination (the
    last-layer key is the one it always was; ``depths`` caches the unscaled concatenation, see
    :mod:`tl_core.models.feature_variants`)."""
    raw = f"{backbone}|{weights_fingerprint}|{pre.fingerprint}" + (f"|{variant}" if variant != "last" else "")
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logit features of a timm model (what its classifier sees)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def engine_cache_dir(cache: FeatureCache | None, decoded: DecodedImageCache | None) -> Path | None:
    """The workspace cache folder (``<cache>/features/<key>`` or ``<cache>/decoded``'s parent), if known."""
    if cache is not None:
        return Path(cache.dir).parent.parent
    if decoded is not None and decoded.dir is not None:
        return Path(decoded.dir).parent
    return None


def extract_features(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess,
                     decoded: DecodedImageCache, cache: FeatureCache | None = None,
                     batch_size: int = 32,
                     progress: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None,
                     runtime: Runtime | None = None, last_cache: FeatureCache | None = None) -> np.ndarray:
    """Pooled backbone features of ``items`` (eval preprocessing, no augmentation).

    The forward pass runs on the engine :func:`tl_core.models.engines.feature_engine` picks (PyTorch or ONNX
    Runtime, equal within 1e-4). Under torchrun the images not in the cache are shared out between the ranks and the features gathered,
    so every rank returns all of them.

    Args:
        model: a timm model (any head; its pre-logit features are used).
        items: the images.
        pre: the model's preprocessing.
        decoded: decoded-image cache.
        cache: feature cache; images already in it are not run through the model.
        batch_size: images per forward pass.
        progress: called with (done, total).
        should_cancel: polled between batches; True raises :class:`CancelledError`.
        runtime: device, precision and distributed group (default: this process, CPU).
        last_cache: for a several-depths extractor (:mod:`.feature_variants`), the last-layer cache: each vector
            computed also leaves its first ``model.last_features`` columns there, so the audit, advisor and
            embedding map that follow a run find them.
    Returns:
        float32 array (len(items), feature_dim).
    """
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    out: list[np.ndarray | None] = [None] * len(items)
    todo: list[int] = []
    for i, item in enumerate(items):
        v = cache.get(item.sha256, dim) if (cache and item.sha256) else None
        if v is not None:
            out[i] = v
            cache.hits += 1
            cache.touch(item.sha256)
        else:
            todo.append(i)
    # every rank works from rank 0's list (another rank may look at the cache while one already writes)
    todo = gather(rt, todo)[0]
    mine = [todo[k] for k in shard(len(todo), rt)]
    done = len(items) - len(todo)
    if progress:
        progress(done, len(items))
    computed: list[tuple[int, np.ndarray]] = []
    # as many steps on every rank (a cancel check is a collective under torchrun; a short shard idles)
    steps = -(-len(todo) // (rt.world_size * batch_size)) if todo else 0
    batches = [mine[s:s + batch_size] for s in range(0, steps * batch_size, batch_size)]
    # the next batch decodes meanwhile; each image is seen once here, so its pixels are not kept (its features
    # are); the engine takes uint8 crops and normalises them itself
    feed = eval_batches(items, [b for b in batches if b], pre, decoded, keep=False, pixels=True)
    engine: FeatureEngine | None = None
    with torch.inference_mode(), contextlib.closing(feed):
        for idx in batches:
            if should_cancel and should_cancel():
                raise CancelledError("Cancelled during feature extraction.")
            if not idx:  # this rank's share is done; it still takes part in the cancel checks
                continue
            if engine is None:  # PyTorch or ONNX Runtime (tl_core.models.engines), once there is work
                engine = feature_engine(model, pre, rt, engine_cache_dir(cache, decoded), len(mine))
            _, x = next(feed)
            feats = engine(x)
            for j, i in enumerate(idx):
                out[i] = feats[j]
                computed.append((i, feats[j]))
                if cache and items[i].sha256:
                    cache.put(items[i].sha256, feats[j])
                    cache.misses += 1
                    if last_cache is not None:
                        last_cache.put(items[i].sha256, np.ascontiguousarray(feats[j][:model.last_features]))
            done += len(idx) * rt.world_size
            if progress:
                progress(min(done, len(items)), len(items))
    if rt.distributed:
        for part in gather(rt, computed):
            for i, v in part:
                out[i] = v
    dims = {v.shape[0] for v in out if v is not None}
    if len(dims) > 1:  # a stale cache entry of another dimension slipped through: recompute everything
        log.warning("inconsistent cached feature sizes %s; recomputing", dims)
        return extract_features(model, items, pre, decoded, None, batch_size, progress, should_cancel, rt, last_cache)
    return np.stack(out) if out else np.zeros((0, 0), np.float32)

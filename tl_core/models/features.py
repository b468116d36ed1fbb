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

from dataclasses import dataclass
from typing import Any

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

__all__ = ["feature_key", "extract_features", "pooled_features", "engine_cache_dir", "StyleSpec", "DEFAULT_STYLE",
           "pooled_and_style", "style_dims", "style_widths", "WithStyle", "style_key",
           "read_cached"]

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


# -- style statistics (the open-set score's second input, tl_core.models.openset) -------------------------------
@dataclass(frozen=True)
class StyleSpec:
    """Which channel statistics of which ``forward_intermediates`` stages describe an image's *style*.

    Attributes:
        stages: indices into the backbone's ``forward_intermediates`` list (EfficientNet-Lite0: 0 = stem, 16
            channels at 1/2 size; 1: 24 at 1/4; 2: 40 at 1/8; 3: 112 at 1/16; 4: 320 at 1/32).
        stat: ``std`` (each channel's standard deviation over the map) or ``meanstd`` (its mean, then its std).
    """

    stages: tuple[int, ...] = (1, 3)
    stat: str = "std"

    @property
    def name(self) -> str:
        return f"style-{self.stat}-{'.'.join(str(s) for s in self.stages)}"

    def to_dict(self) -> dict[str, Any]:
        return {"stages": list(self.stages), "stat": self.stat}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StyleSpec":
        return cls(tuple(int(s) for s in d["stages"]), str(d.get("stat", "std")))


#: The style statistics a new run records: the channel std of stages 1 and 3 (Lite0: 24 and 112 channels at 1/4 and
#: 1/16 size), measured best on 18 (training set, foreign set) pairs of real images (benchmarks/openset.py: adding
#: stage 2, 0 or 4 to the max raised the bar for the others and flagged fewer foreign images; docs/openset.md).
DEFAULT_STYLE = StyleSpec()


def _mean_hw(t: torch.Tensor) -> torch.Tensor:
    """Mean over the map (two steps: ONNX Runtime's single ReduceMean drifted 1e-4 on large early maps);
    a token sequence (B, N, C): over the tokens."""
    return t.mean(3).mean(2) if t.ndim == 4 else t.mean(1)


def _channel_stats(t: torch.Tensor, stat: str) -> torch.Tensor:
    """(B, C) per-channel std over the map (or (B, 2C) mean then std), in float32."""
    t = t.float()
    m = _mean_hw(t)
    c = t - (m[:, :, None, None] if t.ndim == 4 else m[:, None, :])
    sd = torch.sqrt(_mean_hw(c * c) + 1e-12)
    return torch.cat([m, sd], 1) if stat == "meanstd" else sd


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if getattr(model, "variant", "last") in ("depths", "flip") and hasattr(model, "backbone") \
        else model


def pooled_and_style(model: nn.Module, x: torch.Tensor, spec: StyleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-logit features (as :func:`pooled_features`) and the style statistics of ``x``, from ONE forward
    pass (``forward_intermediates``). A several-depths or flip wrapper (:mod:`.feature_variants`) gives its own
    variant vector; the style is that of the image itself (a flip wrapper's mirror half is not used: a channel's
    spread barely changes in a mirror).

    Raises:
        AttributeError: the backbone has no ``forward_intermediates`` (see :func:`style_dims`).
    """
    b = _backbone(model)
    variant = getattr(model, "variant", "last") if b is not model else "last"
    if variant == "flip":
        final, inter = b.forward_intermediates(torch.cat([x, torch.flip(x, dims=[3])]))
        pooled = b.forward_head(final, pre_logits=True).unflatten(0, (2, -1)).mean(0)
        inter = [t.unflatten(0, (2, -1))[0] for t in inter]
    else:
        final, inter = b.forward_intermediates(x)
        pooled = b.forward_head(final, pre_logits=True)
        if variant == "depths":
            pooled = torch.cat([pooled] + [_mean_hw(t) * model.scales[i] for i, t in enumerate(inter)], 1)
    style = torch.cat([_channel_stats(inter[s], spec.stat) for s in spec.stages], 1)
    return pooled, style


def style_dims(model: nn.Module, spec: StyleSpec) -> list[int] | None:
    """The width of each selected stage's statistics, or None when the backbone cannot give them (no
    ``forward_intermediates``, or fewer stages than ``spec`` names): its runs score content only."""
    b = _backbone(model)
    if not hasattr(b, "forward_intermediates"):
        return None
    chans = None
    info = getattr(b, "feature_info", None)
    try:
        if info is not None and hasattr(info, "channels"):
            chans = list(info.channels())
        elif isinstance(info, list) and info and all("num_chs" in d for d in info):
            chans = [int(d["num_chs"]) for d in info]
    except Exception:
        chans = None
    if chans is None:
        size = (getattr(b, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        try:
            with torch.no_grad():
                _, inter = b.forward_intermediates(torch.zeros(1, 3, size, size))
            chans = [int(t.shape[1] if t.ndim == 4 else t.shape[2]) for t in inter]
        except Exception:
            return None
    return style_widths(chans, spec)


def style_widths(chans: Sequence[int], spec: StyleSpec) -> list[int] | None:
    """:func:`style_dims` from the channels of each ``forward_intermediates`` stage."""
    if not spec.stages or max(spec.stages) >= len(chans):
        return None
    k = 2 if spec.stat == "meanstd" else 1
    return [k * int(chans[s]) for s in spec.stages]


class WithStyle(nn.Module):
    """An extractor whose "pooled features" are ``inner``'s pre-logit features followed by the style statistics
    (:func:`pooled_and_style`): what the feature engine (PyTorch or ONNX Runtime) runs when both are wanted."""

    def __init__(self, inner: nn.Module, spec: StyleSpec, dims: Sequence[int]):
        super().__init__()
        self.inner, self.spec = inner, spec
        self.variant = f"{getattr(inner, 'variant', 'last')}+{spec.name}"
        self.content_dim = int(getattr(inner, "head_hidden_size", None) or inner.num_features)
        self.last_features = int(getattr(inner, "last_features", self.content_dim))
        self.style_dim = int(sum(dims))
        self.num_features = self.head_hidden_size = self.content_dim + self.style_dim

    @property
    def block_dims(self) -> list[int]:
        return list(getattr(self.inner, "block_dims", []))

    def get_classifier(self) -> nn.Module:
        return self.inner.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(pooled_and_style(self.inner, x, self.spec), 1)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f


def style_key(backbone: str, weights_fingerprint: str, pre: Preprocess, spec: StyleSpec) -> str:
    """The feature-cache namespace of a frozen backbone's style statistics (whatever the probe's variant)."""
    return feature_key(backbone, weights_fingerprint, pre, spec.name)


def engine_cache_dir(cache: FeatureCache | None, decoded: DecodedImageCache | None) -> Path | None:
    """The workspace cache folder (``<cache>/features/<key>`` or ``<cache>/decoded``'s parent), if known."""
    if cache is not None:
        return Path(cache.dir).parent.parent
    if decoded is not None and decoded.dir is not None:
        return Path(decoded.dir).parent
    return None


def read_cached(items: Sequence[ImageItem], cache: FeatureCache, dim: int, style_cache: FeatureCache | None = None,
                style_dim: int = 0) -> tuple[np.ndarray, np.ndarray | None] | None:
    """What :func:`extract_features` returns when every item is in the caches (features of width ``dim``; with
    ``style_cache``, the style statistics of width ``style_dim`` too), counted and touched as it counts them,
    with no network; None as soon as one is missing (the caller then builds the network and extracts).

    Returns:
        (features (N, dim) float32, style statistics (N, style_dim) float32 or None without ``style_cache``).
    """
    feats: list[np.ndarray] = []
    sty: list[np.ndarray] = []
    for item in items:
        v = cache.get(item.sha256, dim) if item.sha256 else None
        w = style_cache.get(item.sha256, style_dim) if (style_cache is not None and v is not None) else None
        if v is None or (style_cache is not None and w is None):
            return None
        feats.append(v)
        if w is not None:
            sty.append(w)
    for item in items:
        cache.hits += 1
        cache.touch(item.sha256)
        if style_cache is not None:
            style_cache.touch(item.sha256)
    out = np.stack(feats) if feats else np.zeros((0, dim), np.float32)
    if style_cache is None:
        return out, None
    return out, (np.stack(sty).astype(np.float32) if sty else np.zeros((0, style_dim), np.float32))


def extract_features(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess,
                     decoded: DecodedImageCache, cache: FeatureCache | None = None,
                     batch_size: int = 32,
                     progress: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None,
                     runtime: Runtime | None = None, last_cache: FeatureCache | None = None,
                     style: StyleSpec | None = None, style_cache: FeatureCache | None = None) -> Any:
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
        style: also the style statistics of each image (:func:`pooled_and_style`, the same forward pass).
        style_cache: where those are cached (keyed like the features: :func:`style_key`); an image missing in
            either cache is run again.
    Returns:
        float32 array (len(items), feature_dim); with ``style``, (features, style (len(items), S) or None when
        the backbone cannot give style statistics).
    """
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    sdims = style_dims(model, style) if style is not None else None
    if style is not None and sdims is None:  # content only (no forward_intermediates): as without style
        return extract_features(model, items, pre, decoded, cache, batch_size, progress, should_cancel, rt,
                                last_cache), None
    sdim = sum(sdims) if sdims else 0
    out: list[np.ndarray | None] = [None] * len(items)
    sty: list[np.ndarray | None] = [None] * len(items)
    todo: list[int] = []
    for i, item in enumerate(items):
        v = cache.get(item.sha256, dim) if (cache and item.sha256) else None
        w = style_cache.get(item.sha256, sdim) if (sdims and style_cache and item.sha256 and v is not None) else None
        if v is not None and (not sdims or w is not None):
            out[i], sty[i] = v, w
            cache.hits += 1
            cache.touch(item.sha256)
            if w is not None:
                style_cache.touch(item.sha256)
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
                run = WithStyle(model, style, sdims) if sdims else model
                engine = feature_engine(run, pre, rt, engine_cache_dir(cache, decoded), len(mine))
            _, x = next(feed)
            both = engine(x)
            feats, sfeats = (both[:, :dim], both[:, dim:]) if sdims else (both, None)
            for j, i in enumerate(idx):
                out[i] = feats[j]
                if sfeats is not None:
                    sty[i] = np.ascontiguousarray(sfeats[j])
                    if style_cache is not None and items[i].sha256:
                        style_cache.put(items[i].sha256, sty[i])
                computed.append((i, feats[j], sty[i]))
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
            for i, v, w in part:
                out[i], sty[i] = v, w
    dims = {v.shape[0] for v in out if v is not None}
    if len(dims) > 1:  # a stale cache entry of another dimension slipped through: recompute everything
        log.warning("inconsistent cached feature sizes %s; recomputing", dims)
        return extract_features(model, items, pre, decoded, None, batch_size, progress, should_cancel, rt, last_cache,
                                style, None)
    feats_out = np.stack(out) if out else np.zeros((0, 0 if style is None else dim or 0), np.float32)
    if style is None:
        return feats_out
    return feats_out, (np.stack(sty).astype(np.float32) if out else np.zeros((0, sdim), np.float32))

"""Running a trained model over images: raw logits (N, C), batched, eval preprocessing, under
``torch.inference_mode()``. Probabilities come from :func:`tl_core.metrics.softmax` with the run's
temperature, in one place. ``with_features=True`` also returns the pre-logit features (what the classifier head
sees; the open-set score's input) from the same forward pass, and ``style=StyleSpec`` the style statistics of the
same pass too (:func:`~tl_core.models.features.pooled_and_style`).

A ``linear`` run's backbone is the frozen pretrained one, so its logits are its head applied to features the
feature cache may already hold (:class:`CachedFeatures`, :func:`logits_via_cache`): the same vectors its head
was fitted on, keyed by (image content, backbone, weights fingerprint, preprocessing, variant); images seen
before (in training, an earlier evaluation) run through no network at all, the others through
:func:`~tl_core.models.features.extract_features`, which caches them for the next time."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..cache import DecodedImageCache, FeatureCache
from ..data.intake import ImageItem
from ..errors import CancelledError
from .devices import Runtime
from .feature_variants import VariantModel, apply_variant
from .features import StyleSpec, extract_features, pooled_and_style, pooled_features, style_dims
from .folding import fold_wanted, folded
from .pipeline import batched, eval_batches
from .preprocess import Preprocess

__all__ = ["forward_batch", "logits_of_items", "logits_of_images", "CachedFeatures", "logits_via_cache"]


def forward_batch(model: nn.Module, x: torch.Tensor, rt: Runtime, with_features: bool = False,
                  style: StyleSpec | None = None) -> Any:
    """One batch of preprocessed images ``x`` through ``model`` on ``rt``: numpy logits; with ``with_features``,
    (logits, pre-logit features), and with ``style`` too, (logits, features, style statistics), all from one pass."""
    x = x.to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with rt.autocast():
        if not with_features:
            return model(x).float().cpu().numpy()
        if style is not None:  # one forward_intermediates pass: features, logits and style statistics
            f, s = pooled_and_style(model, x, style)
            return model.get_classifier()(f).float().cpu().numpy(), f.float().cpu().numpy(), s.float().cpu().numpy()
        f = pooled_features(model, x)  # timm: the classifier applied to the pre-logit features gives the logits
        return model.get_classifier()(f).float().cpu().numpy(), f.float().cpu().numpy()


def _stack(out: list[Any], model: nn.Module, with_features: bool, style: StyleSpec | None = None,
           sdims: list[int] | None = None) -> Any:
    n_cls = getattr(model, "num_classes", 0)
    if not with_features:
        return np.concatenate(out) if out else np.zeros((0, n_cls), np.float32)
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0)
    if style is not None:
        if not out:
            return (np.zeros((0, n_cls), np.float32), np.zeros((0, dim), np.float32),
                    np.zeros((0, sum(sdims)), np.float32) if sdims else None)
        return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
                np.concatenate([o[2] for o in out]) if sdims else None)
    if not out:
        return np.zeros((0, n_cls), np.float32), np.zeros((0, dim), np.float32)
    return np.concatenate([z for z, _ in out]), np.concatenate([f for _, f in out])


def _style_of(model: nn.Module, style: StyleSpec | None) -> tuple[StyleSpec | None, list[int] | None]:
    """(the spec to compute in the forward pass or None, its widths); a backbone that cannot give style
    statistics gets None for the style part of its results."""
    if style is None:
        return None, None
    dims = style_dims(model, style)
    return (style if dims else None), dims


@torch.inference_mode()
def logits_of_items(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess, decoded: DecodedImageCache,
                    batch_size: int = 32, should_cancel: Callable[[], bool] | None = None,
                    runtime: Runtime | None = None, with_features: bool = False,
                    style: StyleSpec | None = None) -> Any:
    """Raw logits (N, C) of dataset items (eval preprocessing on cached pixels), on ``runtime``'s device;
    with ``with_features``, (logits, pre-logit features (N, D)) of the same forward pass; with ``style`` too,
    (logits, features, style statistics (N, S) or None when the backbone cannot give them)."""
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    spec, sdims = _style_of(model, style if with_features else None)
    run = model
    if fold_wanted(len(items)):  # batch norms folded (tl_core.models.folding)
        with torch.inference_mode(False):
            copy_ = folded(model)
        run = copy_ if copy_ is not None else model
    out = []
    with contextlib.closing(eval_batches(items, batched(range(len(items)), batch_size), pre, decoded)) as feed:
        for _, x in feed:  # the next batch decodes while this one runs
            if should_cancel and should_cancel():
                raise CancelledError("Cancelled during evaluation.")
            o = forward_batch(run, x, rt, with_features, spec)
            out.append(o if spec is not None or style is None or not with_features else (*o, None))
    return _stack(out, model, with_features, style if with_features else None, sdims)


@torch.inference_mode()
def logits_of_images(model: nn.Module, images: Sequence[Any], pre: Preprocess, batch_size: int = 32,
                     runtime: Runtime | None = None, with_features: bool = False,
                     style: StyleSpec | None = None) -> Any:
    """Raw logits (N, C) of RGB Pillow images, on ``runtime``'s device; with ``with_features``, (logits,
    pre-logit features (N, D)); with ``style`` too, (logits, features, style statistics or None)."""
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    spec, sdims = _style_of(model, style if with_features else None)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([pre.eval_from_pil(im) for im in images[start:start + batch_size]])
        o = forward_batch(model, x, rt, with_features, spec)
        out.append(o if spec is not None or style is None or not with_features else (*o, None))
    return _stack(out, model, with_features, style if with_features else None, sdims)


@dataclass(frozen=True)
class CachedFeatures:
    """Where a linear run's probe input comes from: its frozen backbone's entries in the feature cache.

    Attributes:
        cache: the namespace ``feature_key(backbone, weights fingerprint, preprocessing, variant)`` of the
            features extracted for the variant (``depths``: the unscaled concatenation, as training caches it).
        variant: ``last``, ``depths`` or ``flip`` (:mod:`tl_core.models.feature_variants`).
        last_dim: width of the last-layer features (the first columns of a ``depths`` vector).
        block_dims: widths of the other depths' blocks (``depths`` only).
        scales: the run's block scales (``depths`` only), as its saved wrapper applies them.
        last_cache: for ``depths``, the last-layer namespace, which a depths extraction also fills (as in training).
        style_cache: the namespace of the backbone's style statistics (:func:`~tl_core.models.features.style_key`;
            filled by training and by every prediction that asks for them).
    """

    cache: FeatureCache
    variant: str = "last"
    last_dim: int = 0
    block_dims: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    last_cache: FeatureCache | None = None
    style_cache: FeatureCache | None = None


def _extractor_of(model: nn.Module, variant: str) -> nn.Module:
    """The module whose pooled features are what ``variant`` caches, sharing the loaded ``model``'s weights: the
    plain timm model for ``last``, an unscaled wrapper around the saved wrapper's backbone otherwise."""
    if variant == "last":
        return model
    return VariantModel(model.backbone, variant, 0, n_blocks=len(model.block_dims) or None, own_head=False)


def logits_via_cache(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess, decoded: DecodedImageCache,
                     source: CachedFeatures, batch_size: int = 32, should_cancel: Callable[[], bool] | None = None,
                     runtime: Runtime | None = None, with_features: bool = False,
                     progress: Callable[[int, int], None] | None = None, style: StyleSpec | None = None) -> Any:
    """Raw logits (N, C) of a linear run's ``model`` on ``items``: its head on the probe's features, read from the
    feature cache where they are, extracted (and cached) where not. Equal to :func:`logits_of_items` (the whole
    network on every image) up to float rounding; with ``with_features``, (logits, pre-logit features (N, D)),
    the features being those the head sees (scaled for ``depths``); ``progress`` is called with (done, total).
    With ``style`` too, (logits, features, style statistics or None), the style cached in ``source.style_cache``."""
    rt = runtime or Runtime.cpu()
    spec = style if with_features else None
    raw = extract_features(_extractor_of(model, source.variant), items, pre, decoded, source.cache,
                           batch_size=batch_size, progress=progress, should_cancel=should_cancel, runtime=rt,
                           last_cache=source.last_cache, style=spec, style_cache=source.style_cache)
    sty = None
    if spec is not None:
        raw, sty = raw
    dim = source.last_dim + sum(source.block_dims) if source.variant == "depths" else source.last_dim
    if not len(items):
        raw = np.zeros((0, dim), np.float32)
    feats = apply_variant(raw, source.variant, source.last_dim, list(source.block_dims),
                          np.asarray(source.scales, np.float64) if source.scales else None)
    feats = np.ascontiguousarray(feats, np.float32)
    clf = model.get_classifier()
    with torch.inference_mode():
        x = torch.from_numpy(feats).to(next(clf.parameters()).device)
        logits = clf(x).float().cpu().numpy()
    if spec is not None:
        return logits, feats, sty
    return (logits, feats) if with_features else logits

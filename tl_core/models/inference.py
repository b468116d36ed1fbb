"""Running a trained model over images: raw logits (N, C), batched, eval preprocessing, under
``torch.inference_mode()``. Probabilities come from :func:`tl_core.models.metrics.softmax` with the run's
temperature, in one place. ``with_features=True`` also returns the pre-logit features (what the classifier head
sees; the open-set score's input) from the same forward pass."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..cache import DecodedImageCache
from ..data.intake import ImageItem
from ..errors import CancelledError
from .devices import Runtime
from .features import pooled_features
from .pipeline import batched, eval_batches
from .preprocess import Preprocess

__all__ = ["logits_of_items", "logits_of_images"]


def _forward(model: nn.Module, x: torch.Tensor, rt: Runtime, with_features: bool = False) -> Any:
    x = x.to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with rt.autocast():
        if not with_features:
            return model(x).float().cpu().numpy()
        f = pooled_features(model, x)  # timm: the classifier applied to the pre-logit features gives the logits
        return model.get_classifier()(f).float().cpu().numpy(), f.float().cpu().numpy()


def _stack(out: list[Any], model: nn.Module, with_features: bool) -> Any:
    n_cls = getattr(model, "num_classes", 0)
    if not with_features:
        return np.concatenate(out) if out else np.zeros((0, n_cls), np.float32)
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0)
    if not out:
        return np.zeros((0, n_cls), np.float32), np.zeros((0, dim), np.float32)
    return np.concatenate([z for z, _ in out]), np.concatenate([f for _, f in out])


@torch.inference_mode()
def logits_of_items(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess, decoded: DecodedImageCache,
                    batch_size: int = 32, should_cancel: Callable[[], bool] | None = None,
                    runtime: Runtime | None = None, with_features: bool = False) -> Any:
    """Raw logits (N, C) of dataset items (eval preprocessing on cached pixels), on ``runtime``'s device;
    with ``with_features``, (logits, pre-logit features (N, D)) of the same forward pass."""
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    out = []
    with contextlib.closing(eval_batches(items, batched(range(len(items)), batch_size), pre, decoded)) as feed:
        for _, x in feed:  # the next batch decodes while this one runs
            if should_cancel and should_cancel():
                raise CancelledError("Cancelled during evaluation.")
            out.append(_forward(model, x, rt, with_features))
    return _stack(out, model, with_features)


@torch.inference_mode()
def logits_of_images(model: nn.Module, images: Sequence[Any], pre: Preprocess, batch_size: int = 32,
                     runtime: Runtime | None = None, with_features: bool = False) -> Any:
    """Raw logits (N, C) of RGB Pillow images, on ``runtime``'s device; with ``with_features``, (logits,
    pre-logit features (N, D))."""
    rt = runtime or Runtime.cpu()
    model.eval().to(rt.device)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([pre.eval_from_pil(im) for im in images[start:start + batch_size]])
        out.append(_forward(model, x, rt, with_features))
    return _stack(out, model, with_features)

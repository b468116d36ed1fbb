"""An inference-only copy of a frozen network with its batch norms folded into the convolutions before them.

In eval mode a batch norm is an affine map per channel, ``y = x * s + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``; after a convolution it can be folded into the convolution's weights and bias
(``W' = W * s``, ``b' = b * s + t``), so the forward pass skips it. Batch norm was about a quarter of
EfficientNet-Lite0's PyTorch forward pass on the 2-core build machine; the folded copy ran a batch of 32 1.28x
(last layer) and 1.40x (several depths) as fast (benchmarks/RESULTS.md, row 1i), its features within 1.3e-5 of
the original's (values up to ~6).
ONNX Runtime folds them itself when it optimises its graph; this is the same for the PyTorch engine
(:class:`~tl_core.models.engines.FeatureEngine`), which runs the first model of a fresh workspace, torchrun and
GPU work.

The network itself is never changed (fine-tuning goes on from the very weights the probe's features came from):
:func:`folded_copy` folds a deep copy. A batch norm is folded only where module order makes the pairing sure (the
leaf module just before it, in the same parent, is a :class:`~torch.nn.Conv2d` with as many output channels), and
only for the two kinds whose eval forward is known (``torch.nn.BatchNorm2d``, and timm's ``BatchNormAct2d``, whose
activation stays); the copy must then give the original's output on a check input, else it is not used.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..settings import setting

__all__ = ["folded_copy", "folded", "fold_wanted", "FOLD_TOLERANCE", "FOLD_CHECK_SIZE", "FOLD_MIN_IMAGES"]

log = logging.getLogger(__name__)

#: ``TL_FOLD_BN=auto`` folds for a job of this many images or more: a copy costs a deep copy and a small check pass
#: (made again after every change of the weights, e.g. a fine-tune's epoch), while a 32-image forward pass saves far
#: more (Lite0: 1.28-1.40x as fast, row 1i); a one-image prediction would pay more than it saves
FOLD_MIN_IMAGES = 32
#: the side of the random image the copy is compared with the original on (a network of one fixed input size gets
#: an image of that size instead)
FOLD_CHECK_SIZE = 64
#: the largest max-abs difference, relative to the output's largest value (at least 1), the copy may show
FOLD_TOLERANCE = 1e-4


def fold_wanted(n_images: int) -> bool:
    """Whether a job of ``n_images`` runs a folded copy (``TL_FOLD_BN``: auto, on, off)."""
    mode = setting("TL_FOLD_BN")
    return mode == "on" or (mode == "auto" and n_images >= FOLD_MIN_IMAGES)


def _norm_kind(m: nn.Module) -> str | None:
    """``"bn"`` for a plain batch norm, ``"bn_act"`` for timm's BatchNormAct2d, else None (not folded)."""
    if type(m) is nn.BatchNorm2d:
        return "bn"
    if type(m).__name__ == "BatchNormAct2d" and type(m).__module__.startswith("timm."):
        return "bn_act"
    return None


def _pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]]:
    """(parent, the norm's attribute name, conv, norm) for each foldable convolution -> batch norm pair."""
    out = []

    def walk(parent: nn.Module) -> None:
        prev: nn.Module | None = None  # the previous leaf-like child in this parent
        for name, child in parent.named_children():
            kind = _norm_kind(child)
            if kind is not None:
                bn = child
                if (isinstance(prev, nn.Conv2d) and prev.out_channels == bn.num_features
                        and bn.running_mean is not None and bn.running_var is not None):
                    out.append((parent, name, prev, bn))
                prev = child
            elif any(True for _ in child.children()):
                walk(child)
                prev = None  # a container in between: the pairing is no longer sure
            else:
                prev = child
    walk(model)
    return out


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv``'s weights and bias (in place)."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        w = conv.weight
        conv.weight.copy_((w.float() * scale.view(-1, *([1] * (w.ndim - 1)))).to(w.dtype))
        bias = shift if conv.bias is None else conv.bias.float() * scale + shift
        conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)


def folded_copy(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                check: torch.Tensor | None = None) -> nn.Module | None:
    """A copy of the eval-mode ``model`` with its batch norms folded into the convolutions before them.

    Args:
        model: the frozen network (left unchanged; the copy is in eval mode, without gradients).
        forward: what the copy is used for, ``forward(module, x) -> tensor`` (default: ``module(x)``).
        check: an input to compare the copy with the original on (default: one random image of
            :data:`FOLD_CHECK_SIZE` pixels a side, then one of the
            model's ``default_cfg`` input size if that fails).
    Returns:
        the folded copy, or None when nothing could be folded or the copy's output on ``check`` differs from the
        original's by more than :data:`FOLD_TOLERANCE` (relative), or the check input does not run.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) or not _pairs(model):
        return None
    run = forward or (lambda m, x: m(x))
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    for p in copy_.parameters():
        p.grad = None  # a model in training carries gradients; its copy has no use for them
    pairs = _pairs(copy_)
    for parent, name, conv, bn in pairs:
        _fold(conv, bn)
        setattr(parent, name, nn.Sequential(bn.drop, bn.act) if _norm_kind(bn) == "bn_act" else nn.Identity())
    try:
        with torch.inference_mode(False), torch.no_grad():
            if check is None:
                gen = torch.Generator().manual_seed(0)
                device = next(model.parameters()).device
                check = torch.randn(1, 3, FOLD_CHECK_SIZE, FOLD_CHECK_SIZE, generator=gen).to(device)
                try:
                    ref = run(model, check)
                except Exception:  # a network of one fixed input size
                    size = (getattr(model, "default_cfg", None) or {}).get("input_size", (3, 224, 224))
                    check = torch.randn(1, *size, generator=gen).to(device)
                    ref = run(model, check)
            else:
                ref = run(model, check)
            got = run(copy_, check)
    except Exception as e:  # noqa: BLE001 - the original network is used instead
        log.info("batch-norm folding not used: the check input did not run (%s)", type(e).__name__)
        return None
    diff = float((got.float() - ref.float()).abs().max())
    bound = FOLD_TOLERANCE * max(1.0, float(ref.float().abs().max()))
    if not diff <= bound:
        log.warning("batch-norm folding not used: the folded copy differs by %.2e (> %.2e)", diff, bound)
        return None
    log.debug("batch norms folded: %d, check max abs diff %.1e", len(pairs), diff)
    return copy_


_memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {forward: (signature, copy or None)}
_memo_lock = threading.Lock()


def _signature(model: nn.Module) -> tuple:
    """What the folded copy was made from: each parameter's and buffer's storage, version counter (bumped by
    every in-place change, an optimiser step included; an inference tensor has none), shape and device, and the
    training flag."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, tuple(t.shape), str(t.device))
                 for t in [*model.parameters(), *model.buffers()]) + (model.training,)


def folded(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> nn.Module | None:
    """:func:`folded_copy` of ``model``, made once while its weights stay as they are (kept with the model, for
    the life of either): extraction calls the engine many times on one frozen backbone, and a copy costs a deep
    copy and a check pass."""
    sig = _signature(model)
    with _memo_lock:
        hit = _memo.get(model, {}).get(forward)
    if hit is not None and hit[0] == sig:
        return hit[1]
    copy_ = folded_copy(model, forward)
    with _memo_lock:
        _memo.setdefault(model, {})[forward] = (sig, copy_)
    return copy_

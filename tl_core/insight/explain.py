"""Grad-CAM heat-maps: which parts of an image made the model choose a class.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the channels of the last convolutional feature map by
the gradient of the class score and keeps the positive part. It is computed with captum's
:class:`~captum.attr.LayerGradCam` on the last module that outputs a spatial (N, C, H, W) map (for the
EfficientNets, the activated ``bn2`` after ``conv_head``), upsampled to the model's input crop and mapped
back onto the whole original image (outside the centre crop the heat is 0: the model never saw it).
Everything returns arrays and Pillow images; pages draw them.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.images import load_image
from ..errors import ConfigError, DatasetError, RunError
from ..metrics import softmax
from ..models.preprocess import Preprocess
from ..storage.files import PREDICTIONS, SAVED, RunFiles

__all__ = [
    "find_target_layer",
    "grad_cam",
    "colorize",
    "overlay",
    "explain_image",
    "explain_misclassified",
]

log = logging.getLogger(__name__)

_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[str, nn.Module]]" = weakref.WeakKeyDictionary()


def find_target_layer(model: nn.Module, input_size: int = 224) -> tuple[str, nn.Module]:
    """The last module of ``model`` (in execution order) whose output is a spatial map (N, C, H, W), H*W > 1.

    Args:
        model: a timm CNN.
        input_size: side of the probe input used to trace the forward pass.
    Returns:
        (qualified module name, module).
    Raises:
        ConfigError: the model has no spatial feature map (a vision transformer, for example).
    """
    hit = _LAYER_CACHE.get(model)
    if hit is not None:
        return hit
    names = {m: n for n, m in model.named_modules() if n}
    order: list[nn.Module] = []

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
            order.append(mod)

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ConfigError(f"Grad-CAM needs a convolutional backbone; {type(model).__name__} has no spatial "
                          "feature map (vision transformers are not supported).")
    layer = order[-1]
    _LAYER_CACHE[model] = (names[layer], layer)
    return names[layer], layer


def _to_original(heat: np.ndarray, size: tuple[int, int], pre: Preprocess) -> np.ndarray:
    """Map a heat-map over the model's centre crop back onto the original image (W, H) = ``size``."""
    w0, h0 = size
    w1, h1 = (pre.resize, int(pre.resize * h0 / w0)) if w0 <= h0 else (int(pre.resize * w0 / h0), pre.resize)
    s = pre.input_size
    top, left = int(round((h1 - s) / 2.0)), int(round((w1 - s) / 2.0))
    canvas = torch.zeros(1, 1, h1, w1)
    canvas[0, 0, top:top + s, left:left + s] = torch.from_numpy(heat)
    out = nn.functional.interpolate(canvas, size=(h0, w0), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)
    peak = float(out.max())
    return (out / peak if peak > 0 else out).numpy()  # resampling lowers the peak: keep the map's top at 1


def grad_cam(model: nn.Module, pre: Preprocess, image: Image.Image, target: int | None = None,
             layer: nn.Module | None = None) -> dict[str, Any]:
    """Grad-CAM of one RGB image for class ``target`` (default: the predicted class).

    Args:
        model: the classifier (eval mode is used; its weights are not changed).
        pre: its preprocessing.
        image: an RGB Pillow image (as :func:`tl_core.data.load_image` returns).
        target: class index to explain; None explains the top prediction.
        layer: the layer to attribute to; default :func:`find_target_layer`.
    Returns:
        {"heatmap": (H, W) float32 in [0, 1] over the original image, "heatmap_input": (S, S) over the
        model's input crop, "target": int, "logits": (C,) float array, "layer": name, "flat": True when the
        map is all zero (no region supports the class)}.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    if layer is None:
        name, layer = find_target_layer(model, pre.input_size)
    else:
        name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    was_training = model.training
    model.eval()
    x = pre.eval_from_pil(image).unsqueeze(0).to(next(model.parameters()).device)  # the model's device
    try:
        with torch.enable_grad():
            logits = model(x).detach()[0].float()
            t = int(logits.argmax()) if target is None else int(target)
            if not 0 <= t < logits.numel():
                raise ConfigError(f"Class index {t} is out of range (the model has {logits.numel()} classes).")
            attr = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    finally:
        model.train(was_training)
    if attr.shape[0] == 2 * x.shape[0]:  # a flipped-views model (models.feature_variants): image, then mirror
        attr = attr[:x.shape[0]] + torch.flip(attr[x.shape[0]:], dims=[3])
    up = LayerAttribution.interpolate(attr.detach().float(), (pre.input_size, pre.input_size), "bilinear")
    heat = up[0].sum(0).clamp_(min=0).cpu().numpy().astype(np.float32)
    peak = float(heat.max())
    flat = peak <= 0 or not np.isfinite(peak)
    heat = np.zeros_like(heat) if flat else heat / peak
    return {"heatmap": _to_original(heat, image.size, pre).astype(np.float32), "heatmap_input": heat,
            "target": t, "logits": logits.cpu().numpy(), "layer": name, "flat": flat}


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """A 'jet' colour map of a [0, 1] heat-map: (H, W, 3) uint8 (blue = cold, red = hot).

    Args:
        heatmap: (H, W) values in [0, 1].
    Returns:
        RGB uint8 array.
    """
    x = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3.0, 2.0, 1.0)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The heat-map blended over the image (same size as the image).

    Args:
        image: RGB Pillow image.
        heatmap: (H, W) in [0, 1], the image's size (as :func:`grad_cam` returns).
        alpha: weight of the heat colours.
    Returns:
        An RGB Pillow image.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if heatmap.shape != base.shape[:2]:
        heatmap = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR))
    out = (1 - alpha) * base + alpha * colorize(heatmap).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), mode="RGB")


def _model_for(run: Any, image: Any, device: str = "cpu") -> Any:
    """The model that explains ``image`` under ``run``: a loaded model is used as it is; for a run directory,
    an image the run evaluated on validation is explained with the model that produced that prediction (the
    training-only head of a refitted linear run), any other image with the saved model."""
    from ..share.loading import TrainedModel, load_model

    if isinstance(run, TrainedModel):
        return run
    p = Path(run)
    head = SAVED
    if p.is_dir() and not isinstance(image, Image.Image):
        files = RunFiles(p)
        if files.has(PREDICTIONS):
            for split in files.predictions().splits.values():
                if split.index_of(image) is not None:
                    head = split.model
                    break
    return load_model(p, head=head, device=device)


def explain_image(run: Any, image: str | os.PathLike | Image.Image, target: int | str | None = None,
                  out: str | os.PathLike | None = None, top_k: int = 3, alpha: float = 0.45,
                  device: str = "cpu") -> dict[str, Any]:
    """Grad-CAM of one image under a trained model, with its prediction and an overlay.

    Args:
        run: a :class:`tl_core.share.loading.TrainedModel`, run directory or bundle. For a run directory and
            one of the run's validation images, the model that produced the run's validation prediction is
            explained (see :func:`_model_for`), so the label and confidence agree with the Evaluate page.
        image: image path or RGB Pillow image.
        target: class name or index to explain; default the predicted class.
        out: also write the overlay here as PNG.
        top_k: predictions listed.
        alpha: overlay blend weight.
        device: where a model loaded here runs (auto, cpu, cuda, mps).
    Returns:
        {"label", "confidence" (the run's temperature applied), "top_k": [{label, confidence}],
        "target" (class name explained), "heatmap", "overlay" (Pillow image), "layer", "flat",
        "size": [W, H], "out" (path or None), "model" ("saved" or "validation-fit": which head explained it)}.
    Raises:
        DatasetError: the image cannot be read; ConfigError: unknown target class.
    """
    tm = _model_for(run, image, device)
    img = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    t: int | None
    if isinstance(target, str):
        if target not in tm.classes:
            raise ConfigError(f"Unknown class {target!r}; the model knows {', '.join(tm.classes)}.")
        t = tm.classes.index(target)
    else:
        t = target
    cam = grad_cam(tm.model, tm.pre, img, t)
    probs = softmax(cam["logits"], tm.temperature)
    order = np.argsort(-probs, kind="stable")[:max(1, top_k)]
    ov = overlay(img, cam["heatmap"], alpha)
    if out is not None:
        out = Path(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            ov.save(out, format="PNG")
        except OSError as e:
            raise DatasetError(f"Could not write {out} ({e.strerror or e}); choose a writable path.") from None
    return {"label": tm.classes[int(order[0])], "confidence": float(probs[order[0]]),
            "top_k": [{"label": tm.classes[int(i)], "confidence": float(probs[i])} for i in order],
            "target": tm.classes[cam["target"]], "heatmap": cam["heatmap"], "overlay": ov,
            "layer": cam["layer"], "flat": cam["flat"], "size": list(img.size),
            "out": str(out) if out is not None else None, "model": tm.head}


def explain_misclassified(run: str | os.PathLike, k: int = 12, target: str = "predicted", split: str = "val",
                          alpha: float = 0.45, device: str = "auto") -> list[dict[str, Any]]:
    """Grad-CAM for a run's misclassified images, most confidently wrong first (the Evaluate grid).

    The mistakes, their labels and confidences are the run's saved predictions (as the Mistakes view shows
    them), and each heat-map is computed with the model that made those predictions.

    Args:
        run: a run directory.
        k: at most this many images.
        target: ``predicted`` (why it said the wrong class) or ``true`` (what it saw of the right one).
        split: ``val`` or ``test``.
        alpha: overlay blend weight.
    Returns:
        [{"path", "true", "predicted", "confidence", "target", "heatmap", "overlay", "flat", "model"}]; images
        that no longer exist are skipped.
    Raises:
        RunError: the run has no saved predictions.
    """
    from ..share.loading import load_model

    if target not in ("predicted", "true"):
        raise ConfigError(f"target must be 'predicted' or 'true' (got {target!r}).")
    files = RunFiles(Path(run))
    saved = files.predictions().get(split)
    if saved is None:
        raise RunError(f"Run {files.where} recorded no {split} predictions.")
    meta = files.meta()
    wrong = saved.mistakes(meta.classes, meta.temperature)
    if not wrong:
        return []
    tm = load_model(Path(run), head=saved.model, device=device)
    out = []
    for r in wrong:
        if len(out) >= k:
            break
        try:
            res = explain_image(tm, r["path"], target=r["predicted"] if target == "predicted" else r["true"],
                                alpha=alpha)
        except DatasetError as e:
            log.warning("skipping %s: %s", r["path"], e)
            continue
        out.append({"path": r["path"], "true": r["true"], "predicted": r["predicted"], "confidence": r["confidence"],
                    "target": res["target"], "heatmap": res["heatmap"], "overlay": res["overlay"],
                    "flat": res["flat"], "model": tm.head, "model_label": res["label"],
                    "model_confidence": res["confidence"]})
    return out

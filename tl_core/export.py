"""Loading a trained model (run directory or bundle), evaluation on a dataset, batch prediction, export.

A run directory and a bundle hold the same files (``model.safetensors``, ``meta.json``,
``config.json``, ``metrics.json``); a bundle is a zip of them plus a model card, so it loads with no
access to the workspace that made it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import (IMAGE_EXTENSIONS, DecodedImageCache, ImageItem, file_sha256, image_from_bytes, load_image,
                   open_dataset, safe_extract_zip)
from .errors import DatasetError, ExportError, TLError
from .evaluate import compute_metrics, predict_items, top_losses
from .transforms import Preprocess

__all__ = ["TrainedModel", "load_model", "evaluate_dataset", "predict_paths", "predict_pil",
           "write_predictions_csv", "export_run", "model_card", "BUNDLE_FILES"]

BUNDLE_FILES = ("model.safetensors", "meta.json", "config.json")


@dataclass
class TrainedModel:
    """A model ready to predict: the network, its classes and its exact preprocessing."""

    model: nn.Module
    classes: list[str]
    pre: Preprocess
    meta: dict[str, Any]
    config: dict[str, Any]
    source: str
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))


def _build(meta: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    import timm

    arch = meta.get("arch") or meta.get("backbone")
    try:
        model = timm.create_model(str(arch).split(".")[0], pretrained=False, num_classes=int(meta["num_classes"]))
    except Exception as e:
        raise ExportError(f"{where}: cannot build architecture {arch!r} ({e}).") from None
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if k in state and state[k].shape != v.shape]
    if wrong:
        k, got, need = wrong[0]
        raise ExportError(f"{where}: tensor {k} has shape {got} but {arch} with {meta['num_classes']} classes needs {need}; "
                          "the model file does not match its meta.json.")
    if missing:
        raise ExportError(f"{where}: {len(missing)} tensors missing from the model file (e.g. {missing[0]}).")
    model.load_state_dict(state, strict=False)
    return model.eval().to(memory_format=torch.channels_last)


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or not {"classes", "num_classes", "data_config"} <= set(meta):
        raise ExportError(f"{where}: meta.json lacks classes/num_classes/data_config; not a TL Studio model.")
    if len(meta["classes"]) != int(meta["num_classes"]):
        raise ExportError(f"{where}: meta.json lists {len(meta['classes'])} classes but says num_classes={meta['num_classes']}.")
    return meta


def load_model(ref: str | os.PathLike) -> TrainedModel:
    """Load a run directory or a ``.zip`` bundle for prediction (weights via safetensors only).

    Raises:
        ExportError: files missing, weights not safetensors, shapes that do not match, damaged archive.
    """
    from safetensors.torch import load as st_load, load_file

    p = Path(ref)
    if p.is_dir():
        missing = [f for f in BUNDLE_FILES if not (p / f).is_file()]
        if missing:
            raise ExportError(f"{p} is not a trained run: {', '.join(missing)} missing.")
        try:
            meta = _check_meta(json.loads((p / "meta.json").read_text()), p.name)
            config = json.loads((p / "config.json").read_text())
            state = load_file(str(p / "model.safetensors"))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{p}: model files are damaged ({e}).") from None
        metrics = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else {}
    elif p.is_file():
        try:
            zf = zipfile.ZipFile(p)
        except (zipfile.BadZipFile, OSError) as e:
            raise ExportError(f"{p.name} is not a readable bundle zip ({e}).") from None
        with zf:
            names = set(zf.namelist())
            if "model.safetensors" not in names and any(n.endswith((".pth", ".pt", ".pkl", ".bin")) for n in names):
                raise ExportError(f"{p.name} holds pickled weights instead of model.safetensors; refused "
                                  "(pickles can run code). Export the bundle again with TL Studio.")
            missing = [f for f in BUNDLE_FILES if f not in names]
            if missing:
                raise ExportError(f"{p.name} is not a complete TL Studio bundle: {', '.join(missing)} missing.")
            try:
                meta = _check_meta(json.loads(zf.read("meta.json")), p.name)
                config = json.loads(zf.read("config.json"))
                state = st_load(zf.read("model.safetensors"))
                metrics = json.loads(zf.read("metrics.json")) if "metrics.json" in names else {}
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"{p.name}: a file inside the bundle is damaged ({str(e)[:200]}).") from None
    else:
        raise ExportError(f"{p} is neither a run directory nor a bundle .zip.")
    model = _build(meta, state, p.name)
    return TrainedModel(model=model, classes=list(meta["classes"]), pre=Preprocess(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()}),
        meta=meta, config=config, source=str(p), metrics=metrics)


def evaluate_dataset(tm: TrainedModel, data: str | os.PathLike, workspace: Any = None) -> dict[str, Any]:
    """Evaluate on a labelled dataset: its ``test`` split when it has one, otherwise every image.

    Returns:
        accuracy, classes, confusion (rows = true class), per_class, count, evaluated, top_losses.
    Raises:
        DatasetError: the data has classes the model does not know.
    """
    src = Path(data)
    extract = None
    if workspace is not None and not src.is_dir():
        extract = workspace.datasets_dir / src.stem
    ds = open_dataset(src, extract_dir=extract, min_per_class=1)
    items = [i for i in ds.items if i.split == "test"]
    evaluated = "test split"
    if not items:
        items, evaluated = list(ds.items), "all images"
    unknown = sorted({i.label for i in items} - set(tm.classes))
    if unknown:
        raise DatasetError(f"The data has classes the model was not trained on: {', '.join(unknown[:10])}; "
                           f"the model knows {', '.join(tm.classes)}.")
    cidx = {c: i for i, c in enumerate(tm.classes)}
    cache = DecodedImageCache(workspace.cache_dir / "decoded" if workspace is not None else None)
    probs = predict_items(tm.model, items, tm.pre, cache, temperature=tm.temperature)
    y = [cidx[i.label] for i in items]
    rep = compute_metrics(y, probs, tm.classes)
    rep["evaluated"] = evaluated
    rep["skipped"] = [{"path": s.path, "reason": s.reason} for s in ds.skipped]
    rep["top_losses"] = top_losses([str(i.path) for i in items], y, probs, tm.classes, k=20)
    return rep


def _expand(paths: Iterable[str | os.PathLike], tmp: Path) -> tuple[list[Path], list[dict[str, str]]]:
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file() and p.suffix.lower() == ".zip":
            try:
                dest, sk, _ = safe_extract_zip(p, tmp / f"zip{len(files)}-{p.stem}")
            except DatasetError as e:
                skipped.append({"path": str(p), "reason": str(e)})
                continue
            skipped += [{"path": f"{p.name}/{s.path}", "reason": s.reason} for s in sk]
            files += sorted(f for f in dest.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            skipped.append({"path": str(p), "reason": "not found"})
    return files, skipped


def predict_pil(tm: TrainedModel, images: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
    """Top-k predictions for RGB Pillow images: label, confidence, top_k [{label, confidence}]."""
    from .evaluate import predict_images

    probs = predict_images(tm.model, images, tm.pre, temperature=tm.temperature)
    return [_row(p, tm.classes, top_k) for p in probs]


def _row(p: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    order = np.argsort(-p)[:max(1, top_k)]
    return {"label": classes[int(order[0])], "confidence": float(p[order[0]]),
            "top_k": [{"label": classes[int(i)], "confidence": float(p[i])} for i in order]}


def predict_paths(tm: TrainedModel, paths: Iterable[str | os.PathLike], top_k: int = 3,
                  batch_size: int = 32) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Predict image files, folders and zips. Unreadable files are skipped with a reason.

    Returns:
        (rows of {path, label, confidence, top_k}, skipped [{path, reason}])
    """
    from .evaluate import predict_images

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tl-predict-") as tmp:
        files, skipped = _expand(paths, Path(tmp))
        for start in range(0, len(files), batch_size):
            batch, names = [], []
            for f in files[start:start + batch_size]:
                try:
                    batch.append(load_image(f))
                    names.append(str(f))
                except DatasetError as e:
                    skipped.append({"path": str(f), "reason": str(e).split(": ", 1)[-1]})
            if batch:
                probs = predict_images(tm.model, batch, tm.pre, temperature=tm.temperature)
                rows += [{"path": n, **_row(p, tm.classes, top_k)} for n, p in zip(names, probs)]
    return rows, skipped


def write_predictions_csv(rows: Sequence[dict[str, Any]], out: str | os.PathLike | io.StringIO) -> None:
    """CSV with path, label, confidence, and top-k as 'label:conf;label:conf'."""
    own = not isinstance(out, io.StringIO)
    f = open(out, "w", newline="", encoding="utf-8") if own else out
    try:
        w = csv.writer(f)
        w.writerow(["path", "label", "confidence", "top_k"])
        for r in rows:
            w.writerow([r["path"], r["label"], f"{r['confidence']:.6f}",
                        ";".join(f"{t['label']}:{t['confidence']:.6f}" for t in r["top_k"])])
    finally:
        if own:
            f.close()


def model_card(meta: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A Markdown model card: intended use, backbone, data, config, metrics, limitations and bias caveat."""
    ds = meta.get("dataset", {})
    val = (metrics or {}).get("val") or {}
    test = (metrics or {}).get("test") or {}
    w = meta.get("weights", {})
    lines = [
        f"# Model card: {', '.join(meta['classes'][:6])}{' …' if len(meta['classes']) > 6 else ''} classifier",
        "",
        "## Intended use",
        f"Classifies an image into one of {meta['num_classes']} classes: {', '.join(meta['classes'])}. "
        "Made with TL Studio by transfer learning; meant for images like the training images. It always answers "
        "with one of these classes, even for images that belong to none of them.",
        "",
        "## Backbone",
        f"- Architecture: `{meta.get('arch')}` ({meta.get('backbone')}), weights: {w.get('source')} ({w.get('detail')})",
        "- Pretraining data: ImageNet-1k photographs (1.28 M images, 1000 classes), unless the weights say otherwise.",
        f"- Preprocessing: {json.dumps(meta.get('preprocess'))}",
        "",
        "## Training data",
        f"- Source: `{ds.get('source')}` (fingerprint {ds.get('fingerprint')}), {ds.get('num_images')} images",
        f"- Images per class: {json.dumps(ds.get('counts'))}; imbalance ratio {ds.get('imbalance_ratio')}",
        f"- Split: {json.dumps(ds.get('split'))}; skipped files: {len(ds.get('skipped') or [])}",
        "",
        "## Training configuration",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        f"- Validation accuracy: {val.get('accuracy')} on {val.get('count')} images; macro F1 {val.get('macro_f1')}; "
        f"expected calibration error {val.get('ece')}",
    ]
    if test:
        lines.append(f"- Held-out test accuracy: {test.get('accuracy')} on {test.get('count')} images")
    if val.get("per_class"):
        lines += ["", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c} | {r['precision']} | {r['recall']} | {r['f1']} | {r['support']} |" for c, r in val["per_class"].items()]
    if val.get("confusion"):
        lines += ["", "Confusion matrix (rows = true class, columns = predicted):", "",
                  "| | " + " | ".join(meta["classes"]) + " |", "|" + " --- |" * (len(meta["classes"]) + 1)]
        lines += [f"| {c} | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(meta["classes"], val["confusion"])]
    lines += [
        "",
        "## Limitations and caveats",
        "- Validated on a small held-out split: accuracy on new images can differ, especially for images unlike the "
        "training set (other cameras, lighting, drawings vs photos).",
        "- The pretrained backbone carries the biases of its pretraining data (ImageNet over-represents some "
        "regions, objects and people and under-represents others); the fine-tuned model inherits them.",
        "- Confidence scores are not guaranteed to be calibrated unless temperature scaling was applied.",
    ]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict[str, Any]:
    """Export a run as ``bundle`` (zip), ``onnx`` or ``torchscript``; ONNX/TorchScript are verified.

    Returns:
        {path, format, bytes, verified: {...}}
    """
    run_dir, out = Path(run_dir), Path(out)
    tm = load_model(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "bundle":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in BUNDLE_FILES + ("metrics.json",):
                if (run_dir / f).exists():
                    zf.write(run_dir / f, f)
            zf.writestr("MODEL_CARD.md", model_card(tm.meta, tm.config, tm.metrics))
            zf.writestr("README.txt", "TL Studio model bundle.\n\nPredict: tl-core predict THIS.zip image.jpg ...\n"
                        "Python: from tl_core.export import load_bundle; m = load_bundle('THIS.zip')\n")
        return {"path": str(out), "format": fmt, "bytes": out.stat().st_size}
    raise ExportError(f"Export format {fmt!r} is not available yet; use --format bundle.")


load_bundle = load_model

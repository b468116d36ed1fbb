"""Loading a trained model (run directory or bundle), evaluation, batch prediction, model card, export.

A run directory and a bundle hold the same files (``model.safetensors``, ``meta.json``,
``config.json``, ``metrics.json``); a bundle is a zip of them plus ``MODEL_CARD.md``, ``README.txt`` and
``manifest.json`` (SHA-256 of every file), so it loads with no access to the workspace that made it.
Everything read from a bundle is validated before use: weights only through safetensors (a pickle is
refused: it can run code), every tensor's name and shape against the architecture in ``meta.json``,
JSON syntax, checksums, sizes.

ONNX and TorchScript exports take a normalised NCHW float32 batch and return two outputs,
``probs`` (softmax of logits / temperature: what ``tl-core predict`` reports) and ``logits``. The
preprocessing that turns an image into that batch is written next to the model as ``<file>.json``.
Every export is verified before it is kept: the exported model runs (onnxruntime / ``torch.jit.load``)
on real images of the run and must agree with PyTorch, same top-1 on every image and probabilities
within ``PARITY_TOLERANCE``; otherwise the file is deleted and :class:`ExportError` raised.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .data import IMAGE_EXTENSIONS, DecodedImageCache, load_image, open_dataset, safe_extract_zip
from .errors import DatasetError, ExportError
from .evaluate import calibration, compute_metrics, predict_items, top_losses
from .transforms import Preprocess

__all__ = [
    "BUNDLE_FILES",
    "EXPORT_FORMATS",
    "MODEL_FORMAT",
    "ONNX_OPSET",
    "PARITY_TOLERANCE",
    "TrainedModel",
    "load_model",
    "load_bundle",
    "evaluate_dataset",
    "predict_paths",
    "predict_pil",
    "write_predictions_csv",
    "predictions_csv",
    "model_card",
    "export_run",
    "export_for_download",
]

log = logging.getLogger(__name__)

#: Files a run directory or bundle must hold.
BUNDLE_FILES = ("model.safetensors", "meta.json", "config.json")
#: ``meta.json`` format this version writes and reads.
MODEL_FORMAT = "tl-studio-model/1"
#: The formats of :func:`export_run`, with what each is for (the app shows these).
EXPORT_FORMATS = {
    "bundle": "Zip with safetensors weights, config, classes, preprocessing, metrics and a model card; "
              "loads with `tl-core predict BUNDLE images...` anywhere TL Studio is installed.",
    "onnx": "ONNX model (opset 18, dynamic batch) for onnxruntime and other runtimes, with a JSON sidecar "
            "of classes and preprocessing; verified against PyTorch after export.",
    "torchscript": "TorchScript (torch.jit.trace) for C++/Python PyTorch without TL Studio or timm, with the "
                   "same JSON sidecar; verified against PyTorch after export. TorchScript is deprecated upstream: "
                   "prefer ONNX for new deployments.",
}
#: ONNX opset: 18 covers every op of the catalogue's CNNs and ViTs (LayerNormalization needs 17) and
#: runs on onnxruntime >= 1.14.
ONNX_OPSET = 18
#: Largest allowed |p_exported - p_pytorch| over every image and class.
PARITY_TOLERANCE = 1e-4
#: How many images a verification uses at most.
VERIFY_IMAGES = 32

_EXTENSIONS = {"bundle": "zip", "onnx": "onnx", "torchscript": "pt"}
_MAX_JSON_BYTES = 32 * 1024**2
_MAX_WEIGHTS_BYTES = 4 * 1024**3
_INTERPOLATIONS = {"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"}
_PICKLED_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt")


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

    @property
    def refitted(self) -> bool:
        return refitted(self.meta)


def refitted(meta: dict[str, Any]) -> bool:
    """Whether a run's saved head was refitted on training + validation images (linear, ``TrainConfig.refit``):
    its outputs on the validation images are then in-sample."""
    return meta.get("fit_on") == "train+val"


# --------------------------------------------------------------------------------------------------
# reading and validating a run directory or a bundle
# --------------------------------------------------------------------------------------------------
def _looks_pickled(data: bytes) -> bool:
    """torch.save output: a zip (``PK``) or a raw pickle (protocol 2+ starts with 0x80)."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _read_run_files(p: Path) -> tuple[dict[str, bytes], str]:
    """The model files of a run directory or bundle zip, as bytes, with size caps; and a display name."""
    wanted = BUNDLE_FILES + ("metrics.json", "manifest.json")
    files: dict[str, bytes] = {}
    if p.is_dir():
        names = {f.name for f in p.iterdir() if f.is_file()}
        if "model.safetensors" not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
            raise ExportError(f"{p.name} holds pickled weights instead of model.safetensors; refused (pickles can run "
                              "code). Train or export the model again with TL Studio.")
        missing = [f for f in BUNDLE_FILES if f not in names]
        if missing:
            raise ExportError(f"{p} is not a trained run: {', '.join(missing)} missing.")
        for f in wanted:
            if f in names:
                size = (p / f).stat().st_size
                limit = _MAX_WEIGHTS_BYTES if f.endswith(".safetensors") else _MAX_JSON_BYTES
                if size > limit:
                    raise ExportError(f"{p.name}: {f} is {size / 1e6:.0f} MB, above the {limit / 1e6:.0f} MB limit.")
                files[f] = (p / f).read_bytes()
        return files, p.name
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ExportError(f"{p.name} is not a readable bundle zip ({e}); export the bundle again.") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        # a bundle that was unzipped and zipped again as a folder: accept one common top folder
        prefix = ""
        if "meta.json" not in infos:
            metas = [n for n in infos if n.endswith("/meta.json") and n.count("/") == 1]
            if len(metas) == 1:
                prefix = metas[0][: -len("meta.json")]
        names = {n[len(prefix):] for n in infos if n.startswith(prefix)}
        if "model.safetensors" not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
            raise ExportError(f"{p.name} holds pickled weights instead of model.safetensors; refused (pickles can run "
                              "code). Export the bundle again with TL Studio.")
        missing = [f for f in BUNDLE_FILES if f not in names]
        if missing:
            raise ExportError(f"{p.name} is not a complete TL Studio bundle: {', '.join(missing)} missing. "
                              "Export the bundle again.")
        for f in wanted:
            info = infos.get(prefix + f)
            if info is None:
                continue
            if info.flag_bits & 0x1:
                raise ExportError(f"{p.name} is encrypted; export the bundle again without a password.")
            limit = _MAX_WEIGHTS_BYTES if f.endswith(".safetensors") else _MAX_JSON_BYTES
            if info.file_size > limit:
                raise ExportError(f"{p.name}: {f} unpacks to {info.file_size / 1e6:.0f} MB, above the "
                                  f"{limit / 1e6:.0f} MB limit; refused.")
            try:
                with zf.open(info) as src:
                    data = src.read(limit + 1)  # a lying header cannot get past the cap
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                raise ExportError(f"{p.name}: {f} is damaged inside the zip ({e}); export the bundle again.") from None
            if len(data) > limit:
                raise ExportError(f"{p.name}: {f} unpacks to more than its header says; refused.")
            files[f] = data
    return files, p.name


def _json(files: dict[str, bytes], name: str, where: str) -> Any:
    try:
        return json.loads(files[name].decode("utf-8"))
    except UnicodeDecodeError:
        raise ExportError(f"{where}: {name} is not UTF-8 text; the file was replaced or damaged. "
                          "Export the model again.") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{where}: {name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                          "it was edited or damaged. Export the model again.") from None


def _check_manifest(files: dict[str, bytes], where: str) -> None:
    """Compare every file with the SHA-256 recorded at export (bundles from before manifests pass)."""
    if "manifest.json" not in files:
        return
    manifest = _json(files, "manifest.json", where)
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict):
        raise ExportError(f"{where}: manifest.json has no 'files' table; the bundle is damaged. Export it again.")
    for name, data in files.items():
        if name == "manifest.json" or name not in recorded:
            continue
        want = (recorded[name] or {}).get("sha256") if isinstance(recorded[name], dict) else None
        if want != hashlib.sha256(data).hexdigest():
            raise ExportError(f"{where}: {name} does not match the checksum in manifest.json: the bundle was modified "
                              "or damaged after export. Export it again from the run.")


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
    """Validate ``meta.json``: format, classes, architecture and preprocessing; raise ExportError saying what."""
    if not isinstance(meta, dict) or not {"classes", "num_classes", "preprocess"} <= set(meta):
        raise ExportError(f"{where}: meta.json lacks classes/num_classes/preprocess; not a TL Studio model.")
    fmt = str(meta.get("format", MODEL_FORMAT))
    if not fmt.startswith("tl-studio-model/"):
        raise ExportError(f"{where}: meta.json has format {fmt!r}; not a TL Studio model.")
    if fmt != MODEL_FORMAT:
        raise ExportError(f"{where}: the model has format {fmt} but this TL Studio reads {MODEL_FORMAT}; "
                          "update TL Studio (pip install -U tl-studio).")
    classes = meta["classes"]
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ExportError(f"{where}: meta.json 'classes' must be a list of distinct, non-empty names.")
    try:
        n = int(meta["num_classes"])
    except (TypeError, ValueError):
        raise ExportError(f"{where}: meta.json num_classes={meta['num_classes']!r} is not a number.") from None
    if len(classes) != n:
        raise ExportError(f"{where}: meta.json lists {len(classes)} classes but says num_classes={n}.")
    arch = meta.get("arch") or meta.get("backbone")
    if not isinstance(arch, str) or not arch:
        raise ExportError(f"{where}: meta.json names no architecture (arch).")
    import timm

    if not timm.is_model(arch.split(".")[0]):
        raise ExportError(f"{where}: meta.json names the architecture {arch!r}, which this timm "
                          f"({timm.__version__}) does not know; update timm.")
    pre = meta["preprocess"]
    try:
        ok = (isinstance(pre, dict) and int(pre["input_size"]) > 0 and int(pre["resize"]) >= int(pre["input_size"])
              and pre["interpolation"] in _INTERPOLATIONS
              and len(pre["mean"]) == 3 and len(pre["std"]) == 3
              and all(math.isfinite(float(x)) for x in [*pre["mean"], *pre["std"]])
              and all(float(x) > 0 for x in pre["std"]))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ExportError(f"{where}: meta.json 'preprocess' is incomplete or invalid ({json.dumps(pre)[:200]}); "
                          "it needs input_size, resize >= input_size, interpolation, 3 means and 3 positive stds.")
    t = meta.get("temperature", 1.0)
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ExportError(f"{where}: meta.json temperature {t!r} must be a positive number.")
    return meta


def _load_state(data: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    if _looks_pickled(data):
        raise ExportError(f"{where}: model.safetensors is a pickle (torch.save), not a safetensors file; refused "
                          "because loading a pickle can run arbitrary code. Export the model again with TL Studio.")
    try:
        state = st_load(data)
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise ExportError(f"{where}: model.safetensors is not a valid safetensors file ({str(e)[:160]}); "
                          "it is damaged. Export the model again.") from None
    return state


def _build(meta: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    import timm

    arch = meta.get("arch") or meta.get("backbone")
    try:
        model = timm.create_model(str(arch).split(".")[0], pretrained=False, num_classes=int(meta["num_classes"]))
    except Exception as e:
        raise ExportError(f"{where}: cannot build architecture {arch!r} ({e}).") from None
    target = model.state_dict()
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if k in state and state[k].shape != v.shape]
    if wrong:
        k, got, need = wrong[0]
        raise ExportError(f"{where}: tensor {k} has shape {got} but {arch} with {meta['num_classes']} classes needs "
                          f"{need} ({len(wrong)} tensor(s) wrong); the weights do not match meta.json.")
    missing = [k for k in target if k not in state]
    if missing:
        raise ExportError(f"{where}: {len(missing)} tensor(s) missing from model.safetensors (e.g. {missing[0]}); "
                          f"the weights are not those of {arch}.")
    unexpected = [k for k in state if k not in target]
    if unexpected:
        raise ExportError(f"{where}: model.safetensors has {len(unexpected)} tensor(s) that {arch} does not have "
                          f"(e.g. {unexpected[0]}); the weights do not match meta.json.")
    bad = [k for k, v in state.items() if target[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        raise ExportError(f"{where}: tensor {bad[0]} is {state[bad[0]].dtype}, expected floating point; refused.")
    model.load_state_dict(state, strict=True)
    return model.eval().to(memory_format=torch.channels_last)


def load_model(ref: str | os.PathLike) -> TrainedModel:
    """Load a run directory or a ``.zip`` bundle for prediction, validating everything in it.

    Needs no workspace: a bundle carries its classes, preprocessing and architecture.

    Args:
        ref: a run directory or a bundle ``.zip``.
    Returns:
        The model (eval mode) with its classes, preprocessing, meta, config and metrics.
    Raises:
        ExportError: missing files, pickled weights, bad JSON, checksum mismatch, tensors that do not
            fit the architecture, or a damaged archive; the message says which and what to do.
    """
    p = Path(ref)
    if not p.exists():
        raise ExportError(f"{p} does not exist; give a run directory or a bundle .zip.")
    if not p.is_dir() and not zipfile.is_zipfile(p):
        raise ExportError(f"{p.name} is neither a run directory nor a bundle .zip.")
    files, where = _read_run_files(p)
    _check_manifest(files, where)
    meta = _check_meta(_json(files, "meta.json", where), where)
    config = _json(files, "config.json", where)
    if not isinstance(config, dict):
        raise ExportError(f"{where}: config.json must hold a JSON object (the training configuration).")
    metrics = _json(files, "metrics.json", where) if "metrics.json" in files else {}
    if not isinstance(metrics, dict):
        raise ExportError(f"{where}: metrics.json must hold a JSON object.")
    model = _build(meta, _load_state(files["model.safetensors"], where), where)
    pre = meta["preprocess"]
    return TrainedModel(model=model, classes=list(meta["classes"]),
                        pre=Preprocess(input_size=int(pre["input_size"]), resize=int(pre["resize"]),
                                       interpolation=str(pre["interpolation"]),
                                       mean=tuple(float(x) for x in pre["mean"]),
                                       std=tuple(float(x) for x in pre["std"])),
                        meta=meta, config=config, source=str(p), metrics=metrics)


load_bundle = load_model


# --------------------------------------------------------------------------------------------------
# evaluation and prediction
# --------------------------------------------------------------------------------------------------
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


def _expand(paths: Iterable[str | os.PathLike], tmp: Path) -> tuple[list[tuple[Path, str]], list[dict[str, str]]]:
    """Image files to predict as (file on disk, name to report); folders walked, zips unpacked safely."""
    files: list[tuple[Path, str]] = []
    skipped: list[dict[str, str]] = []
    for n, raw in enumerate(paths):
        p = Path(raw)
        if p.is_dir():
            files += [(f, str(f)) for f in sorted(p.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file() and p.suffix.lower() == ".zip":
            try:
                dest, sk, _ = safe_extract_zip(p, tmp / f"zip{n}")
            except DatasetError as e:
                skipped.append({"path": str(p), "reason": str(e)})
                continue
            skipped += [{"path": f"{p}/{s.path}", "reason": s.reason} for s in sk]
            files += [(f, f"{p}/{f.relative_to(dest).as_posix()}") for f in sorted(dest.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file():
            files.append((p, str(p)))
        else:
            skipped.append({"path": str(p), "reason": "not found"})
    return files, skipped


def predict_pil(tm: TrainedModel, images: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
    """Top-k predictions for RGB Pillow images: label, confidence, top_k [{label, confidence}]."""
    from .evaluate import predict_images

    probs = predict_images(tm.model, images, tm.pre, temperature=tm.temperature)
    return [_row(p, tm.classes, top_k) for p in probs]


def _row(p: np.ndarray, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    order = np.argsort(-p, kind="stable")[:max(1, top_k)]
    return {"label": classes[int(order[0])], "confidence": float(p[order[0]]),
            "top_k": [{"label": classes[int(i)], "confidence": float(p[i])} for i in order]}


def predict_paths(tm: TrainedModel, paths: Iterable[str | os.PathLike], top_k: int = 3, batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Predict image files, folders (recursively) and zips of images. Unreadable files are skipped.

    Args:
        tm: the loaded model.
        paths: files, folders and ``.zip`` files, in any mix.
        top_k: how many classes each row lists.
        batch_size: images per forward pass.
        progress: called with (done, total) after each batch.
    Returns:
        (rows of {path, label, confidence, top_k}, skipped [{path, reason}]); an image inside a zip is
        reported as ``archive.zip/inner/path.png``.
    """
    from .evaluate import predict_images

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tl-predict-") as tmp:
        files, skipped = _expand(paths, Path(tmp))
        for start in range(0, len(files), batch_size):
            batch, names = [], []
            for f, name in files[start:start + batch_size]:
                try:
                    batch.append(load_image(f))
                    names.append(name)
                except DatasetError as e:
                    skipped.append({"path": name, "reason": str(e).split(": ", 1)[-1]})
            if batch:
                probs = predict_images(tm.model, batch, tm.pre, temperature=tm.temperature)
                rows += [{"path": n, **_row(p, tm.classes, top_k)} for n, p in zip(names, probs)]
            if progress:
                progress(min(start + batch_size, len(files)), len(files))
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


def predictions_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The CSV of :func:`write_predictions_csv` as a string (for a download button)."""
    buf = io.StringIO()
    write_predictions_csv(rows, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------
def _pretraining_data(meta: dict[str, Any]) -> str:
    """What the backbone's weights were pretrained on, from the weights record and timm's tag."""
    w = meta.get("weights") or {}
    src = w.get("source")
    if src == "random":
        return "None: the network was trained from random initialisation (no pretraining)."
    if src == "local":
        return (f"Unknown: local weights file `{Path(str(w.get('detail', ''))).name}`; check where it came from "
                "and what it was trained on.")
    tag = f"{w.get('detail') or ''} {meta.get('arch') or ''}".lower()
    if "in22k" in tag or "in21k" in tag:
        base = "ImageNet-21k/22k (about 14 M images, about 21,000 classes)"
        return base + (", then fine-tuned on ImageNet-1k" if "ft_in1k" in tag else "")
    if "laion" in tag or "openai" in tag or "clip" in tag:
        return "Web-scale image-text pairs (CLIP-style pretraining)"
    return "ImageNet-1k (ILSVRC-2012: 1.28 M labelled photographs of 1,000 object classes)"


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _metrics_table(rep: dict[str, Any], classes: Sequence[str], title: str) -> list[str]:
    lines = [f"### {title}", "",
             f"Accuracy {_fmt(rep.get('accuracy'))} on {rep.get('count')} images; macro F1 {_fmt(rep.get('macro_f1'))}; "
             f"log loss {_fmt(rep.get('log_loss'))}.", ""]
    if rep.get("per_class"):
        lines += ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {c} | {_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} | {_fmt(r['f1'], 3)} | {r['support']} |"
                  for c, r in rep["per_class"].items()]
    if rep.get("confusion"):
        lines += ["", "Confusion matrix (rows = true class, columns = predicted class):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |",
                  "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {c} | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(classes, rep["confusion"])]
    return lines + [""]


def _with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Saved softmax outputs (T = 1) rescaled to temperature T: softmax(log p / T), exact up to rounding."""
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _calibration_lines(metrics: dict[str, Any], predictions: dict[str, Any] | None, classes: Sequence[str],
                       temperature: float) -> list[str]:
    val = metrics.get("val") or {}
    cal_rec = metrics.get("calibration") or {}
    rows = (predictions or {}).get("val") or []
    if val.get("ece") is None and not rows and not cal_rec:
        return ["Not measured for this model.", ""]
    lines = [f"Expected calibration error (ECE, 10 bins) of the trained model on the validation images: "
             f"{_fmt(cal_rec.get('ece_before', val.get('ece')))} (0 = confidences match accuracy exactly)."]
    if temperature != 1.0:
        lines.append(f"Temperature scaling applied: T = {_fmt(temperature, 3)} (probabilities = softmax(logits / T)); "
                     f"ECE after scaling {_fmt(cal_rec.get('ece_after'))}, measured on the same "
                     f"{cal_rec.get('count', 'validation')} images T was fitted on, so optimistic.")
    else:
        lines.append("Temperature scaling: not applied.")
    if cal_rec.get("warning"):
        lines.append(f"Note: {cal_rec['warning']}")
    cidx = {c: i for i, c in enumerate(classes)}
    usable = [r for r in rows if r.get("label") in cidx and len(r.get("probs") or []) == len(classes)]
    if usable:
        probs = _with_temperature(np.array([r["probs"] for r in usable], dtype=np.float64), temperature)
        y = np.array([cidx[r["label"]] for r in usable])
        cal = calibration(probs, y)
        lines += ["", f"Reliability on the validation images{' (with the temperature)' if temperature != 1.0 else ''}:",
                  "", "| confidence bin | images | mean confidence | accuracy |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {_fmt(b['confidence'], 3)} | {_fmt(b['accuracy'], 3)} |"
                  for b in cal["bins"] if b["count"]]
    return lines + [""]


def model_card(meta: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any],
               predictions: dict[str, Any] | None = None) -> str:
    """A Markdown model card.

    Sections: intended use, backbone and its pretraining data, training data (classes, counts,
    imbalance, skipped files), training configuration, metrics per class with the confusion matrix,
    calibration (when measured), limitations and the bias caveat.

    Args:
        meta: the run's ``meta.json``.
        config: the run's ``TrainConfig`` as a dict.
        metrics: the run's ``metrics.json`` (may be empty).
        predictions: the run's ``predictions.json`` when available (adds a reliability table).
    Returns:
        Markdown text.
    """
    metrics = metrics or {}
    classes = list(meta["classes"])
    ds = meta.get("dataset") or {}
    w = meta.get("weights") or {}
    counts = ds.get("counts") or {}
    skipped = ds.get("skipped") or []
    val, test = metrics.get("val") or {}, metrics.get("test") or {}
    title = ", ".join(classes[:6]) + (" …" if len(classes) > 6 else "")
    strategy = config.get("strategy", "?")
    lines = [
        f"# Model card: {title} classifier",
        "",
        f"Made with TL Studio by transfer learning ({strategy} strategy on `{meta.get('backbone')}`).",
        "",
        "## Intended use",
        "",
        f"Sorts an image into one of {len(classes)} classes: {', '.join(classes)}. Meant for images like the "
        "training images (same kind of subject, camera, framing and style) and for the purpose they were collected for. "
        "It always answers with one of these classes, even for an image that belongs to none of them, so do not use it "
        "to detect whether something is present at all. Not intended for decisions about people (identity, health, "
        "eligibility) or for safety-critical use without further validation.",
        "",
        "## Backbone",
        "",
        f"- Architecture: `{meta.get('arch')}` (catalogue name `{meta.get('backbone')}`)",
        f"- Pretrained weights: {w.get('source', '?')} — {w.get('detail', '?')} (fingerprint `{w.get('fingerprint', '?')}`)",
        f"- Pretraining data: {_pretraining_data(meta)}",
        f"- Input: {meta['preprocess']['input_size']}×{meta['preprocess']['input_size']} RGB; resize the shorter side to "
        f"{meta['preprocess']['resize']} px ({meta['preprocess']['interpolation']}), centre crop, scale to 0-1, "
        f"normalise with mean {list(meta['preprocess']['mean'])} and std {list(meta['preprocess']['std'])}",
        "",
        "## Training data",
        "",
        f"- Source: `{ds.get('source', '?')}` (content fingerprint `{ds.get('fingerprint', '?')}`), "
        f"{ds.get('num_images', '?')} usable images",
        f"- Split: {', '.join(f'{k} {v}' for k, v in (ds.get('split') or {}).items()) or 'n/a'}",
        f"- Imbalance: the largest class has {_fmt(ds.get('imbalance_ratio'), 2)}× the images of the smallest",
    ]
    if ds.get("image_size"):
        s = ds["image_size"]
        lines.append(f"- Image sizes: {s.get('min_width')}-{s.get('max_width')} × {s.get('min_height')}-{s.get('max_height')} px")
    lines.append(f"- Skipped files: {len(skipped)}"
                 + (": " + "; ".join(f"`{Path(str(s.get('path'))).name}` ({s.get('reason')})" for s in skipped[:10])
                    + (f"; … and {len(skipped) - 10} more" if len(skipped) > 10 else "") if skipped else ""))
    if counts:
        lines += ["", "| class | images |", "| --- | ---: |"] + [f"| {c} | {n} |" for c, n in counts.items()]
    for warning in ds.get("warnings") or []:
        lines.append(f"\n> Data warning: {warning}")
    lines += [
        "",
        "## Training configuration",
        "",
        (f"Strategy `linear` (frozen backbone; the last layer fitted by logistic regression in "
         f"{metrics.get('epochs_run', '?')} L-BFGS steps)" if strategy == "linear" else
         f"Strategy `{strategy}`, {metrics.get('epochs_run', '?')} epochs run (best epoch {metrics.get('best_epoch', '?')})")
        + f", {_fmt(metrics.get('seconds'), 1)} s.",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        "",
    ]
    if refitted(meta):
        lines += ["The linear head was validated on the validation images, then fitted again on training + "
                  "validation images for this model; the validation figures below are those of the fit that never "
                  "saw them.", ""]
    if val:
        lines += _metrics_table(val, classes, "Validation images")
    if test:
        lines += _metrics_table(test, classes, "Held-out test images")
    if not val and not test:
        lines += ["No metrics were recorded with this model.", ""]
    lines += ["## Calibration", ""]
    lines += _calibration_lines(metrics, predictions, classes, float(meta.get("temperature", 1.0)))
    n_val = val.get("count")
    lines += [
        "## Limitations and caveats",
        "",
        f"- The metrics come from {n_val if n_val is not None else 'a few'} held-out images; with this few, accuracy "
        "on new images can easily differ by several points, and more for images unlike the training set (other cameras, "
        "lighting, backgrounds, drawings vs photos).",
        "- It knows only the classes above and will confidently pick one of them for anything else (out-of-distribution "
        "images are not rejected).",
        "- Confidence scores are probabilities from a softmax; they are not guaranteed to be calibrated (see above).",
        "- Bias: the pretrained backbone carries the biases of its pretraining data (ImageNet-style datasets "
        "over-represent some regions, cultures, objects and people and under-represent others), and the fine-tuned "
        "model inherits them, along with any bias in how the training images were collected and labelled. Check "
        "performance separately on the groups of images that matter for your use before relying on it.",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights), `meta.json` (classes, architecture, preprocessing), `config.json` "
        "(training configuration), `metrics.json` (validation metrics and training curves), `manifest.json` "
        "(SHA-256 of each file). Predict with `tl-core predict THIS.zip image.jpg ...` or in Python with "
        "`tl_core.export.load_bundle('THIS.zip')`.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
class _ProbsAndLogits(nn.Module):
    """The exported graph: logits → (softmax(logits / T), logits)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return torch.softmax(logits / self.temperature, dim=1), logits


def _verification_images(run_dir: Path, tm: TrainedModel, extra: Sequence[str | os.PathLike] | None,
                         limit: int) -> tuple[torch.Tensor, list[str], str]:
    """Up to ``limit`` real images, preprocessed exactly as ``tl-core predict`` does.

    Order of preference: images given by the caller; the run's validation (and test) images from
    ``predictions.json``; images of the dataset folder in ``meta.json``. Only when none of these can
    be read does it fall back to deterministic synthetic images, and says so.
    """
    candidates: list[tuple[str, str]] = []
    if extra:
        with tempfile.TemporaryDirectory(prefix="tl-verify-") as tmp:
            files, _ = _expand(extra, Path(tmp))
            tensors, names = [], []
            for f, name in files[:limit]:
                with contextlib.suppress(DatasetError):
                    tensors.append(tm.pre.eval_from_pil(load_image(f)))
                    names.append(name)
            if tensors:
                return torch.stack(tensors), names, "given images"
    preds_file = run_dir / "predictions.json"
    if preds_file.is_file():
        with contextlib.suppress(Exception):
            preds = json.loads(preds_file.read_text())
            candidates += [(r["path"], "run validation images") for r in preds.get("val", []) + preds.get("test", [])]
    existing = [(p, s) for p, s in candidates if Path(p).is_file()]
    src = (tm.meta.get("dataset") or {}).get("source")
    if len(existing) < limit and src and Path(src).is_dir():
        seen = {str(Path(p).resolve()) for p, _ in existing}
        existing += [(str(f), "dataset images") for f in sorted(Path(src).rglob("*"))[:5000]
                     if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and str(f.resolve()) not in seen]
    # spread the choice over classes: validation rows and folders are grouped by class
    if len(existing) > limit:
        step = len(existing) / limit
        existing = [existing[int(i * step)] for i in range(limit)]
    tensors, names, sources = [], [], set()
    for p, s in existing:
        with contextlib.suppress(DatasetError):
            tensors.append(tm.pre.eval_from_pil(load_image(p)))
            names.append(p)
            sources.add(s)
    if tensors:
        return torch.stack(tensors), names, " + ".join(sorted(sources))
    log.warning("no training images of %s found; verifying the export on synthetic images", run_dir)
    g = torch.Generator().manual_seed(0)
    s = tm.pre.input_size
    ramp = torch.linspace(-1, 1, s)
    imgs = [torch.stack([ramp.view(1, -1).expand(s, s), ramp.view(-1, 1).expand(s, s), torch.zeros(s, s)])]
    imgs += [torch.randn(3, s, s, generator=g) for _ in range(7)]
    return torch.stack(imgs), [f"synthetic-{i}" for i in range(len(imgs))], "synthetic images (training images not found)"


def _compare(reference: np.ndarray, got: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    diff = float(np.abs(reference - got).max()) if reference.size else 0.0
    disagree = [names[i] for i in np.flatnonzero(ref_top != got_top)]
    return {"max_prob_diff": diff, "top1_agree": int((ref_top == got_top).sum()), "top1_disagree": disagree}


def _verify(reference: np.ndarray, runner: Callable[[np.ndarray], np.ndarray], x: torch.Tensor,
            names: Sequence[str], source: str, runtime: str) -> dict[str, Any]:
    """Run the exported model on the whole batch and on a batch of one; compare with PyTorch."""
    t0 = time.perf_counter()
    full = runner(x.numpy())
    single = runner(x[:1].numpy())
    seconds = time.perf_counter() - t0
    if full.shape != reference.shape or single.shape != reference[:1].shape:
        raise ExportError(f"Verification failed: the exported model returned shape {full.shape} / {single.shape}, "
                          f"expected {reference.shape}; the export is broken and was deleted.")
    a = _compare(reference, full, names)
    b = _compare(reference[:1], single, names[:1])
    diff = max(a["max_prob_diff"], b["max_prob_diff"])
    disagree = sorted(set(a["top1_disagree"] + b["top1_disagree"]))
    return {
        "passed": diff <= PARITY_TOLERANCE and not disagree and bool(np.isfinite(full).all()),
        "runtime": runtime,
        "images": len(names),
        "image_source": source,
        "batch_sizes": [len(names), 1],
        "top1_agree": a["top1_agree"],
        "top1_disagree": disagree,
        "max_prob_diff": diff,
        "tolerance": PARITY_TOLERANCE,
        "seconds": round(seconds, 3),
    }


def _sidecar(tm: TrainedModel, fmt: str, model_file: str, verification: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    pre = tm.pre
    return {
        "format": f"tl-studio-{fmt}/1",
        "model_file": model_file,
        "classes": tm.classes,
        "num_classes": len(tm.classes),
        "backbone": tm.meta.get("backbone"),
        "arch": tm.meta.get("arch"),
        "input": {"name": "input", "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": "float32",
                  "layout": "NCHW, RGB channels, normalised (see preprocessing)"},
        "outputs": {"probs": "class probabilities: softmax(logits / temperature), shape [batch, num_classes], "
                             "in the order of 'classes'",
                    "logits": "raw scores before softmax, shape [batch, num_classes]"},
        "temperature": tm.temperature,
        "preprocessing": {
            **pre.to_dict(),
            "data_config": tm.meta.get("data_config"),
            "steps": [
                "decode the image; apply EXIF orientation; composite transparency on white; convert to RGB",
                f"resize so the shorter side is {pre.resize} px ({pre.interpolation} interpolation, keep aspect ratio)",
                f"centre crop to {pre.input_size}x{pre.input_size}",
                "scale pixel values to 0..1 (divide by 255)",
                f"subtract mean {list(pre.mean)} and divide by std {list(pre.std)} per channel",
                "transpose HWC to CHW and stack images into a batch",
            ],
        },
        "verification": verification,
        "source_run": Path(tm.source).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def _onnx_exporter(requested: str) -> str:
    """``dynamo`` (torch.export based, needs onnxscript; the supported path since torch 2.9) or ``legacy``
    (TorchScript-based ``dynamo=False``; deprecated upstream but needs nothing else). ``auto`` picks dynamo
    when onnxscript is installed."""
    if requested not in {"auto", "dynamo", "legacy"}:
        raise ExportError(f"Unknown ONNX exporter {requested!r}; use auto, dynamo or legacy.")
    if requested != "auto":
        return requested
    import importlib.util

    if importlib.util.find_spec("onnxscript") is not None:
        return "dynamo"
    log.warning("onnxscript is not installed: using torch's legacy ONNX exporter "
                "(pip install 'tl-studio[export]' for the current one)")
    return "legacy"


def _export_onnx_file(module: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    """Write ``module`` as ONNX: input ``input`` with a dynamic batch axis; outputs ``probs`` and ``logits``."""
    # exporters print progress; keep stdout clean for --json
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                        input_names=["input"], output_names=["probs", "logits"],
                                        dynamic_shapes=({0: batch},), verbose=False, optimize=True)
            program.save(str(path))
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["probs", "logits"],
                              dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}, "logits": {0: "batch"}})


def _export_torchscript_file(module: nn.Module, example: torch.Tensor, path: Path, extra_files: dict[str, str]) -> None:
    """Trace ``module`` and save it with ``extra_files`` embedded (read back with ``torch.jit.load``)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit is deprecated upstream
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=extra_files)


def _load_torchscript(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _manifest(files: dict[str, bytes]) -> str:
    from . import __version__

    return json.dumps({"format": "tl-studio-bundle/1", "tl_studio": __version__,
                       "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()}},
                      indent=2)


_README = """TL Studio model bundle
======================

Classes: {classes}

Predict (TL Studio installed: pip install tl-studio):
    tl-core predict {name} photo.jpg more_photos/ album.zip --json
    tl-core predict {name} photos/ --csv predictions.csv

Python:
    from tl_core.export import load_bundle, predict_paths
    model = load_bundle("{name}")
    rows, skipped = predict_paths(model, ["photo.jpg"])

Files: model.safetensors (weights, safetensors: no code inside), meta.json (architecture, classes,
preprocessing), config.json (training configuration), metrics.json, MODEL_CARD.md, manifest.json
(SHA-256 of every file; a modified bundle is refused).
"""


def _write_bundle(run_dir: Path, tm: TrainedModel, out: Path) -> dict[str, Any]:
    files = {f: (run_dir / f).read_bytes() for f in BUNDLE_FILES + ("metrics.json",) if (run_dir / f).is_file()}
    predictions = None
    with contextlib.suppress(Exception):
        predictions = json.loads((run_dir / "predictions.json").read_text())
    files["MODEL_CARD.md"] = model_card(tm.meta, tm.config, tm.metrics, predictions).encode()
    files["README.txt"] = _README.format(classes=", ".join(tm.classes), name=out.name).encode()
    files["manifest.json"] = _manifest(files).encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    load_model(out)  # what we wrote must load: same checks a recipient's TL Studio makes
    return {"files": sorted(files)}


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
               verify_images: Sequence[str | os.PathLike] | None = None, max_verify_images: int = VERIFY_IMAGES,
               onnx_exporter: str = "auto") -> dict[str, Any]:
    """Export a run as ``bundle`` (zip), ``onnx`` or ``torchscript``.

    ONNX and TorchScript exports are verified before they are kept (see the module docstring); the
    verification numbers are returned and written into the sidecar ``<out>.json``.

    Args:
        run_dir: the run directory (or a bundle zip: re-export it in another format).
        fmt: bundle | onnx | torchscript.
        out: the file to write; an existing directory gets ``<run>.<ext>`` inside it.
        verify_images: images (files, folders, zips) to verify on instead of the run's own.
        max_verify_images: how many images the verification uses at most.
        onnx_exporter: auto | dynamo | legacy (see :func:`_onnx_exporter`).
    Returns:
        {path, format, bytes, sidecar (onnx/torchscript), verification {passed, max_prob_diff, top1_agree,
        images, ...} (onnx/torchscript), exporter, opset (onnx)}
    Raises:
        ExportError: unknown format, missing runtime, or the exported model disagrees with PyTorch.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    run_dir, out = Path(run_dir), Path(out)
    tm = load_model(run_dir)
    if out.is_dir():
        out = out / f"{run_dir.stem}.{_EXTENSIONS[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "bundle":
        if not run_dir.is_dir():
            raise ExportError(f"{run_dir.name} is already a bundle; copy it, or export it as onnx/torchscript.")
        with tempfile.TemporaryDirectory(prefix="tl-export-", dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            info = _write_bundle(run_dir, tm, staged)
            os.replace(staged, out)
        return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, **info}

    if fmt == "onnx":
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise ExportError("ONNX export needs onnx and onnxruntime (to verify the file); "
                              "run `pip install 'tl-studio[export]'`.") from None
    x, names, source = _verification_images(run_dir if run_dir.is_dir() else run_dir.parent, tm, verify_images,
                                            max_verify_images)
    with torch.inference_mode():  # the reference: exactly the model `tl-core predict` runs
        reference = torch.softmax(tm.model(x.contiguous(memory_format=torch.channels_last)).float() / tm.temperature,
                                  dim=1).numpy()
    module = _ProbsAndLogits(copy.deepcopy(tm.model).to(memory_format=torch.contiguous_format), tm.temperature).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    example = x[: min(2, len(x))].clone()
    sidecar_path = out.with_name(out.name + ".json")
    with tempfile.TemporaryDirectory(prefix="tl-export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            if fmt == "onnx":
                exporter = _onnx_exporter(onnx_exporter)
                _export_onnx_file(module, example, staged, exporter)
                opset = next((o.version for o in onnx.load(str(staged), load_external_data=False).opset_import
                              if o.domain in ("", "ai.onnx")), None)
                extra = {"exporter": f"torch.onnx ({exporter})", "opset": opset}
                session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
                runner = lambda a: session.run(["probs"], {"input": a.astype(np.float32)})[0]  # noqa: E731
                runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
            else:
                preview = _sidecar(tm, fmt, out.name, {"see": f"{out.name}.json"}, {"exporter": "torch.jit.trace"})
                _export_torchscript_file(module, example, staged, {"tl_studio.json": json.dumps(preview)})
                loaded = _load_torchscript(staged)
                extra = {"exporter": "torch.jit.trace"}

                def runner(a: np.ndarray) -> np.ndarray:
                    with torch.inference_mode():
                        return loaded(torch.from_numpy(a))[0].float().numpy()

                runtime = f"torch.jit.load (torch {torch.__version__})"
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"{fmt} export of {tm.meta.get('arch')} failed: {type(e).__name__}: {str(e)[:300]}") from None
        export_seconds = time.perf_counter() - t0
        verification = _verify(reference, runner, x, names, source, runtime)
        if not verification["passed"]:
            raise ExportError(
                f"{fmt} export failed verification on {verification['images']} images: max probability difference "
                f"{verification['max_prob_diff']:.2e} (allowed {PARITY_TOLERANCE:.0e}), top-1 differs on "
                f"{len(verification['top1_disagree'])} image(s); the file was not kept. Try the other exporter "
                "(onnx_exporter='legacy'/'dynamo') or report a bug with the backbone name.")
        sidecar = _sidecar(tm, fmt, out.name, verification, {**extra, "export_seconds": round(export_seconds, 3)})
        for f in sorted(Path(tmp).iterdir()):  # the model file, plus external ONNX data if the model is huge
            os.replace(f, out.parent / f.name)
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "sidecar": str(sidecar_path),
            "verification": verification, **extra}


def export_for_download(run_dir: str | os.PathLike, fmt: str, **kwargs: Any) -> dict[str, Any]:
    """Export into memory for a download button.

    Returns:
        The :func:`export_run` result plus ``files``: [{name, data (bytes), mime}] — one file for a
        bundle, the model and its ``.json`` sidecar for ONNX/TorchScript.
    """
    run_dir = Path(run_dir)
    ext = _EXTENSIONS.get(fmt)
    if ext is None:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    with tempfile.TemporaryDirectory(prefix="tl-download-") as tmp:
        out = Path(tmp) / f"tl-studio-{run_dir.stem}.{ext}"
        info = export_run(run_dir, fmt, out, **kwargs)
        mime = {"zip": "application/zip", "onnx": "application/octet-stream", "pt": "application/octet-stream"}[ext]
        files = [{"name": out.name, "data": out.read_bytes(), "mime": mime}]
        if info.get("sidecar"):
            sc = Path(info["sidecar"])
            files.append({"name": sc.name, "data": sc.read_bytes(), "mime": "application/json"})
    info = {k: v for k, v in info.items() if k not in ("path", "sidecar")}
    return {**info, "files": files}

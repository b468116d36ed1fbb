"""Exports of a trained run: a bundle (zip), verified ONNX and TorchScript files.

A bundle is a zip of the run's model files plus ``MODEL_CARD.md``, ``README.txt`` and ``manifest.json``
(SHA-256 of every file), so it loads with no access to the workspace that made it
(:func:`tl_core.share.loading.load_bundle`).

ONNX and TorchScript exports take a normalised NCHW float32 batch and return ``probs`` (softmax of
logits / temperature: what ``tl-core predict`` reports) and ``logits``, and for a model with open-set files
``ood_score``, ``ood_content`` and ``ood_style`` computed inside the graph (the bank matrices are constants
of the graph; the sidecar gives the threshold: ``unknown = ood_score > threshold``; see docs/openset.md). The
preprocessing that turns an image into that batch is written next to the model as ``<file>.json``.
A multi-label model's ``probs`` are per-label ``sigmoid(logits / T)`` instead (each label its own yes/no;
the sidecar says ``multi_label: true`` and gives the per-label ``thresholds``).
Every export is verified before it is kept: the exported model runs (onnxruntime / ``torch.jit.load``)
on real images of the run and must agree with PyTorch, same top-1 on every image and probabilities
within ``PARITY_TOLERANCE``; otherwise the file is deleted and :class:`ExportError` raised.

An ONNX graph is made once per run: a verified export is kept in the workspace's exports cache
(``<cache>/exports/<key>.onnx``, :data:`tl_core.cache.EXPORTS`; the key hashes the run's model files, the graph's
outputs, the exporter, the opset, torch's, onnx's, onnxscript's and timm's versions and
:data:`EXPORT_CACHE_VERSION`), and a later ONNX, web-page or TFLite export of the same run copies it instead of
running the exporter again (dynamo: 11-15 s of CPU for Lite0). The copy is verified exactly as a fresh export is, every time; one that fails, or cannot be read,
is deleted from the cache and exported afresh. A bundle, or a run directory outside any workspace, is not cached.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..cache import EXPORTS
from ..config import EXPORT_FORMATS
from ..data.images import IMAGE_EXTENSIONS, load_image
from ..errors import DatasetError, ExportError
from ..fileio import write_json_atomic, writing_atomic
from ..models.tracing import activations_out_of_place
from ..storage.files import BUNDLE_FILES, MANIFEST, METRICS, OPEN_SET_FILES, PREDICTIONS, bundle_manifest
from ..storage.workspace import Workspace
from .card import model_card
from .loading import TrainedModel, load_model
from .predict import expand_paths

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "PARITY_TOLERANCE",
    "OOD_TOLERANCE",
    "OOD_OUTPUTS",
    "VERIFY_IMAGES",
    "EXPORT_CACHE_VERSION",
    "export_run",
    "export_cache_dir",
    "verified_onnx",
    "export_for_download",
]

log = logging.getLogger(__name__)

#: The formats of :func:`export_run`, with what each is for (in ``tl_core.config``: the app shows them).
#: ONNX opset: 18 covers every op of the catalogue's CNNs and ViTs (LayerNormalization needs 17) and
#: runs on onnxruntime >= 1.14.
ONNX_OPSET = 18


#: Largest allowed |p_exported - p_pytorch| over every image and class.
PARITY_TOLERANCE = 1e-4


#: How many images a verification uses at most (a run's validation images first: all of them for most small sets).
VERIFY_IMAGES = 64


_EXTENSIONS = {"bundle": "zip", "onnx": "onnx", "torchscript": "pt"}

#: Part of every exports-cache key: bump it when this module changes the ONNX bytes it writes for the same run
#: (the graph, its input/output names, the exporter's options), so that no export made before is reused.
EXPORT_CACHE_VERSION = 1



class _OpenSetScore(nn.Module):
    """The open-set score inside the graph (:meth:`tl_core.models.openset.OpenSet.scores`, in torch ops): the
    bank matrices are constants. Given the pre-logit features (B, D) and the raw style statistics (B, S), returns
    (ood_score, ood_content, ood_style) of shape (B,) each (ood_style all zeros for a content-only bank)."""

    def __init__(self, open_set: Any):
        super().__init__()
        rec = open_set.record
        self.v2 = open_set.version >= 2
        self.register_buffer("bank", torch.from_numpy(np.asarray(open_set.bank, np.float32)), persistent=False)
        self.k_content = int(rec["content"].get("k", 1)) if self.v2 else 1
        self.t_content = float(open_set.content_threshold())
        st = open_set.style
        self.has_style = st is not None
        self.dims = [int(d) for d in st["dims"]] if st else []
        self.groups = [list(g) for g in st["groups"]] if st else []
        self.t_style = [float(t) for t in st["thresholds"]] if st else []
        self.k_style = int(st.get("k", 1)) if st else 1
        sb = np.asarray(open_set.style_bank, np.float32) if st else np.zeros((1, 1), np.float32)
        self.register_buffer("style_bank", torch.from_numpy(sb), persistent=False)

    @staticmethod
    def _knn(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
        sim = q @ bank.T
        top = sim.amax(1) if k == 1 else torch.topk(sim, min(k, bank.shape[0]), dim=1).values.mean(1)
        return (1.0 - top).clamp(0.0, 2.0)

    def forward(self, feats: torch.Tensor, style: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        f = torch.nn.functional.normalize(feats.float(), dim=1, eps=1e-12)
        d = self._knn(f, self.bank, self.k_content)
        if not self.v2:  # version 1: the score is the cosine distance itself
            return d, d / self.t_content, torch.zeros_like(d)
        content = d / self.t_content
        if not self.has_style or style is None:
            return content, content, torch.zeros_like(content)
        blocks, a = [], 0
        for n in self.dims:
            blocks.append(torch.nn.functional.normalize(style[:, a:a + n].float(), dim=1, eps=1e-12))
            a += n
        parts, b = [], 0
        for g, t in zip(self.groups, self.t_style):
            v = torch.nn.functional.normalize(torch.cat([blocks[i] for i in g], 1), dim=1, eps=1e-12)
            parts.append(self._knn(v, self.style_bank[:, b:b + v.shape[1]], self.k_style) / t)
            b += v.shape[1]
        sty = parts[0]
        for p_ in parts[1:]:
            sty = torch.maximum(sty, p_)
        return torch.maximum(content, sty), content, sty


class _WithOpenSet(nn.Module):
    """The exported graph of a model with open-set files: (probs, logits, ood_score, ood_content, ood_style), all
    from one forward pass (the style statistics of :func:`tl_core.models.features.pooled_and_style`)."""

    def __init__(self, model: nn.Module, temperature: float, multi_label: bool, open_set: Any):
        super().__init__()
        from ..models.features import StyleSpec

        self.model = model
        self.temperature = float(temperature)
        self.multi_label = bool(multi_label)
        self.score = _OpenSetScore(open_set)
        spec = open_set.style_spec
        self.spec = StyleSpec.from_dict(spec) if spec else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ..models.features import pooled_and_style, pooled_features

        if self.spec is not None:
            f, st = pooled_and_style(self.model, x, self.spec)
        else:
            f, st = pooled_features(self.model, x), None
        logits = self.model.get_classifier()(f)
        z = logits / self.temperature
        probs = torch.sigmoid(z) if self.multi_label else torch.softmax(z, dim=1)
        return (probs, logits, *self.score(f, st))


OOD_OUTPUTS = ("ood_score", "ood_content", "ood_style")


class _ProbsAndLogits(nn.Module):
    """The exported graph: logits → (softmax(logits / T), logits); multi-label: (sigmoid(logits / T), logits)."""

    def __init__(self, model: nn.Module, temperature: float, multi_label: bool = False):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.multi_label = bool(multi_label)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        if self.multi_label:
            return torch.sigmoid(logits / self.temperature), logits
        return torch.softmax(logits / self.temperature, dim=1), logits


def _verification_images(tm: TrainedModel, extra: Sequence[str | os.PathLike] | None,
                         limit: int) -> tuple[torch.Tensor, list[str], str]:
    """Up to ``limit`` real images, preprocessed exactly as ``tl-core predict`` does.

    Order of preference: images given by the caller; the run's validation (and test) images from
    ``predictions.json``; images of the dataset folder in ``meta.json``. Only when none of these can
    be read does it fall back to deterministic synthetic images, and says so.
    """
    candidates: list[tuple[str, str]] = []
    if extra:
        with tempfile.TemporaryDirectory(prefix="tl-verify-") as tmp:
            files, _ = expand_paths(extra, Path(tmp))
            tensors, names = [], []
            for f, name in files[:limit]:
                with contextlib.suppress(DatasetError):
                    tensors.append(tm.pre.eval_from_pil(load_image(f)))
                    names.append(name)
            if tensors:
                return torch.stack(tensors), names, "given images"
    if tm.files.has(PREDICTIONS):
        preds = tm.files.predictions()
        for split in ("val", "test"):
            sp = preds.get(split)
            if sp is not None:
                candidates += [(p, f"run {'validation' if split == 'val' else 'test'} images") for p in sp.paths]
    existing = [(p, s) for p, s in candidates if Path(p).is_file()]
    src = tm.meta.dataset.get("source")
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
    log.warning("no training images of %s found; verifying the export on synthetic images", tm.source)
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


def _run_exported(runner: Callable[[np.ndarray], list[np.ndarray]], x: torch.Tensor
                  ) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """The exported model's outputs on the whole batch and on a batch of one (each run once: the open-set
    outputs come from the same call as the probabilities), and the seconds both took."""
    t0 = time.perf_counter()
    full = runner(x.numpy())
    single = runner(x[:1].numpy())
    return full, single, time.perf_counter() - t0


def _verify(reference: np.ndarray, full: np.ndarray, single: np.ndarray, seconds: float,
            names: Sequence[str], source: str, runtime: str) -> dict[str, Any]:
    """The exported model's probabilities on the whole batch (``full``) and a batch of one (``single``) against
    PyTorch's."""
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


#: Largest allowed |ood_exported - ood_predict| (ood_score, ood_content, ood_style) over every image.
OOD_TOLERANCE = 1e-3


def _references(tm: TrainedModel, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """What ``tl-core predict`` gives for the images ``x``: the probabilities, and for a run with open-set files
    [ood_score, ood_content, ood_style] (numpy scores on PyTorch's features), from predict's one forward pass
    (:func:`tl_core.models.inference.forward_batch`) and its probabilities (:func:`tl_core.metrics.softmax`, or
    per label :func:`tl_core.models.multilabel.sigmoid`, with the run's temperature)."""
    from ..metrics import softmax
    from ..models.devices import Runtime
    from ..models.features import StyleSpec
    from ..models.inference import forward_batch
    from ..models.multilabel import sigmoid

    ood, rt = None, Runtime.cpu()
    with torch.inference_mode():
        if tm.open_set is None:
            z = forward_batch(tm.model, x, rt)
        else:
            spec = tm.open_set.style_spec
            if spec:
                z, f, st = forward_batch(tm.model, x, rt, with_features=True, style=StyleSpec.from_dict(spec))
            else:
                (z, f), st = forward_batch(tm.model, x, rt, with_features=True), None
            sc = tm.open_set.scores(f, st)
            ood = [sc.score, sc.content, sc.style if sc.style is not None else np.zeros_like(sc.score)]
    return (sigmoid if tm.meta.multi_label else softmax)(z, tm.temperature), ood


def _verify_ood(tm: TrainedModel, reference: list[np.ndarray], full: list[np.ndarray],
                single: list[np.ndarray]) -> dict[str, Any]:
    """The exported graph's open-set outputs (on the whole batch and a batch of one) against ``tl-core
    predict``'s."""
    diff = max(max(float(np.abs(np.asarray(g, np.float64) - r).max()) for g, r in zip(full, reference)),
               max(float(np.abs(np.asarray(g, np.float64) - r[:1]).max()) for g, r in zip(single, reference)))
    t = tm.open_set.threshold
    agree = int(((np.asarray(full[0]) > t) == (reference[0] > t)).sum())
    return {"passed": diff <= OOD_TOLERANCE and agree == len(reference[0]), "max_score_diff": diff,
            "unknown_agree": agree, "images": len(reference[0]), "tolerance": OOD_TOLERANCE, "threshold": t}


def _open_set_sidecar(tm: TrainedModel) -> dict[str, Any]:
    """What the sidecar says about the open-set outputs (empty for a model without open-set files)."""
    os_ = tm.open_set
    if os_ is None:
        return {}
    v2 = os_.version >= 2
    return {
        "open_set": {
            "score": os_.record.get("score"), "version": os_.version, "threshold": os_.threshold,
            "unknown": "ood_score > threshold",
            "reason": ("above the threshold: ood_content only -> 'content', ood_style only -> 'style', both -> 'both'"
                       if v2 else "content (a version-1 score has no style part)"),
            "meaning": ("ood_content and ood_style: the image's distances to the nearest training images in what it "
                        "shows and in the kind of picture (colours, strokes, texture), each as a multiple of its own "
                        "calibrated threshold (1.0 = at it); ood_score is the larger" if v2 else
                        "ood_score: cosine distance to the nearest training image"),
            "bank_rows": int(len(os_.bank)),
        },
    }


def _sidecar(tm: TrainedModel, fmt: str, model_file: str, verification: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    pre = tm.pre
    ood_outputs = ({"ood_score": "open-set score, shape [batch]: above 'open_set.threshold' the image is unknown "
                                 "(unlike the training images)",
                    "ood_content": "content distance / its threshold, shape [batch]",
                    "ood_style": "style distance / its threshold, shape [batch] (zeros: no style part)"}
                   if tm.open_set is not None else {})
    return {
        "format": f"tl-studio-{fmt}/1",
        "model_file": model_file,
        "classes": tm.classes,
        "num_classes": len(tm.classes),
        "backbone": tm.meta.backbone,
        "arch": tm.meta.arch,
        "input": {"name": "input", "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": "float32",
                  "layout": "NCHW, RGB channels, normalised (see preprocessing)"},
        "outputs": {"probs": "class probabilities: softmax(logits / temperature), shape [batch, num_classes], "
                             "in the order of 'classes'",
                    "logits": "raw scores before softmax, shape [batch, num_classes]", **ood_outputs},
        "temperature": tm.temperature,
        **({"multi_label": True, "thresholds": list(tm.meta.thresholds or [0.5] * len(tm.classes)),
            "outputs": {"probs": "per-label probabilities: sigmoid(logits / temperature), shape [batch, num_classes], "
                                 "in the order of 'classes'; an image carries each label whose probability reaches "
                                 "that label's threshold ('thresholds')",
                        "logits": "raw per-label scores before the sigmoid, shape [batch, num_classes]",
                        **ood_outputs}}
           if tm.meta.multi_label else {}),
        "preprocessing": {
            **pre.to_dict(),
            "data_config": tm.meta.data_config,
            "steps": [
                "decode the image; apply EXIF orientation; composite transparency on white; convert to RGB",
                f"resize so the shorter side is {pre.resize} px ({pre.interpolation} interpolation, keep aspect ratio)",
                f"centre crop to {pre.input_size}x{pre.input_size}",
                "scale pixel values to 0..1 (divide by 255)",
                f"subtract mean {list(pre.mean)} and divide by std {list(pre.std)} per channel",
                "transpose HWC to CHW and stack images into a batch",
            ],
        },
        **_open_set_sidecar(tm),
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
    """Write ``module`` as ONNX: input ``input`` with a dynamic batch axis; outputs ``probs`` and ``logits`` (and
    the open-set scores :data:`OOD_OUTPUTS` for a model with open-set files)."""
    names = ["probs", "logits"] + (list(OOD_OUTPUTS) if isinstance(module, _WithOpenSet) else [])
    # exporters print progress; keep stdout clean for --json
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), torch.no_grad(), \
            activations_out_of_place(module):
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                        input_names=["input"], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False, optimize=True)
            program.save(str(path))
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=names,
                              dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}})


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


def export_cache_dir(run_dir: str | os.PathLike) -> Path | None:
    """Where the verified ONNX exports of a run are kept: ``<cache>/exports`` of the workspace that holds the run
    directory (``<home>/runs/<id>``, a project's too; ``$TL_CACHE_DIR`` moves it), or None: a bundle, or a run
    directory outside any workspace (its exports are not cached).

    Args:
        run_dir: a run directory or a bundle zip.
    Returns:
        The folder (not created here), or None.
    """
    run_dir = Path(run_dir).resolve()
    home = run_dir.parent.parent
    if not run_dir.is_dir() or run_dir.parent.name != "runs" or not (home / "runs.sqlite").is_file():
        return None
    return Workspace.at(home).cache_dir / EXPORTS


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _onnx_cache_key(tm: TrainedModel, module: nn.Module, example: torch.Tensor, exporter: str) -> dict[str, Any]:
    """Everything the ONNX bytes of ``module`` depend on: the run's model files (weights, meta.json with the
    temperature and classes, config.json, the open-set files), the graph's outputs, the example batch the exporter
    traces, the exporter, the opset and the versions of the code that writes the file."""
    files = {f: hashlib.sha256(tm.files.raw(f)).hexdigest() for f in BUNDLE_FILES + OPEN_SET_FILES if tm.files.has(f)}
    return {"cache_version": EXPORT_CACHE_VERSION, "format": "onnx",
            "graph": "probs+logits+open-set" if isinstance(module, _WithOpenSet) else "probs+logits",
            "example_shape": list(example.shape), "exporter": exporter, "opset": ONNX_OPSET,
            "torch": torch.__version__, "onnx": _package_version("onnx"), "onnxscript": _package_version("onnxscript"),
            "timm": _package_version("timm"), "files": files}


class _CachedExport:
    """One entry of the exports cache: ``<dir>/<key>.onnx`` and its record ``<key>.onnx.json`` (what the key hashes,
    when and how fast it was made and verified). Written atomically (two processes exporting the same run at once:
    the last one wins, neither leaves half a file); never trusted without verification."""

    def __init__(self, directory: Path, parts: dict[str, Any]):
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]
        self.parts = parts
        self.model = directory / f"{key}.onnx"
        self.record = directory / f"{key}.onnx.json"

    def copy_to(self, dest: Path) -> bool:
        """Copy the cached file to ``dest`` and mark the entry as used now; False when there is none (or it went
        meanwhile: evicted by another process)."""
        try:
            shutil.copyfile(self.model, dest)
            os.utime(self.model)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("cached export %s is unreadable (%s); exporting afresh", self.model.name, e)
            return False

    def remove(self) -> None:
        for f in (self.model, self.record):
            with contextlib.suppress(OSError):
                f.unlink(missing_ok=True)

    def store(self, verified: Path, record: dict[str, Any]) -> None:
        """Keep a verified file (a full or read-only disk: not kept, with a warning)."""
        try:
            with writing_atomic(self.model, ".onnx") as tmp:
                shutil.copyfile(verified, tmp)
            write_json_atomic(self.record, {**record, "key": self.parts})
        except OSError as e:
            log.warning("could not keep the ONNX export in the cache (%s)", e)


def verified_onnx(tm: TrainedModel, run_dir: str | os.PathLike, module: nn.Module, x: torch.Tensor,
                  names: Sequence[str], source: str, reference: np.ndarray, ood_reference: list[np.ndarray] | None,
                  path: Path, exporter: str) -> tuple[dict[str, Any], dict[str, Any], bool, float]:
    """Write ``module``'s ONNX graph to ``path``, verified with onnxruntime against PyTorch on ``x``: copied from
    the exports cache when this run's graph was made before (verified again, here, like a fresh one), else exported.

    A cached file that cannot be read or fails the verification is deleted from the cache and the graph exported
    afresh (a warning is logged); a fresh export that passes is kept in the cache (only a single-file graph: not
    one with external data). Processes exporting the same run at once take turns: the first exports, the others
    wait for it and copy its graph (:func:`_one_at_a_time`).

    Args:
        tm: the loaded run.
        run_dir: its directory or bundle (where the cache is: :func:`export_cache_dir`).
        module: :class:`_ProbsAndLogits` or :class:`_WithOpenSet` of ``tm``'s model (contiguous, eval mode).
        x: the verification images; names, source: their names and where they came from.
        reference: PyTorch's probabilities on ``x``.
        ood_reference: ``tl-core predict``'s open-set scores on ``x`` (with a :class:`_WithOpenSet` module), or None.
        path: the ONNX file to write (in a staging folder: external data may be written beside it).
        exporter: dynamo | legacy (resolved by :func:`_onnx_exporter`).
    Returns:
        (verification, {exporter, opset}, whether the cached graph was used, seconds to export or copy it)
    Raises:
        ExportError: the export fails, or the fresh export disagrees with PyTorch (the file is left for the caller
            to delete with its staging folder).
    """
    example = x[: min(2, len(x))].clone()
    cache_dir = export_cache_dir(run_dir)
    entry = _CachedExport(cache_dir, _onnx_cache_key(tm, module, example, exporter)) if cache_dir else None
    with _one_at_a_time(entry):
        return _verified_onnx(tm, module, x, names, source, reference, ood_reference, path, exporter, example, entry)


@contextlib.contextmanager
def _one_at_a_time(entry: _CachedExport | None) -> Iterator[None]:
    """Hold the cache entry's lock (``<key>.onnx.lock``) while its graph is exported or copied: of the processes that
    export one run at once (a class exporting the teacher's run), one runs the exporter and the others wait for it,
    then copy its file. The holder removes the lock file as it leaves (a waiter that finds its file gone takes a new
    one), so the cache holds no lock file between exports. Without a cache entry, or where the lock cannot be made
    (a read-only cache), nothing waits."""
    if entry is None:
        yield
        return
    path = entry.model.with_name(entry.model.name + ".lock")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a")
        except OSError:
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break  # the lock file is still the one in the folder: ours
        except FileNotFoundError:
            pass
        lock.close()  # removed by the holder before us while we waited: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        lock.close()


def _verified_onnx(tm: TrainedModel, module: nn.Module, x: torch.Tensor, names: Sequence[str], source: str,
                   reference: np.ndarray, ood_reference: list[np.ndarray] | None, path: Path, exporter: str,
                   example: torch.Tensor, entry: _CachedExport | None) -> tuple[dict[str, Any], dict[str, Any], bool,
                                                                                float]:
    """:func:`verified_onnx` under the entry's lock: the cached graph if there is one (looked for now, after any
    wait), else a fresh export."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    for cached in ((True, False) if entry is not None and entry.model.is_file() else (False,)):
        t0 = time.perf_counter()
        try:
            if cached:
                if not entry.copy_to(path):
                    continue
            else:
                _export_onnx_file(module, example, path, exporter)
            proto = onnx.load(str(path), load_external_data=False)
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            one_file = not any(uses_external_data(t) for t in proto.graph.initializer)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            if cached:
                log.warning("cached ONNX export %s cannot be loaded (%s: %s); exporting afresh", entry.model.name,
                            type(e).__name__, str(e)[:200])
                entry.remove()
                continue
            if isinstance(e, ExportError):
                raise
            raise ExportError(f"onnx export of {tm.meta.arch} failed: {type(e).__name__}: {str(e)[:300]}") from None
        export_seconds = time.perf_counter() - t0
        wanted = ["probs"] + (list(OOD_OUTPUTS) if ood_reference is not None else [])
        runner = lambda a: session.run(wanted, {"input": a.astype(np.float32)})  # noqa: E731
        runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        try:
            verification = _checked(tm, "onnx", reference, ood_reference, runner, x, names, source, runtime)
        except ExportError as e:
            if not cached:
                raise
            log.warning("cached ONNX export %s failed its verification (%s); exporting afresh", entry.model.name, e)
            entry.remove()
            continue
        extra = {"exporter": f"torch.onnx ({exporter})", "opset": opset}
        if entry is not None and not cached and one_file:
            entry.store(path, {**extra, "export_seconds": round(export_seconds, 3), "verification": verification,
                               "source_run": Path(tm.source).name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return verification, extra, cached, export_seconds
    raise AssertionError("unreachable: the last attempt exports afresh")


def _checked(tm: TrainedModel, fmt: str, reference: np.ndarray, ood_reference: list[np.ndarray] | None,
             runner: Callable[[np.ndarray], list[np.ndarray]], x: torch.Tensor, names: Sequence[str], source: str,
             runtime: str) -> dict[str, Any]:
    """The exported model's verification (probabilities, and the open-set scores with ``ood_reference``).

    Raises:
        ExportError: it disagrees with PyTorch (the message says by how much and what to try).
    """
    full, single, seconds = _run_exported(runner, x)
    verification = _verify(reference, full[0], single[0], seconds, names, source, runtime)
    if ood_reference is not None:
        verification["open_set"] = _verify_ood(tm, ood_reference, full[1:], single[1:])
        if not verification["open_set"]["passed"]:
            o = verification["open_set"]
            raise ExportError(
                f"{fmt} export failed verification of its open-set score on {len(names)} images: max difference "
                f"{o['max_score_diff']:.2e} (allowed {OOD_TOLERANCE:.0e}), unknown differs on "
                f"{o['images'] - o['unknown_agree']} image(s); the file was not kept. Report a bug with the "
                "backbone name.")
    if not verification["passed"]:
        raise ExportError(
            f"{fmt} export failed verification on {verification['images']} images: max probability difference "
            f"{verification['max_prob_diff']:.2e} (allowed {PARITY_TOLERANCE:.0e}), top-1 differs on "
            f"{len(verification['top1_disagree'])} image(s); the file was not kept. Try the other exporter "
            "(onnx_exporter='legacy'/'dynamo') or report a bug with the backbone name.")
    return verification


_README = """TL Studio model bundle
======================

Classes: {classes}

Predict (TL Studio installed: pip install tl-studio):
    tl-core predict {name} photo.jpg more_photos/ album.zip --json
    tl-core predict {name} photos/ --csv predictions.csv

Python:
    from tl_core.share.loading import load_bundle
    from tl_core.share.predict import predict_paths
    model = load_bundle("{name}")
    rows, skipped = predict_paths(model, ["photo.jpg"])

Files: model.safetensors (weights, safetensors: no code inside), meta.json (architecture, classes,
preprocessing), config.json (training configuration), metrics.json, ood.json and ood_bank.safetensors
(the open-set thresholds and the training images' content features and style statistics: a prediction says
"unknown" for an image unlike them, and why: "style" or "content"), MODEL_CARD.md, manifest.json (SHA-256 of
every file; a modified bundle is refused).
"""


def _write_bundle(tm: TrainedModel, out: Path) -> dict[str, Any]:
    files = {f: tm.files.raw(f) for f in BUNDLE_FILES + (METRICS,) + OPEN_SET_FILES if tm.files.has(f)}
    files["MODEL_CARD.md"] = model_card(tm.files).encode()
    files["README.txt"] = _README.format(classes=", ".join(tm.classes), name=out.name).encode()
    files[MANIFEST] = bundle_manifest(files)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    load_model(out)  # what we wrote must load: same checks a recipient's TL Studio makes
    return {"files": sorted(files)}


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
               verify_images: Sequence[str | os.PathLike] | None = None, max_verify_images: int = VERIFY_IMAGES,
               onnx_exporter: str = "auto") -> dict[str, Any]:
    """Export a run as ``bundle`` (zip), ``onnx`` or ``torchscript`` (the ``webpage`` folder is
    :func:`tl_core.share.webpage.export_webpage`'s, built on this ONNX export).

    ONNX and TorchScript exports are verified before they are kept (see the module docstring); the
    verification numbers are returned and written into the sidecar ``<out>.json``. An ONNX graph made before for
    the same run is copied from the workspace's exports cache (:func:`verified_onnx`) and verified again.

    Args:
        run_dir: the run directory (or a bundle zip: re-export it in another format).
        fmt: bundle | onnx | torchscript.
        out: the file to write; an existing directory gets ``<run>.<ext>`` inside it.
        verify_images: images (files, folders, zips) to verify on instead of the run's own.
        max_verify_images: how many images the verification uses at most.
        onnx_exporter: auto | dynamo | legacy (see :func:`_onnx_exporter`).
    Returns:
        {path, format, bytes, sidecar (onnx/torchscript), verification {passed, max_prob_diff, top1_agree,
        images, ...} (onnx/torchscript), exporter, opset (onnx), export_seconds (onnx/torchscript: the time this
        call took to export, or to copy the cached graph), cached (onnx: the graph came from the exports cache)}
    Raises:
        ExportError: unknown format, missing runtime, or the exported model disagrees with PyTorch.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    if fmt in ("webpage", "tflite"):  # built on this module's ONNX export (which they import: no cycle back)
        raise ExportError(f"{fmt} is exported by tl_core.share.formats.export_model, not export_run.")
    run_dir, out = Path(run_dir), Path(out)
    tm = load_model(run_dir)
    if out.is_dir():
        out = out / f"{run_dir.stem}.{_EXTENSIONS[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "bundle":
        if not run_dir.is_dir():
            raise ExportError(f"{run_dir.name} is already a bundle; copy it, or export it as onnx/torchscript.")
        # staged under its own name (the bundle's README names the file), then moved into place
        with tempfile.TemporaryDirectory(prefix="tl-export-", dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            info = _write_bundle(tm, staged)
            os.replace(staged, out)
        return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, **info}

    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (verified_onnx reads and runs the file with them)
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError("ONNX export needs onnx and onnxruntime (to verify the file); "
                              "run `pip install 'tl-studio[export]'`.") from None
    x, names, source = _verification_images(tm, verify_images, max_verify_images)
    reference, ood_reference = _references(tm, x)  # the reference: exactly what `tl-core predict` gives
    if tm.open_set is not None:
        module: nn.Module = _WithOpenSet(copy.deepcopy(tm.model).to(memory_format=torch.contiguous_format),
                                         tm.temperature, tm.meta.multi_label, tm.open_set).eval()
    else:
        module = _ProbsAndLogits(copy.deepcopy(tm.model).to(memory_format=torch.contiguous_format), tm.temperature,
                                 tm.meta.multi_label).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    example = x[: min(2, len(x))].clone()
    sidecar_path = out.with_name(out.name + ".json")
    cached = False
    with tempfile.TemporaryDirectory(prefix="tl-export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        if fmt == "onnx":
            verification, extra, cached, export_seconds = verified_onnx(
                tm, run_dir, module, x, names, source, reference, ood_reference, staged, _onnx_exporter(onnx_exporter))
        else:
            t0 = time.perf_counter()
            try:
                preview = _sidecar(tm, fmt, out.name, {"see": f"{out.name}.json"}, {"exporter": "torch.jit.trace"})
                _export_torchscript_file(module, example, staged, {"tl_studio.json": json.dumps(preview)})
                loaded = _load_torchscript(staged)
            except Exception as e:
                raise ExportError(f"{fmt} export of {tm.meta.arch} failed: {type(e).__name__}: "
                                  f"{str(e)[:300]}") from None
            extra = {"exporter": "torch.jit.trace"}
            export_seconds = time.perf_counter() - t0

            def runner(a: np.ndarray) -> list[np.ndarray]:  # probs, then the open-set outputs if any
                with torch.inference_mode():
                    outs = loaded(torch.from_numpy(a))
                return [outs[0].float().numpy()] + [t.float().numpy() for t in outs[2:5]]

            verification = _checked(tm, fmt, reference, ood_reference, runner, x, names, source,
                                    f"torch.jit.load (torch {torch.__version__})")
        sidecar = _sidecar(tm, fmt, out.name, verification, {**extra, "export_seconds": round(export_seconds, 3)})
        for f in sorted(Path(tmp).iterdir()):  # the model file, plus external ONNX data if the model is huge
            os.replace(f, out.parent / f.name)
    write_json_atomic(sidecar_path, sidecar)
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "sidecar": str(sidecar_path),
            "verification": verification, **extra, "export_seconds": round(export_seconds, 3),
            **({"cached": cached} if fmt == "onnx" else {})}


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


"""The engine that runs a frozen backbone's forward pass on the CPU: PyTorch or ONNX Runtime.

:func:`feature_engine` gives a callable "NHWC uint8 batch of centre crops -> pooled features (float32 NumPy,
(B, D))" for the module that :func:`~tl_core.models.features.extract_features` runs (a timm model, or a
:class:`~tl_core.models.feature_variants.VariantModel` extractor): the same features as
:func:`~tl_core.models.features.pooled_features` of the normalised batch, within 1e-4. The engine normalises
(:meth:`~tl_core.models.preprocess.Preprocess.normalize_pixels`; in the ONNX graph, its first nodes): the decoding
threads only crop, which took a tenth of the time of normalising there (benchmarks/RESULTS.md, row 1d).

The rule (``TL_ENGINE=auto``, the default), from measurements on the 2-core build machine (benchmarks/RESULTS.md,
rows 1f/1g: EfficientNet-Lite0 at batch 32 ran ~4x faster in ONNX Runtime than in PyTorch channels-last, last
layer and several depths alike):

- **PyTorch** under torchrun, on CUDA/MPS, under mixed precision (autocast), when onnxruntime is missing (without
  onnxscript the legacy exporter is used; its graph ran ~1.6x slower than dynamo's), or while the images run on
  PyTorch for a missing ONNX file (this job's and the earlier jobs', counted beside it) stay below the export's
  break-even, :data:`EXPORT_MIN_IMAGES` (last layer) or :data:`EXPORT_MIN_IMAGES_DEPTHS` (several depths)
  (``TL_ONNX_MIN_IMAGES`` overrides both): so the first model of a fresh workspace never waits for an export
  that costs more than it saves; or for a job of fewer than :data:`SESSION_MIN_IMAGES`
  images before a session is verified in the process (loading and verifying one costs more than it saves).
  PyTorch runs channels-last under inference mode, on a copy of the network with its batch norms folded into the
  convolutions for a job of 32 images or more (:mod:`tl_core.models.folding`, ``TL_FOLD_BN``).
- **ONNX Runtime** otherwise: the module exported once (torch.onnx dynamo exporter, dynamic batch) and cached
  as ``<cache>/engines/<key>.onnx``, the key a hash of the module's class, variant, input size and
  normalisation, the weights and buffers it computes with (its classifier excluded), and the torch version; a
  session with one intra-op thread per core and no spin-waiting (the decoding threads need those cores). The first
  batch a file runs (its first :data:`VERIFY_IMAGES` images) also runs through PyTorch, and the two must agree
  within :data:`TOLERANCE` (max abs); if not, a cached file is rebuilt once, and a fresh export that still
  disagrees leaves PyTorch in charge (recorded in ``<key>.failed`` so that ``auto`` does not export it again). A
  verified file is recorded in ``<key>.verified`` (its SHA-256, the ONNX Runtime version, the architecture): a
  new process that loads the very same bytes there skips the PyTorch pass (~0.15 s of a 1,000-image extraction
  here); any other file is verified again. A cached file that does not load is rebuilt, never trusted.

``TL_ENGINE=torch`` or ``onnx`` forces one (``onnx`` exports whatever the job size; it still falls back to
PyTorch, with a log line, when it cannot run or verify). Compiled PyTorch (``torch.compile``, inductor) is not
offered: on the build machine it took 32 s to compile Lite0 before the first batch, in every new process, and
then ran ~1.6x faster than eager PyTorch channels-last, against ~4x for ONNX Runtime (whose export is cached).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import write_atomic, writing_atomic
from ..settings import setting
from .devices import Runtime, thread_count
from .folding import fold_wanted, folded
from .preprocess import Preprocess
from .tracing import activations_out_of_place

__all__ = ["ENGINES", "TOLERANCE", "EXPORT_MIN_IMAGES", "EXPORT_MIN_IMAGES_DEPTHS", "SESSION_MIN_IMAGES", "FeatureEngine", "feature_engine",
           "engine_setting", "engine_key"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")
#: the largest max-abs difference from PyTorch's features that the ONNX engine may show on the first batch
TOLERANCE = 1e-4
#: images of the first batch that also run through PyTorch to verify the ONNX engine
VERIFY_IMAGES = 8
#: ``auto`` exports a missing ONNX file once the images run on PyTorch for it (this job's and earlier jobs', counted
#: in ``<key>.images``) reach the export's break-even: the first evaluate of a fresh workspace took 32.3 s with
#: the export against 23.1 s on PyTorch and 15.7 s once the file existed (issue 24: 1,000 images, several-depths
#: features, idle 2-core machine): an export costs ~16.6 s in a fresh process (its imports and the verification
#: included; 5-7 s in a warm one, benchmarks/RESULTS.md row 1h) and saved ~7.4 ms an image for several depths,
#: ~13 ms for the last layer (row 1f), against PyTorch as it was: break-even ~2,250 and ~1,300 images. With the
#: batch norms folded (:mod:`.folding`) PyTorch gains less to ONNX Runtime: per image, 0.70x the saving for the
#: last layer and 0.62x for several depths (rows 1f/1g/1i, 2026-12-07: ONNX Runtime 105 / 107 img/s, PyTorch
#: folded 37.3 / 36.8, as it is 29.2 / 26.2), so the break-evens are ~1,850 and ~3,600. Renting (PyTorch) until
#: the rent paid reaches the purchase price (the export), then buying, never costs more than twice the best
#: choice made knowing the future, and a one-off small job never pays for an export.
EXPORT_MIN_IMAGES = 1850
#: the same for a several-depths extractor (its graph gains less over PyTorch)
EXPORT_MIN_IMAGES_DEPTHS = 3600
#: ``auto`` runs a job of fewer images on PyTorch when no verified session is open in the process yet: loading
#: the ONNX file and verifying it on the first batch took 0.12-0.19 s for 1-8 images here, PyTorch 0.02-0.08 s;
#: from 16 images on, ONNX Runtime was faster (0.20 s against 0.24 s)
SESSION_MIN_IMAGES = 16
_FORMAT = "features-v2"  # bump when the exported graph's contract changes (v2: input "pixels", NHWC uint8)
_OPSET = 18

_sessions: dict[str, Any] = {}  # key -> verified ort session, for the life of the process (audit, advisor...)
_failed: set[str] = set()
_lock = threading.Lock()


def engine_setting() -> str:
    """``TL_ENGINE`` (auto | torch | onnx; default auto)."""
    return setting("TL_ENGINE")


def _export_min_images(model: nn.Module | None = None) -> int:
    """Images run on PyTorch after which ``auto`` exports (``TL_ONNX_MIN_IMAGES`` when set)."""
    depths = model is not None and getattr(model, "variant", "last") != "last"
    return setting("TL_ONNX_MIN_IMAGES", EXPORT_MIN_IMAGES_DEPTHS if depths else EXPORT_MIN_IMAGES)


def _images_so_far(path: Path) -> int:
    """Images run on PyTorch for a missing ONNX file so far (``<key>.images``; 0 when unknown)."""
    try:
        return max(0, int((_read(path.with_suffix(".images")) or "0").strip() or 0))
    except ValueError:
        return 0


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _mean_hw(t: torch.Tensor) -> torch.Tensor:
    """Global average pool as two means of ~100 values each: ONNX Runtime's one ReduceMean over an early
    stage's 112x112 map drifted 1.2e-4 from PyTorch on values ~10 (float32 sums); two steps: 5e-5."""
    return t.mean(3).mean(2) if t.ndim == 4 else t.mean(1)


class _Pooled(nn.Module):
    """What is exported: NHWC uint8 pixels normalised, then the pooled pre-logit features (the classifier is not
    in the graph). A several-depths extractor is spelled out as :meth:`VariantModel.forward_features` computes it,
    with :func:`_mean_hw` pooling (the first batch's comparison with PyTorch catches any drift between the two)."""

    def __init__(self, model: nn.Module, pre: Preprocess):
        super().__init__()
        self.model = model
        scale, shift = pre._scale_shift()
        self.register_buffer("scale", scale.view(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1).clone(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift  # Preprocess.normalize_pixels
        m = self.model
        if getattr(m, "variant", None) == "depths":
            b = m.backbone
            final, inter = b.forward_intermediates(x)
            parts = [b.forward_head(final, pre_logits=True)]
            parts += [_mean_hw(t) * m.scales[i] for i, t in enumerate(inter)]
            return torch.cat(parts, 1)
        return _pooled(m, x)


def _classifier_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in (model, getattr(model, "backbone", None)):
        if m is not None and hasattr(m, "get_classifier"):
            clf = m.get_classifier()
            if isinstance(clf, nn.Module):
                ids.update(id(p) for p in clf.parameters())
    return ids


def engine_key(model: nn.Module, pre: Preprocess) -> str:
    """The ONNX file's key: module class, variant, input size and normalisation, weights and buffers (classifier
    excluded), torch."""
    h = hashlib.sha256()
    variant = getattr(model, "variant", "last")
    h.update(f"{_FORMAT}|{type(getattr(model, 'backbone', model)).__name__}|{variant}|"
             f"{getattr(model, 'block_dims', [])}|{pre.input_size}|{pre.mean}|{pre.std}|{torch.__version__}".encode())
    skip = _classifier_ids(model)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if id(t) in skip:
                continue
            h.update(name.encode())
            a = t.detach().cpu().contiguous().numpy()
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:24]


class FeatureEngine:
    """A callable ``pixels (NHWC uint8 tensor of centre crops) -> float32 array (B, D)``; ``name`` is ``torch`` or
    ``onnx``."""

    def __init__(self, model: nn.Module, pre: Preprocess, rt: Runtime, name: str = "torch", reason: str = "",
                 session: Any = None, key: str = "", path: Path | None = None, verified: bool = False,
                 fresh: bool = False, fingerprint: str = ""):
        self.model, self.rt = model, rt
        self.name, self.reason = name, reason
        self.session, self.key, self.path = session, key, path
        self.verified = verified
        self.fresh = fresh  # the ONNX file was exported by this engine (else: read from the cache)
        self.pre = pre
        self.fingerprint = fingerprint  # of the loaded file (see _load): what a verification is recorded for
        self.max_abs_diff: float | None = None
        self._run: nn.Module | None = None  # what _torch runs (set on its first call)
        self.fold = False  # _torch runs a batch-norm-folded copy (set by feature_engine for the job's size)

    def _torch(self, pixels: torch.Tensor) -> np.ndarray:
        if self._run is None:
            # outside inference mode (extraction runs in it): weights remade there are inference tensors, which
            # can never be trained again, and fine-tuning follows the probe's features on this very model
            with torch.inference_mode(False):
                # a copy with the batch norms folded into the convolutions (tl_core.models.folding: 1.28-1.40x
                # as fast for Lite0 here), else the model itself; channels-last for channels-last input (a mixed
                # pair ran ~3x slower here)
                folded_ = folded(self.model, _pooled) if self.fold else None
                run = folded_ if folded_ is not None else self.model
                self._run = run.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            # uint8 to the device (a quarter of float's bytes), normalised there, channels-last
            x = self.pre.normalize_pixels(pixels.to(self.rt.device, non_blocking=True))
            with self.rt.autocast():
                return _pooled(self._run, x).float().cpu().numpy()

    def _onnx(self, pixels: torch.Tensor) -> np.ndarray:
        a = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.uint8)
        return np.asarray(self.session.run(None, {"pixels": a})[0], dtype=np.float32)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """Features of the NHWC uint8 batch ``x``."""
        if self.name == "torch":
            return self._torch(x)
        try:
            got: np.ndarray | None = self._onnx(x)
        except Exception as e:  # a graph that does not fit this input (wrong file), out of memory...
            log.warning("feature engine: ONNX Runtime failed on a batch (%s: %s)", type(e).__name__, str(e)[:200])
            got = None
            if self.verified:
                self._reject(f"it failed on a batch ({type(e).__name__})")
                return self._torch(x)
        if not self.verified:
            # PyTorch on the batch's first VERIFY_IMAGES images: 0.2 s instead of 0.8 s for 32 here (features
            # are per image; a wrong graph shows on any of them)
            ref = self._torch(x[:VERIFY_IMAGES])
            sub = got[:VERIFY_IMAGES] if got is not None else None
            diff = float(np.abs(sub - ref).max()) if sub is not None and sub.shape == ref.shape else float("inf")
            self.max_abs_diff = diff
            if (diff > TOLERANCE or not np.isfinite(diff)) and not self.fresh and self.path is not None:
                log.warning("feature engine: the cached ONNX file %s differs from PyTorch by %.2e; rebuilding it",
                            self.path.name, diff)
                try:
                    _forget(self.path)
                    _export(self.model, self.path, self.pre)
                    (self.session, self.fingerprint), self.fresh = _load(self.path), True
                    return self(x)
                except Exception as e:
                    self._reject(f"its rebuilt ONNX file failed ({type(e).__name__})")
                    return self._torch(x)
            if diff > TOLERANCE or not np.isfinite(diff):
                self._reject(f"its features differ from PyTorch's by {diff:.2e} (> {TOLERANCE:g})")
                return self._torch(x)
            self.verified = True
            _remember(self.key, self.session)
            if self.path is not None:  # a new process loading these very bytes need not verify them again
                _write_atomic(self.path.with_suffix(".verified"), self.fingerprint)
            log.info("feature engine: ONNX Runtime, verified on the first batch (max abs diff %.1e)", diff)
        assert got is not None
        return got

    def _reject(self, why: str) -> None:
        log.warning("feature engine: ONNX Runtime not used, %s; using PyTorch", why)
        with _lock:
            _failed.add(self.key)
            _sessions.pop(self.key, None)
        if self.path is not None:
            _forget(self.path)
            _write_atomic(self.path.with_suffix(".failed"), why + "\n")
        self.name, self.reason, self.session = "torch", f"ONNX Runtime rejected: {why}", None


def _export(module: nn.Module, path: Path, pre: Preprocess) -> None:
    """Write ``module``'s pooled features as ONNX (input ``pixels``: NHWC uint8 crops of ``pre``'s input size;
    output ``features``; dynamic batch), atomically."""
    import importlib.util

    example = torch.randint(0, 256, (2, pre.input_size, pre.input_size, 3), dtype=torch.uint8)
    wrapped = _Pooled(module, pre).eval()
    # exporters print progress; keep stdout clean for --json
    with writing_atomic(path, suffix=".onnx") as tmp, contextlib.redirect_stdout(sys.stderr), \
            warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), activations_out_of_place(wrapped):
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("onnxscript") is not None:
            program = torch.onnx.export(wrapped, (example,), dynamo=True, opset_version=_OPSET,
                                        input_names=["pixels"], output_names=["features"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        verbose=False, optimize=True)
            program.save(str(tmp))
        else:  # the legacy exporter needs nothing else (its graph ran ~1.6x slower than dynamo's here)
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=_OPSET,
                              input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}})


def _remember(key: str, session: Any) -> None:
    """Keep a verified session for the life of the process (the four newest)."""
    with _lock:
        _sessions[key] = session
        while len(_sessions) > 4:
            _sessions.pop(next(iter(_sessions)))


def _forget(path: Path) -> None:
    """Remove an ONNX file and the record of its verification."""
    for p in (path, path.with_suffix(".verified")):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    """A best-effort record beside an ONNX file (a read-only cache only costs a re-verification)."""
    with contextlib.suppress(OSError):
        write_atomic(path, text)


def _load(path: Path) -> tuple[Any, str]:
    """An ONNX Runtime session of the file, and the fingerprint of what it runs: the file's SHA-256 (of the very
    bytes loaded), the ONNX Runtime version and the machine's architecture (~15 ms for Lite0's 14 MB)."""
    import onnxruntime as ort

    data = path.read_bytes()
    fingerprint = f"{hashlib.sha256(data).hexdigest()} onnxruntime-{ort.__version__} {platform.machine()}"
    return _session(data), fingerprint


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = thread_count()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def feature_engine(model: nn.Module, pre: Preprocess, runtime: Runtime | None = None,
                   cache_dir: str | os.PathLike | None = None, n_images: int = 0) -> FeatureEngine:
    """The engine for ``model``'s pooled features (see the module doc for the rule); on PyTorch, with the batch
    norms folded (:func:`~tl_core.models.folding.fold_wanted`) for a large enough job. Arguments: as
    :func:`_choose`."""
    engine = _choose(model, pre, runtime, cache_dir, n_images)
    # also for an ONNX engine: its first batch's check runs on PyTorch, and PyTorch takes over, with the same
    # features to the bit, wherever ONNX Runtime fails
    engine.fold = fold_wanted(n_images)
    return engine


def _choose(model: nn.Module, pre: Preprocess, runtime: Runtime | None = None,
            cache_dir: str | os.PathLike | None = None, n_images: int = 0) -> FeatureEngine:
    """The engine for ``model``'s pooled features (see the module doc for the rule).

    Args:
        model: the frozen module (eval mode) whose :func:`pooled_features` are wanted.
        pre: the model's preprocessing (the ONNX graph has a fixed image size and normalisation, a dynamic batch).
        runtime: device, precision and distributed group (default CPU).
        cache_dir: the workspace cache; the ONNX file lives in ``<cache_dir>/engines/`` (None: in a
            per-user folder under the system's temporary directory).
        n_images: images this job will run (``auto`` exports a missing file only for a large enough job).
    """
    rt = runtime or Runtime.cpu()
    setting = engine_setting()
    if setting == "torch":
        return FeatureEngine(model, pre, rt, reason="TL_ENGINE=torch")
    if rt.distributed or rt.device.type != "cpu" or rt.precision != "fp32" or torch.is_autocast_enabled():
        return FeatureEngine(model, pre, rt, reason="PyTorch keeps GPU, mixed-precision and torchrun work")
    try:
        import onnxruntime  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        log.warning("feature engine: onnxruntime is unavailable (%s); using PyTorch", type(e).__name__)
        return FeatureEngine(model, pre, rt, reason="onnxruntime is not installed")
    key = engine_key(model, pre)
    with _lock:
        session = _sessions.get(key)
        failed = key in _failed
    if session is not None:
        return FeatureEngine(model, pre, rt, "onnx", "verified earlier in this process", session, key, verified=True)
    if setting == "auto" and n_images < SESSION_MIN_IMAGES:
        return FeatureEngine(model, pre, rt, reason=f"{n_images} images: too few to pay for loading and verifying an "
                                               f"ONNX session (fewer than {SESSION_MIN_IMAGES})")
    if cache_dir is not None:
        path = Path(cache_dir) / "engines" / f"{key}.onnx"
    else:
        import tempfile

        path = Path(tempfile.gettempdir()) / f"tl-engines-{os.getuid() if hasattr(os, 'getuid') else 0}" / f"{key}.onnx"
    if setting == "auto" and (failed or path.with_suffix(".failed").exists()):
        return FeatureEngine(model, pre, rt, reason="ONNX Runtime failed verification for this model before")
    if setting == "auto" and not path.exists():
        so_far, need = _images_so_far(path), _export_min_images(model)
        if so_far + n_images < need:  # rent: PyTorch, and count what it ran (best effort)
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path.with_suffix(".images"), str(so_far + n_images))
            return FeatureEngine(model, pre, rt, reason=f"{n_images} images ({so_far + n_images} so far on "
                                 f"PyTorch): too few yet to pay for an ONNX export (it pays from {need}, "
                                 "TL_ONNX_MIN_IMAGES)")
    fresh = False
    for attempt in range(2):
        exporting = not path.exists()
        try:
            if exporting:
                log.info("feature engine: exporting %s to ONNX (%s)", type(model).__name__, path.name)
                _export(model, path, pre)
                fresh = True
            session, fingerprint = _load(path)
            if not exporting:  # used now: the cache evicts least recently used first (tl_core.cache)
                with contextlib.suppress(OSError):
                    os.utime(path)
            break
        except Exception as e:
            if exporting or attempt:
                log.warning("feature engine: ONNX export or load failed (%s: %s); using PyTorch",
                            type(e).__name__, str(e)[:200])
                _forget(path)
                return FeatureEngine(model, pre, rt, reason=f"ONNX export failed: {type(e).__name__}")
            log.warning("feature engine: the cached ONNX file %s does not load (%s); rebuilding it",
                        path.name, type(e).__name__)
            _forget(path)
    if not fresh and _read(path.with_suffix(".verified")) == fingerprint:
        # the very bytes verified before, on this ONNX Runtime and architecture: no PyTorch pass this time
        _remember(key, session)
        return FeatureEngine(model, pre, rt, "onnx", "cached ONNX file, verified before", session, key, path,
                             verified=True, fingerprint=fingerprint)
    return FeatureEngine(model, pre, rt, "onnx", "exported now" if fresh else "cached ONNX file", session, key, path,
                         fresh=fresh, fingerprint=fingerprint)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None

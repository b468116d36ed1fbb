"""The one owner of a run's files: what a run directory (or a bundle) holds, written atomically and read back
validated. No other module opens or parses these files.

=========================  ==========================================================================
``config.json``            the :class:`~tl_core.config.TrainConfig` (``tl-core train --config`` repeats the run)
``meta.json``              architecture, classes, preprocessing, weights source, dataset summary, temperature,
                           and on what the saved head was fitted (``fit_on``)
``model.safetensors``      the saved model's weights (safetensors only: a pickle can run code)
``val_head.safetensors``   a refitted linear run only: the head fitted on training images alone, which
                           produced the validation predictions (every view of validation explains it)
``metrics.json``           validation and test metrics, per-epoch history, best epoch, how training stopped,
                           the calibration record
``predictions.json``       raw logits per split with the image paths and true labels, and which fitted model
                           produced them
``ood.json``               open-set score: its name, threshold, quantile, n, feature dim, calibration scores
                           (:mod:`tl_core.models.openset`; runs from before it have none)
``ood_bank.safetensors``   the training images' pre-logit features, L2-normalised float16 (``bank``), and
                           (version 2) their style vectors (``style``)
=========================  ==========================================================================

Predictions are stored once, as logits; every view derives probabilities with
:func:`tl_core.metrics.softmax` and the run's temperature, so the Evaluate page, Grad-CAM, the
calibration, the embedding map, the model card, the HTML report and the exports show the same label and
confidence for the same image. A bundle holds the same files (minus predictions), read through the same
parsers (:meth:`RunFiles.from_bytes`).

This module imports no torch: the app's server reads results through it without loading a network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .. import __version__
from ..config import TrainConfig
from ..errors import ConfigError, ExportError, RunError
from ..fileio import write_json_atomic, writing_atomic
from ..metrics import softmax
from .workspace import Workspace

__all__ = [
    "MODEL_FORMAT",
    "PREDICTIONS_FORMAT",
    "SAVED",
    "VALIDATION_FIT",
    "RUN_FILES",
    "BUNDLE_FILES",
    "OPEN_SET_FILES",
    "RunMeta",
    "RunMetrics",
    "SplitPredictions",
    "Predictions",
    "RunFiles",
    "MANIFEST",
    "bundle_manifest",
    "resolve_run",
    "read_config_file",
    "write_json_atomic",
]

#: ``meta.json`` format this version writes and reads.
MODEL_FORMAT = "tl-studio-model/1"
#: ``predictions.json`` format this version writes (format 1, probabilities per row, is still read).
PREDICTIONS_FORMAT = "tl-studio-predictions/2"
#: The model that produced a split's predictions: the saved one, or (refitted linear runs, validation split)
#: the head fitted on training images alone, kept as ``val_head.safetensors``.
SAVED = "saved"
VALIDATION_FIT = "validation-fit"

CONFIG, META, WEIGHTS, VAL_HEAD, METRICS, PREDICTIONS = (
    "config.json", "meta.json", "model.safetensors", "val_head.safetensors", "metrics.json", "predictions.json")
OOD, OOD_BANK = "ood.json", "ood_bank.safetensors"
# The format of ood.json, which this module validates on reading (tl_core.models.openset writes and scores it).
#: The score's name in ``ood.json`` (version 2: content and style).
SCORE = "style-content"
#: ``ood.json`` version written now (1 and 2 are read).
VERSION = 2
#: The version-1 score (content only; its threshold a cosine distance between 0 and 2).
V1_SCORE = "knn-cosine"
#: The largest threshold a person may set on a version-2 score (1.0 = the calibrated one).
MAX_THRESHOLD = 10.0
#: The open-set files (both or neither): a bundle carries them when the run has them.
OPEN_SET_FILES = (OOD, OOD_BANK)
#: Every file a finished run directory may hold.
RUN_FILES = (CONFIG, META, WEIGHTS, VAL_HEAD, METRICS, PREDICTIONS, OOD, OOD_BANK)
#: Files a run directory or bundle must hold to load as a model.
BUNDLE_FILES = (WEIGHTS, META, CONFIG)

#: A bundle's table of contents: every file's SHA-256 and size, recorded at export and checked on loading.
MANIFEST = "manifest.json"
BUNDLE_FORMAT = "tl-studio-bundle/1"

_MAX_JSON_BYTES = 64 * 1024**2
_MAX_WEIGHTS_BYTES = 4 * 1024**3
#: Weights files that unpickle (run code) when loaded: refused.
_PICKLED_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt")
_INTERPOLATIONS = {"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"}


def _positive(x: Any) -> bool:
    """A finite number above zero (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# --------------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunMeta:
    """``meta.json``: what is needed to rebuild, feed and describe the model."""

    backbone: str
    arch: str
    classes: list[str]
    preprocess: dict[str, Any]  # input_size, resize, interpolation, mean, std (see models.preprocess.Preprocess)
    data_config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)  # source, detail, fingerprint
    dataset: dict[str, Any] = field(default_factory=dict)  # source, fingerprint, counts, split, warnings, ...
    temperature: float = 1.0
    fit_on: str = "train"  # "train+val": a linear head refitted on validation images too
    runtime: dict[str, Any] = field(default_factory=dict)  # device, precision, world_size it was trained with
    multi_label: bool = False  # one sigmoid output per label (see tl_core.models.multilabel)
    thresholds: list[float] | None = None  # multi-label: per-label decision thresholds chosen on validation
    # linear runs: the probe's feature variant and how it was chosen (models.feature_variants.FeatureChoice);
    # a variant other than "last" saves a VariantModel, rebuilt from this record
    features: dict[str, Any] = field(default_factory=dict)
    format: str = MODEL_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def refitted(self) -> bool:
        """Whether the saved head was refitted on training + validation images (linear runs, ``refit``):
        its outputs on the validation images are then in-sample, and ``val_head.safetensors`` holds the
        training-only head that produced the validation predictions."""
        return self.fit_on == "train+val"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d["num_classes"] = self.num_classes
        if not self.multi_label:  # a single-label model's meta.json stays as it was
            d.pop("multi_label")
            d.pop("thresholds")
        return {**self.extra, **d}

    @classmethod
    def parse(cls, data: Any, where: str) -> "RunMeta":
        """Validate parsed ``meta.json``; raise :class:`ExportError` saying what is wrong."""
        if not isinstance(data, dict) or not {"classes", "num_classes", "preprocess"} <= set(data):
            raise ExportError(f"{where}: meta.json lacks classes/num_classes/preprocess; not a TL Studio model.")
        fmt = str(data.get("format", MODEL_FORMAT))
        if not fmt.startswith("tl-studio-model/"):
            raise ExportError(f"{where}: meta.json has format {fmt!r}; not a TL Studio model.")
        if fmt != MODEL_FORMAT:
            raise ExportError(f"{where}: the model has format {fmt} but this TL Studio reads {MODEL_FORMAT}; "
                              "update TL Studio (pip install -U tl-studio).")
        classes = data["classes"]
        if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise ExportError(f"{where}: meta.json 'classes' must be a list of distinct, non-empty names.")
        try:
            n = int(data["num_classes"])
        except (TypeError, ValueError):
            raise ExportError(f"{where}: meta.json num_classes={data['num_classes']!r} is not a number.") from None
        if len(classes) != n:
            raise ExportError(f"{where}: meta.json lists {len(classes)} classes but says num_classes={n}.")
        arch = data.get("arch") or data.get("backbone")
        if not isinstance(arch, str) or not arch:
            raise ExportError(f"{where}: meta.json names no architecture (arch).")
        pre = data["preprocess"]
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
        t = data.get("temperature", 1.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ExportError(f"{where}: meta.json temperature {t!r} must be a positive number.")
        multi = data.get("multi_label", False)
        th = data.get("thresholds")
        if not isinstance(multi, bool):
            raise ExportError(f"{where}: meta.json multi_label must be true or false (got {multi!r}).")
        if th is not None and (not isinstance(th, list) or len(th) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in th)):
            raise ExportError(f"{where}: meta.json thresholds must be {n} numbers between 0 and 1, one per label.")
        known = {f.name for f in dataclasses.fields(cls)} | {"num_classes"}
        return cls(backbone=str(data.get("backbone") or arch), arch=arch, classes=list(classes),
                   preprocess=dict(pre), data_config=dict(data.get("data_config") or {}),
                   weights=dict(data.get("weights") or {}), dataset=dict(data.get("dataset") or {}),
                   temperature=float(t), fit_on=str(data.get("fit_on") or "train"),
                   runtime=dict(data.get("runtime") or {}), multi_label=multi,
                   thresholds=[float(x) for x in th] if th is not None else None,
                   features=dict(data.get("features") or {}), format=fmt,
                   extra={k: v for k, v in data.items() if k not in known})


# --------------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------------
@dataclass
class RunMetrics:
    """``metrics.json``: measured quality and how training went.

    ``val`` / ``test`` hold :func:`tl_core.metrics.compute_metrics` reports, each figure with its 95%
    interval (``accuracy_ci``, ...; test: the dataset's own held-out folder, an uploaded one or the locked
    share carved by ``test_split``); ``cv`` a linear run's cross-validated accuracy. ``stop`` says how fine-tuning ended: {"reason": "patience"|"epochs"|"converged",
    "epoch", "epochs", "patience"}.
    """

    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float = 0.0
    stop: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    # a linear run's k-fold cross-validated accuracy on every labelled image (tl_core.models.crossfit):
    # {"accuracy", "accuracy_ci", "correct", "count", "folds", "seconds"}; None for other runs
    cv: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **d}

    @classmethod
    def parse(cls, data: Any, where: str) -> "RunMetrics":
        if not isinstance(data, dict):
            raise ExportError(f"{where}: metrics.json must hold a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: data[k] for k in known if k in data}
        for k, empty in (("val", {}), ("history", []), ("stop", {}), ("epochs_run", 0), ("seconds", 0.0)):
            if kw.get(k) is None:
                kw[k] = empty
        return cls(**kw, extra={k: v for k, v in data.items() if k not in known})


# --------------------------------------------------------------------------------------------------
# predictions.json
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitPredictions:
    """The saved outputs of one split: image paths, true labels and raw logits, and which model produced them."""

    split: str
    paths: list[str]
    labels: list[str]
    logits: np.ndarray  # (N, C) float64
    model: str = SAVED  # SAVED | VALIDATION_FIT

    def __len__(self) -> int:
        return len(self.paths)

    def probs(self, temperature: float = 1.0) -> np.ndarray:
        """softmax(logits / T): the probabilities every view shows."""
        return softmax(self.logits, temperature)

    def targets(self, classes: list[str]) -> np.ndarray:
        """True class indices (-1 for a label the model does not know)."""
        idx = {c: i for i, c in enumerate(classes)}
        return np.array([idx.get(lab, -1) for lab in self.labels], dtype=np.int64)

    def rows(self, classes: list[str], temperature: float = 1.0) -> list[dict[str, Any]]:
        """One row per image: path, true, predicted, confidence, true_prob, loss, correct."""
        p = self.probs(temperature)
        y = self.targets(classes)
        out = []
        for path, label, t, pr in zip(self.paths, self.labels, y, p):
            k = int(pr.argmax())
            tp = float(pr[t]) if t >= 0 else 0.0
            out.append({"path": path, "true": label, "predicted": classes[k], "confidence": float(pr[k]),
                        "true_prob": tp, "loss": float(-math.log(max(tp, 1e-12))), "correct": bool(k == t)})
        return out

    def mistakes(self, classes: list[str], temperature: float = 1.0, k: int | None = None) -> list[dict[str, Any]]:
        """The misclassified images, most confidently wrong first (ties by path)."""
        wrong = [r for r in self.rows(classes, temperature) if not r["correct"]]
        wrong.sort(key=lambda r: (-r["confidence"], r["path"]))
        return wrong[:k] if k else wrong

    def index_of(self, path: str | os.PathLike) -> int | None:
        """The row of an image path (compared resolved), or None."""
        want = str(Path(path).resolve())
        for i, p in enumerate(self.paths):
            if p == str(path) or str(Path(p).resolve()) == want:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "paths": list(self.paths), "labels": list(self.labels),
                "logits": [[round(float(v), 6) for v in row] for row in self.logits]}


@dataclass(frozen=True)
class Predictions:
    """``predictions.json``: the classes and each split's :class:`SplitPredictions`."""

    classes: list[str]
    splits: dict[str, SplitPredictions]

    def get(self, split: str) -> SplitPredictions | None:
        return self.splits.get(split)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PREDICTIONS_FORMAT, "classes": list(self.classes),
                "splits": {k: v.to_dict() for k, v in self.splits.items()}}

    @classmethod
    def parse(cls, data: Any, where: str, refitted: bool = False) -> "Predictions":
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise RunError(f"{where}: predictions.json is damaged (no class list); train the run again.")
        classes = [str(c) for c in data["classes"]]
        n = len(classes)
        splits: dict[str, SplitPredictions] = {}
        if data.get("format") == PREDICTIONS_FORMAT:
            for name, s in (data.get("splits") or {}).items():
                logits = np.asarray(s.get("logits") or np.zeros((0, n)), dtype=np.float64).reshape(-1, n)
                paths, labels = [str(p) for p in s.get("paths") or []], [str(x) for x in s.get("labels") or []]
                if not (len(paths) == len(labels) == len(logits)):
                    raise RunError(f"{where}: predictions.json split {name!r} has mismatched lengths; train again.")
                splits[name] = SplitPredictions(name, paths, labels, logits, str(s.get("model") or SAVED))
        else:  # format 1 (before logits were the record): rows of probabilities, logits of a refitted val split
            for name in ("val", "test"):
                rows = [r for r in data.get(name) or [] if len(r.get("probs") or []) == n]
                if not rows:
                    continue
                has_logits = all("logits" in r for r in rows)
                z = (np.array([r["logits"] for r in rows], dtype=np.float64) if has_logits else
                     np.log(np.clip(np.array([r["probs"] for r in rows], dtype=np.float64), 1e-12, 1.0)))
                model = VALIDATION_FIT if (name == "val" and refitted) else SAVED
                splits[name] = SplitPredictions(name, [str(r["path"]) for r in rows], [str(r["label"]) for r in rows],
                                                z, model)
        return cls(classes, splits)


# --------------------------------------------------------------------------------------------------
# the owner
# --------------------------------------------------------------------------------------------------
class RunFiles:
    """Read and write the files of one run directory, or read those of a bundle (:meth:`from_bytes`).

    Reads are validated and cached per instance; writes are atomic per file. A new run is written into a
    staging folder and moved into place as a whole (:meth:`staging` / :meth:`publish`), so a reader never
    sees half a run.
    """

    def __init__(self, run_dir: str | os.PathLike | None, files: Mapping[str, bytes] | None = None,
                 where: str | None = None):
        self.dir = Path(run_dir) if run_dir is not None else None
        self._bytes = dict(files) if files is not None else None
        self.where = where or (self.dir.name if self.dir is not None else "bundle")
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_bytes(cls, files: Mapping[str, bytes], where: str) -> "RunFiles":
        """The files of a bundle, already read (and size-checked) from its zip."""
        return cls(None, files, where)

    @classmethod
    def open(cls, ref: str | os.PathLike) -> "RunFiles":
        """The model files of a run directory or a bundle ``.zip``, checked before anything is parsed: the files a
        model needs are there, no pickled weights, sizes capped, and a bundle's checksums match its manifest.

        Raises:
            ExportError: what is wrong and what to do.
        """
        p = Path(ref)
        if not p.exists():
            raise ExportError(f"{p} does not exist; give a run directory or a bundle .zip.")
        if p.is_dir():
            _check_dir(p)
            return cls(p)
        if zipfile.is_zipfile(p):
            return cls.from_bytes(_read_bundle(p), p.name)
        raise ExportError(f"{p.name} is neither a run directory nor a bundle .zip.")

    # -- raw access ------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        if self._bytes is not None:
            return name in self._bytes
        return self.dir is not None and (self.dir / name).is_file()

    def path(self, name: str) -> Path:
        if self.dir is None:
            raise RunError(f"{self.where} is a bundle: it has no {name} on disk.")
        return self.dir / name

    def raw(self, name: str) -> bytes:
        """A file's bytes, size-capped.

        Raises:
            RunError: the file is missing (the run did not finish, or its files were removed).
        """
        if self._bytes is not None:
            if name not in self._bytes:
                raise RunError(f"{self.where} has no {name}.")
            return self._bytes[name]
        f = self.path(name)
        try:
            size = f.stat().st_size
        except OSError:
            raise RunError(f"Run {self.where} has no {name} (not finished, or its files were removed).") from None
        limit = _MAX_WEIGHTS_BYTES if name.endswith(".safetensors") else _MAX_JSON_BYTES
        if size > limit:
            raise ExportError(f"{self.where}: {name} is {size / 1e6:.0f} MB, above the {limit / 1e6:.0f} MB limit.")
        return f.read_bytes()

    def _json(self, name: str) -> Any:
        data = self.raw(name)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ExportError(f"{self.where}: {name} is not UTF-8 text; the file was replaced or damaged. "
                              "Export the model again.") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"{self.where}: {name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "it was edited or damaged. Export the model again.") from None

    def _cached(self, name: str, parse: Any) -> Any:
        if name not in self._cache:
            self._cache[name] = parse()
        return self._cache[name]

    def stamp(self) -> tuple:
        """(name, size, mtime) of every file: changes whenever the run's files do (a key for derived results)."""
        out = []
        for name in RUN_FILES:
            try:
                st = self.path(name).stat()
                out.append((name, st.st_size, st.st_mtime_ns))
            except (OSError, RunError):
                out.append((name, None, None))
        return tuple(out)

    # -- typed reads -------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The saved training configuration as a dict (a bundle may come from another version)."""
        def parse() -> dict[str, Any]:
            cfg = self._json(CONFIG)
            if not isinstance(cfg, dict):
                raise ExportError(f"{self.where}: config.json must hold a JSON object (the training configuration).")
            return cfg
        return self._cached(CONFIG, parse)

    def config(self) -> TrainConfig:
        """The saved :class:`TrainConfig` (keys this version does not know are ignored, with a warning)."""
        return TrainConfig.from_saved(self.config_dict())

    def meta(self) -> RunMeta:
        return self._cached(META, lambda: RunMeta.parse(self._json(META), self.where))

    def metrics(self) -> RunMetrics:
        """The run's metrics (empty for a bundle that carries none)."""
        if not self.has(METRICS) and self._bytes is not None:
            return RunMetrics()
        return self._cached(METRICS, lambda: RunMetrics.parse(self._json(METRICS), self.where))

    def predictions(self) -> Predictions:
        """The saved predictions.

        Raises:
            RunError: none were saved (a bundle carries none) or the file is damaged.
        """
        if not self.has(PREDICTIONS):
            raise RunError(f"{self.where} has no saved predictions (bundles carry none); use the run directory.")
        return self._cached(PREDICTIONS, lambda: Predictions.parse(self._json(PREDICTIONS), self.where,
                                                                   refitted=self.meta().refitted))

    @property
    def temperature(self) -> float:
        return self.meta().temperature

    def weights(self, name: str = WEIGHTS) -> dict[str, Any]:
        """A safetensors state dict (``model.safetensors`` or ``val_head.safetensors``) as torch tensors.

        Raises:
            ExportError: the file is a pickle (refused: it can run code) or not valid safetensors.
        """
        from safetensors.torch import load as st_load

        data = self.raw(name)
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save output: zip or raw pickle
            raise ExportError(f"{self.where}: {name} is a pickle (torch.save), not a safetensors file; refused "
                              "because loading a pickle can run arbitrary code. Export the model again with TL Studio.")
        try:
            return st_load(data)
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise ExportError(f"{self.where}: {name} is not a valid safetensors file ({str(e)[:160]}); "
                              "it is damaged. Export the model again.") from None

    def validation_head(self) -> dict[str, Any] | None:
        """The training-only head of a refitted linear run (classifier tensors), or None."""
        return self.weights(VAL_HEAD) if self.has(VAL_HEAD) else None

    def open_set_record(self) -> dict[str, Any] | None:
        """``ood.json`` validated (see :mod:`tl_core.models.openset`), or None for a run from before open-set
        scores.

        Raises:
            ExportError: the file is damaged or from a newer version.
        """
        if not self.has(OOD):
            return None

        def parse() -> dict[str, Any]:
            d = self._json(OOD)
            v1 = isinstance(d, dict) and d.get("score") == V1_SCORE and d.get("version") == 1
            if not isinstance(d, dict) or not (v1 or (d.get("score") == SCORE and d.get("version") == VERSION)):
                raise ExportError(f"{self.where}: ood.json is not a {SCORE} record of version {VERSION} (nor a "
                                  f"{V1_SCORE} record of version 1); train the run again (or update TL Studio).")
            t, hi = d.get("threshold"), (2.0 if v1 else MAX_THRESHOLD)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t <= hi):
                raise ExportError(f"{self.where}: ood.json threshold {t!r} must be between 0 and {hi:g}; it was "
                                  "edited or damaged. Export the model again.")
            if not isinstance(d.get("dim"), int) or d["dim"] <= 0:
                raise ExportError(f"{self.where}: ood.json lacks the feature dimension; train the run again.")
            if not v1:
                ok = isinstance(d.get("content"), dict) and _positive(d["content"].get("threshold"))
                st = d.get("style")
                if st is not None:
                    ok = ok and isinstance(st, dict) and isinstance(st.get("thresholds"), list) and \
                        all(_positive(x) for x in st["thresholds"]) and isinstance(st.get("dims"), list) and \
                        isinstance(st.get("bank_dim"), int) and isinstance(st.get("stages"), list)
                if not ok:
                    raise ExportError(f"{self.where}: ood.json lacks its content or style thresholds; it was edited "
                                      "or damaged. Export the model again.")
            return d
        return self._cached(OOD, parse)

    def _open_set_tensors(self) -> dict[str, np.ndarray]:
        def parse() -> dict[str, np.ndarray]:
            from safetensors.numpy import load as np_load

            try:
                return np_load(self.raw(OOD_BANK))
            except Exception as e:  # safetensors' own error types for bad headers or truncation
                raise ExportError(f"{self.where}: ood_bank.safetensors is not a valid safetensors file "
                                  f"({str(e)[:160]}); export the model again.") from None
        return self._cached(OOD_BANK, parse)

    def open_set_bank(self) -> np.ndarray | None:
        """The content bank (M, D) float16 of ``ood_bank.safetensors``, checked against ``ood.json``, or None."""
        rec = self.open_set_record()
        if rec is None:
            return None
        if not self.has(OOD_BANK):
            raise ExportError(f"{self.where}: ood.json is there but ood_bank.safetensors is missing; "
                              "export the model again.")
        bank = self._open_set_tensors().get("bank")
        if bank is None or bank.ndim != 2 or bank.shape[1] != rec["dim"] or len(bank) < 2:
            raise ExportError(f"{self.where}: ood_bank.safetensors does not hold a bank of dimension "
                              f"{rec['dim']}; export the model again.")
        return bank

    def open_set_style_bank(self) -> np.ndarray | None:
        """The style bank (M, S) float16 (one unit vector per group of stages, joined), or None for a record
        without style (version 1, or a backbone without style statistics)."""
        rec = self.open_set_record()
        if rec is None or not rec.get("style"):
            return None
        bank = self.open_set_bank()
        style = self._open_set_tensors().get("style")
        if style is None or style.ndim != 2 or style.shape != (len(bank), rec["style"]["bank_dim"]):
            raise ExportError(f"{self.where}: ood_bank.safetensors lacks the style rows ood.json describes; "
                              "export the model again.")
        return style

    # -- writes ------------------------------------------------------------------------------------
    def _writable(self) -> Path:
        if self.dir is None:
            raise RunError(f"{self.where} is a bundle and cannot be changed; change the run, then export again.")
        self._cache.clear()
        return self.dir

    def write_config(self, cfg: TrainConfig) -> None:
        (self._writable()).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / CONFIG, cfg.to_dict())

    def write_meta(self, meta: RunMeta) -> None:
        self._writable().mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / META, meta.to_dict())

    def write_metrics(self, metrics: RunMetrics) -> None:
        self._writable().mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / METRICS, metrics.to_dict())

    def write_predictions(self, predictions: Predictions) -> None:
        self._writable().mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / PREDICTIONS, predictions.to_dict(), indent=None)

    def write_weights(self, state: Mapping[str, Any], name: str = WEIGHTS) -> None:
        """Save a state dict as safetensors (contiguous tensors), atomically."""
        from safetensors.torch import save_file

        with writing_atomic(self._writable() / name) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))

    def write_validation_head(self, state: Mapping[str, Any]) -> None:
        self.write_weights(state, VAL_HEAD)

    def write_open_set(self, record: Mapping[str, Any], bank: np.ndarray | None = None,
                       style_bank: np.ndarray | None = None) -> None:
        """Write ``ood.json`` (and the bank, with its style rows when given), atomically."""
        d = self._writable()
        d.mkdir(parents=True, exist_ok=True)
        if bank is not None:
            from safetensors.numpy import save_file

            with writing_atomic(d / OOD_BANK) as tmp:
                tensors = {"bank": np.ascontiguousarray(bank, dtype=np.float16)}
                if style_bank is not None:
                    tensors["style"] = np.ascontiguousarray(style_bank, dtype=np.float16)
                save_file(tensors, str(tmp))
        write_json_atomic(d / OOD, dict(record))

    def set_temperature(self, temperature: float, record: dict[str, Any]) -> None:
        """Apply a fitted temperature to the run (meta) and keep its calibration record (metrics)."""
        meta = dataclasses.replace(self.meta(), temperature=float(temperature))
        metrics = self.metrics()
        metrics.calibration = dict(record)
        self.write_meta(meta)
        self.write_metrics(metrics)

    def move_images(self, old: str | os.PathLike, new: str | os.PathLike) -> int:
        """Point the saved predictions at images that moved from folder ``old`` to folder ``new`` (a renamed
        dataset), so that every image view finds them again.

        Returns:
            How many image paths changed.
        """
        old, new = str(old), str(new)
        preds = self.predictions()
        changed = 0
        for sp in preds.splits.values():
            for i, p in enumerate(sp.paths):
                if p == old or p.startswith(old + os.sep):
                    sp.paths[i] = new + p[len(old):]
                    changed += 1
        if changed:
            self.write_predictions(preds)
        return changed

    # -- a new run, published whole ----------------------------------------------------------------
    @classmethod
    def staging(cls, run_dir: str | os.PathLike) -> "RunFiles":
        """A private folder next to ``run_dir`` to write a new run into; :meth:`publish` moves it into place."""
        run_dir = Path(run_dir)
        tmp = run_dir.with_name(f".{run_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return cls(tmp, where=run_dir.name)

    def publish(self, run_dir: str | os.PathLike) -> "RunFiles":
        """Move a staged run into ``run_dir`` (replacing an older attempt at the same run id)."""
        run_dir = Path(run_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(self._writable(), run_dir)
        return RunFiles(run_dir)

    @staticmethod
    def discard(run_dirs: Iterable[Path]) -> None:
        """Remove staged folders left by a run that failed."""
        for d in run_dirs:
            shutil.rmtree(d, ignore_errors=True)


def resolve_run(ref: str | os.PathLike, workspace: Workspace | None = None) -> Path:
    """The directory of a trained run given as a run id (in the workspace) or a run directory: the one resolver of
    a ``RUN`` argument (the CLI, calibration, the embedding map, loading a model).

    Raises:
        RunError: no such run, or it has no trained model (still running, failed, files removed).
    """
    p = Path(ref)
    if p.is_dir() and RunFiles(p).has(META):
        return p
    ws = workspace or Workspace.default()
    ref = str(ref)
    d = ws.run_dir(ref) if "/" not in ref else p
    if d.is_dir() and RunFiles(d).has(META):
        return d
    if "/" not in ref and ws.store().exists(ref):
        run = ws.store().get(ref)
        raise RunError(f"Run {ref} has status '{run['status']}' and no trained model"
                       + (f" ({run['error']})" if run.get("error") else "") + ".")
    if d.is_dir():
        raise RunError(f"{ref} is not a trained run (no {META}); give a run id or run directory of a finished run.")
    raise RunError(f"No run or run directory {ref!r}; `tl-core runs` lists the runs in {ws.home}.")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The training settings saved in ``path``: a run's ``config.json``, a run directory (its ``config.json``) or any
    JSON file of settings (``tl-core train --config``). Read them with :meth:`TrainConfig.from_saved`.

    Raises:
        ConfigError: the file does not exist, cannot be read, or holds no JSON object.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p} does not exist; give a run's {CONFIG} (or its run directory).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p} is not a readable JSON config ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a JSON object of training settings.")
    return data


def bundle_manifest(files: Mapping[str, bytes]) -> bytes:
    """The :data:`MANIFEST` of a bundle holding ``files``: each file's SHA-256 and size (loading checks them)."""
    return json.dumps({"format": BUNDLE_FORMAT, "tl_studio": __version__,
                       "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()}},
                      indent=2).encode()


def _check_dir(p: Path) -> None:
    names = {f.name for f in p.iterdir() if f.is_file()}
    if WEIGHTS not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
        raise ExportError(f"{p.name} holds pickled weights instead of {WEIGHTS}; refused (pickles can run "
                          "code). Train or export the model again with TL Studio.")
    missing = [f for f in BUNDLE_FILES if f not in names]
    if missing:
        raise ExportError(f"{p} is not a trained run: {', '.join(missing)} missing.")


def _read_bundle(p: Path) -> dict[str, bytes]:
    """The model files of a bundle zip, as bytes, with size caps."""
    wanted = BUNDLE_FILES + (METRICS, MANIFEST) + OPEN_SET_FILES
    files: dict[str, bytes] = {}
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ExportError(f"{p.name} is not a readable bundle zip ({e}); export the bundle again.") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        # a bundle that was unzipped and zipped again as a folder: accept one common top folder
        prefix = ""
        if META not in infos:
            metas = [n for n in infos if n.endswith(f"/{META}") and n.count("/") == 1]
            if len(metas) == 1:
                prefix = metas[0][: -len(META)]
        names = {n[len(prefix):] for n in infos if n.startswith(prefix)}
        if WEIGHTS not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
            raise ExportError(f"{p.name} holds pickled weights instead of {WEIGHTS}; refused (pickles can run "
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
    _check_manifest(files, p.name)
    return files


def _check_manifest(files: dict[str, bytes], where: str) -> None:
    """Compare every file with the SHA-256 recorded at export (bundles from before manifests pass)."""
    if MANIFEST not in files:
        return
    try:
        manifest = json.loads(files[MANIFEST].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportError(f"{where}: {MANIFEST} is not valid JSON; the bundle is damaged. Export it again.") from None
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict):
        raise ExportError(f"{where}: {MANIFEST} has no 'files' table; the bundle is damaged. Export it again.")
    for name, data in files.items():
        if name == MANIFEST or name not in recorded:
            continue
        want = (recorded[name] or {}).get("sha256") if isinstance(recorded[name], dict) else None
        if want != hashlib.sha256(data).hexdigest():
            raise ExportError(f"{where}: {name} does not match the checksum in {MANIFEST}: the bundle was modified "
                              "or damaged after export. Export it again from the run.")

"""A training run from start to finish: open the data, build the model, train per strategy, evaluate the kept
checkpoint, and write the run through its one owner (:class:`tl_core.storage.files.RunFiles`); record status,
per-epoch metrics and progress in the run store all along.

:func:`run_training` is what the command line and the ``train`` task call; :func:`submit_training` queues a
run for a worker (the app); :func:`cancel_run` stops one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from ..cache import DecodedImageCache, FeatureCache, enforce_cache_limit, recorded
from ..config import TrainConfig
from ..data.intake import ImageItem
from ..data.library import open_data
from ..data.versions import pin
from ..data.report import dataset_report
from ..data.splits import Split, split_dataset
from ..errors import CancelledError, ConfigError, DatasetError, TLError
from ..models.openset import bank_indices, build_open_set
from ..models.backbones import RecordedBackbone, build_model, check_backbone_name, record_backbone, recorded_backbone
from ..models.catalogue import WeightsInfo
from ..models.devices import Runtime, release_free_memory, set_seed, single_threaded
from ..models.distributed import Cancel, RankFailedError, barrier, broadcast, under_torchrun
from ..models.distributed import start as distributed_start
from ..models.distributed import stop as distributed_stop
from ..models.feature_variants import (CANDIDATES, TIE_ORDER, FeatureChoice, apply_variant, block_scales,
                                       choose_features, extraction_variant, recorded_block_dims, recorded_extractor,
                                       RecordedProbe, wrap_trained)
from ..models.features import (DEFAULT_STYLE, extract_features, feature_key, read_cached, style_dims,
                               style_key, style_widths)
from ..models.inference import logits_of_items
from ..models.crossfit import cross_validated_accuracy, out_of_fold_probs
from ..metrics import compute_metrics, softmax
from ..models.preprocess import Preprocess, data_config_for
from ..models.multilabel import choose_thresholds, label_matrix, multilabel_metrics, sigmoid
from ..models.probe import PROBE_MAX_ITERATIONS, fit_linear_head, fit_ovr_head
from ..models.training import EVAL_BATCH, Progress, finetune
from .auto import train_auto
from ..storage.files import SAVED, VALIDATION_FIT, Predictions, RunFiles, RunMeta, RunMetrics, SplitPredictions
from ..storage.processes import identity
from ..storage.workspace import Workspace

__all__ = ["TrainResult", "Strategy", "STRATEGY_REGISTRY", "train_model", "run_training", "result_of"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run reports (the ``train --json`` document is built from it)."""

    run_id: str | None  # None on the ranks other than 0 of a distributed group
    run_dir: str
    status: str
    classes: list[str]
    val_accuracy: float | None
    val_loss: float | None
    test_accuracy: float | None
    best_epoch: int | None
    epochs_run: int
    seconds: float
    weights: dict[str, str]
    counts: dict[str, int]
    error: str | None = None
    stop: dict[str, Any] | None = None  # how fine-tuning ended (see RunMetrics.stop)
    world_size: int = 1  # processes that trained it (torchrun)
    device: str = "cpu"
    precision: str = "fp32"
    dataset_version: str | None = None  # NAME@VERSION of a managed dataset; None for a plain path
    # multi-label runs only (val_accuracy is then the exact-match accuracy)
    multi_label: bool = False
    micro_f1: float | None = None
    macro_f1: float | None = None
    mAP: float | None = None
    exact_match: float | None = None
    micro_f1_ci: list[float] | None = None
    mAP_ci: list[float] | None = None
    thresholds_chosen_on: str | None = None  # "training images, out of fold" | "validation images"
    features: str | None = None  # linear runs: the probe's feature variant (models.feature_variants)
    linear_c: float | None = None  # the probe's C (auto may choose it)
    cv: dict[str, float] | None = None  # auto: mean cross-validation accuracy per candidate ("depths@1": 0.87)
    # how sure the figures are (Wilson 95% intervals, [lo, hi]); cv_*: the linear probe's k-fold
    # cross-validated accuracy on every labelled image (train + validation), out of fold
    val_accuracy_ci: list[float] | None = None
    test_accuracy_ci: list[float] | None = None
    val_count: int = 0
    test_count: int = 0
    cv_accuracy: float | None = None
    cv_accuracy_ci: list[float] | None = None
    cv_count: int = 0
    cv_folds: int = 0
    auto: dict[str, Any] | None = None  # strategy auto: what it tried, each score, and why it kept one

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.multi_label:  # the single-label document stays as it was
            for k in _MULTI_LABEL_FIELDS:
                d.pop(k)
        return d


_MULTI_LABEL_FIELDS = ("multi_label", "micro_f1", "macro_f1", "mAP", "exact_match", "micro_f1_ci", "mAP_ci",
                       "thresholds_chosen_on")


def _linear_probe(model: nn.Module, split: Split, test_items: list[ImageItem], classes: list[str], pre: Preprocess,
                  decoded: DecodedImageCache, cfg: TrainConfig, workspace: Workspace, winfo: WeightsInfo,
                  emit: Progress, should_cancel: Callable[[], bool] | None, rt: Runtime,
                  local_cancel: Callable[[], bool] | None = None, multi_label: bool = False,
                  read: _ProbeInput | None = None) -> tuple[np.ndarray, nn.Linear | None, dict[str, Any]]:
    """Extract (cached) features of train+val(+test), shared out between the ranks under torchrun, and fit the
    logistic-regression head on them, once (rank 0; the other ranks get None).

    Args:
        read: with a recorded backbone (``model``), what :func:`_recorded_if_cached` read back: the vectors are
            read once, before the run commits to no network, so none can go missing after.
    """
    cidx = {c: i for i, c in enumerate(classes)}
    strategy = STRATEGY_REGISTRY[cfg.strategy]
    cfg, variant, fcache, style, scache = _probe_caches(cfg, workspace, winfo, pre, multi_label)
    items = split.train + split.val + (test_items if strategy.probe_is_model else [])
    emit({"stage": "extract", "done": 0, "total": len(items)})
    t_ex = time.perf_counter()
    if isinstance(model, RecordedBackbone):  # every vector cached and read already (_build): no network
        assert read is not None, "a recorded backbone comes with the vectors read for it (_recorded_if_cached)"
        feats, ex, fcache.hits = read.features, read.widths, read.hits
    else:
        ex = recorded_extractor(model, variant, fcache)
    # 16 per batch: as fast as 32 on CPU, and a cancel waits for at most one (shorter) forward pass
    # a linear run's open-set bank also needs the style statistics of its images: from the same forward pass
    feats = feats if isinstance(model, RecordedBackbone) else extract_features(
                             ex, items, pre, decoded, fcache, batch_size=16 if rt.device.type == "cpu" else 64,
                             progress=lambda d, t: emit({"stage": "extract", "done": d, "total": t,
                                                         "eta_s": (time.perf_counter() - t_ex) / max(d, 1) * (t - d)}),
                             should_cancel=should_cancel, runtime=rt,
                             last_cache=None if variant != "depths" else FeatureCache(
                                 workspace.cache_dir / "features", feature_key(cfg.backbone, winfo.fingerprint, pre)),
                             style=style, style_cache=scache)
    feats, style_rows = feats if style is not None else (feats, None)
    info: dict[str, Any] = {"feature_cache": {"hits": fcache.hits, "misses": fcache.misses}, "style": style_rows}
    if not rt.is_main:
        return feats, None, info
    n_tr, n_va = len(split.train), len(split.val)
    ytr = None if multi_label else np.array([cidx[i.label] for i in split.train])
    yva = None if multi_label else np.array([cidx[i.label] for i in split.val])
    probe_cfg = cfg
    on_epoch = lambda m: emit({"stage": "epoch" if strategy.probe_is_model else "probe", **m})  # noqa: E731
    with single_threaded():  # small matrices: on a busy machine two threads only wait for each other
        if strategy.choose_features:
            emit({"stage": "features", "message": "Choosing the features" if cfg.features == "auto" else
                  "Preparing the features"})
            last_dim = getattr(ex, "last_features", feats.shape[1])
            block_dims = list(getattr(ex, "block_dims", []))
            choice = _choose_features_once(fcache, feats[:n_tr + n_va], split.train + split.val,
                                           None if multi_label else np.concatenate([ytr, yva]), n_tr,
                                           len(classes), cfg, last_dim,
                                           block_dims, local_cancel)
            # the cross-validated estimate's features: scaled on every labelled image, as the choice was made,
            # so that it too is the same whatever the seed (its record is then read back by a re-train)
            # (summed in the canonical order: the same bytes whatever the split, so the record's key matches)
            labelled = feats[:n_tr + n_va]
            labelled_items = split.train + split.val
            canonical = sorted(range(n_tr + n_va), key=lambda i: _content_order(labelled_items, i))
            info["cv_scales"] = block_scales(labelled[canonical], last_dim, block_dims)  # also the refit's
            info["cv_features"] = apply_variant(labelled, choice.variant, last_dim, block_dims, info["cv_scales"])
            feats = apply_variant(feats, choice.variant, last_dim, choice.block_dims, np.asarray(choice.scales))
            probe_cfg = dataclasses.replace(cfg, linear_c=choice.linear_c)
            info["features"] = choice
        if multi_label:  # one-vs-rest logistic regression
            head, fit = fit_ovr_head(feats[:n_tr], label_matrix([i.labels for i in split.train], classes),
                                     feats[n_tr:n_tr + n_va], label_matrix([i.labels for i in split.val], classes),
                                     probe_cfg, on_epoch=on_epoch, should_cancel=local_cancel)
        else:
            head, fit = fit_linear_head(feats[:n_tr], ytr, feats[n_tr:n_tr + n_va], yva, len(classes), probe_cfg,
                                        on_epoch=on_epoch, should_cancel=local_cancel)
    info.update(fit)
    # the solver runs to convergence (no user setting caps it); "epoch" keeps the rounds for scripts
    info["stop"] = {"reason": "converged" if fit["converged"] else "iterations", "epoch": info["epochs_run"],
                    "iterations": fit["iterations"], "max_iterations": PROBE_MAX_ITERATIONS}
    return feats, head, info


def _probe_caches(cfg: TrainConfig, workspace: Workspace, winfo: WeightsInfo, pre: Preprocess, multi_label: bool
                  ) -> tuple[TrainConfig, str, FeatureCache, Any, FeatureCache | None]:
    """The probe's config (a label-set probe sees the last layer), the variant extracted, its feature cache, the
    style statistics recorded (linear runs: the open-set bank's) and their cache."""
    if multi_label and cfg.features != "last":
        # auto's cross-validation scores one class per image; a label-set probe sees the last layer
        cfg = dataclasses.replace(cfg, features="last")
    variant = extraction_variant(cfg.features, STRATEGY_REGISTRY[cfg.strategy].choose_features)
    fcache = FeatureCache(workspace.cache_dir / "features", feature_key(cfg.backbone, winfo.fingerprint, pre, variant))
    style = DEFAULT_STYLE if STRATEGY_REGISTRY[cfg.strategy].open_set_style else None
    scache = FeatureCache(workspace.cache_dir / "features", style_key(cfg.backbone, winfo.fingerprint, pre, style)) \
        if style is not None else None
    return cfg, variant, fcache, style, scache


class _ProbeInput(NamedTuple):
    """A linear run's probe input read back from the caches with a recorded backbone (:func:`_recorded_if_cached`)."""

    features: Any  # the vectors of train + val (+ test) (with the style statistics, for the open-set bank)
    widths: Any  # what _linear_probe reads of an extractor (``last_features``, ``block_dims``)
    hits: int  # the feature cache's hits, reported with the run


def _read_back(rec: RecordedBackbone, variant: str, fcache: FeatureCache, items: list[ImageItem], style: Any,
               scache: FeatureCache | None) -> tuple[Any, Any] | tuple[None, None]:
    """A linear run's probe input read back from the caches with a recorded backbone (no timm, no network): the
    features (with the style statistics) of ``items`` and the extractor's widths (``last_features``,
    ``block_dims``), or (None, None) when one vector, the widths or the style's channels are not recorded."""
    block_dims = recorded_block_dims(fcache) if variant == "depths" else []
    sdims = style_widths(rec.feature_channels, style) if (style is not None and rec.feature_channels) else None
    if block_dims is None or (style is not None and not sdims):
        return None, None
    dim = rec.last_features + sum(block_dims)
    got = read_cached(items, fcache, dim, scache if style is not None else None, sum(sdims or []))
    if got is None:
        return None, None
    # what _linear_probe reads of an extractor (a plain timm model, the last layer's, has no last_features)
    widths = SimpleNamespace(block_dims=block_dims,
                             **({"last_features": rec.last_features} if variant != "last" else {}))
    return (got if style is not None else got[0]), widths


def _content_order(items: list[ImageItem], i: int) -> tuple[str, str]:
    """Sort key of image ``i`` in the canonical order of a set of labelled images (by content, then path): the same
    whatever the seed's split."""
    return items[i].sha256 or "", str(items[i].path)


#: bump when choose_features or the probe changes what it would choose: recorded choices are then not reused
#: (2: chosen on every labelled image, whatever the seed)
_CHOICE_VERSION = 2


def _choose_features_once(fcache: FeatureCache, raw_labelled: np.ndarray, items: list[ImageItem],
                          y_labelled: np.ndarray | None, n_train: int, n_classes: int, cfg: TrainConfig, last_dim: int,
                          block_dims: list[int], should_cancel: Callable[[], bool] | None) -> FeatureChoice:
    """:func:`choose_features`, whose ``auto`` cross-validation (15 probe fits: most of a warm re-train) runs once
    per dataset version and backbone: on **every labelled image** (train + validation, in a canonical order by
    content, folds of a fixed seed), so the choice does not depend on the run's seed or split, and is kept beside
    the cached features (``<feature cache>/choices/<key>.json``, keyed by those images' features and labels,
    the candidates and the probe settings; cleared with the features, :func:`_recorded`). A re-train of the same
    data with any seed reads it back. The validation images then took part in choosing among the
    :data:`CANDIDATES` (three): their figure carries that small optimism, as the cross-validated one does.

    Args:
        raw_labelled: the extracted (unscaled) features of ``items``: the training images first (``n_train``),
            then the validation images.
    Returns:
        The choice, its block scales those of this run's training images (as the final fit computes them).
    """
    raw_train = raw_labelled[:n_train]
    if cfg.features != "auto" or y_labelled is None:
        y_train = None if y_labelled is None else y_labelled[:n_train]
        return choose_features(raw_train, y_train, n_classes, cfg, last_dim, block_dims,
                               fit_linear_head, should_cancel)
    order = sorted(range(len(items)), key=lambda i: _content_order(items, i))
    x = np.ascontiguousarray(raw_labelled[order])
    y = np.asarray(y_labelled, np.int64)[order]
    ccfg = dataclasses.replace(cfg, seed=0)
    settings = ["choice", _CHOICE_VERSION, n_classes, last_dim, block_dims, cfg.linear_c, cfg.class_balance,
                list(CANDIDATES), list(TIE_ORDER)]
    out, reused = _recorded(fcache.dir / "choices", settings, [x, y],
                            lambda: choose_features(x, y, n_classes, ccfg, last_dim, block_dims, fit_linear_head,
                                                    should_cancel).to_dict())
    choice = FeatureChoice(**out)
    scales = block_scales(raw_train, last_dim, block_dims) if choice.variant == "depths" else np.zeros(0)
    return dataclasses.replace(choice, scales=[float(v) for v in scales], reused=reused)


#: bump when cross_validated_accuracy or out_of_fold_probs change what they would measure: recorded results are
#: then not reused
_CV_VERSION = 1


def _record_key(settings: list[Any], arrays: list[np.ndarray]) -> str:
    """The name of a recorded result: a hash of ``settings`` (JSON-able, their own version included) and the bytes,
    shapes and dtypes of ``arrays``."""
    h = hashlib.sha256(json.dumps([_CV_VERSION, *settings, [(a.shape, str(a.dtype)) for a in arrays]],
                                  default=str).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _recorded(cache_dir: Path, settings: list[Any], arrays: list[np.ndarray],
              compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``compute()`` (JSON-able), measured once per (settings, arrays): recorded as ``<cache_dir>/<key>.json``
    (:func:`tl_core.cache.recorded`: under the feature cache, cleared and evicted with it) and read back by a later
    run of the same inputs (the feature choice, the cross-validated estimate, out-of-fold probabilities).
    ``settings`` carry what the result depends on besides the arrays, its own version included. Returns (the
    result, whether it was read back)."""
    return recorded(cache_dir / f"{_record_key(settings, arrays)}.json", compute)


def _cross_validate_once(cache_dir: Path, feats: np.ndarray, items: list[ImageItem], cidx: dict[str, int],
                         cfg: TrainConfig, should_cancel: Callable[[], bool] | None) -> dict[str, Any] | None:
    """:func:`cross_validated_accuracy` on every labelled image, in a canonical order (by content) and with folds
    of a fixed seed: it does not depend on how the run split train from validation, so a re-train of the same
    images, features and probe settings (any seed) reads the recorded estimate back (:func:`_recorded`;
    ``reused: true``)."""
    order = sorted(range(len(items)), key=lambda i: _content_order(items, i))
    x = np.ascontiguousarray(feats[order])
    y = np.array([cidx[items[i].label] for i in order], np.int64)
    cfg = dataclasses.replace(cfg, seed=0)
    est, reused = _recorded(cache_dir, ["cv", len(cidx), cfg.linear_c, cfg.class_balance, cfg.epochs], [x, y],
                            lambda: cross_validated_accuracy(x, y, len(cidx), cfg, should_cancel))
    return {**est, "reused": True} if est and reused else est


def _out_of_fold_once(cache_dir: Path, feats: np.ndarray, y: np.ndarray, cfg: TrainConfig,
                      should_cancel: Callable[[], bool] | None) -> np.ndarray | None:
    """:func:`out_of_fold_probs` of the training images, recorded for a re-train of the same images, features,
    probe settings and seed (:func:`_recorded`)."""
    probs, _ = _recorded(cache_dir, ["oof", cfg.linear_c, cfg.class_balance, cfg.epochs, cfg.seed],
                         [np.asarray(feats), np.asarray(y, np.int64)],
                         lambda: (lambda p: None if p is None else p.tolist())(
                             out_of_fold_probs(feats, y, cfg, should_cancel)))
    return None if probs is None else np.asarray(probs, np.float64)


#: bump when the refit (:func:`_refit_once`) changes what it would fit: recorded heads are then not reused
_REFIT_VERSION = 1


def _refit_once(cache_dir: Path, labelled: np.ndarray, labelled_scales: np.ndarray | None, choice: FeatureChoice,
                items: list[ImageItem], cidx: dict[str, int], cfg: TrainConfig,
                should_cancel: Callable[[], bool] | None) -> tuple[nn.Linear, dict[str, Any]]:
    """The single-label probe refitted on every labelled image (train + validation), fitted once per images,
    features and probe settings: in the canonical order (by content), from zero, on the features scaled as the
    cross-validation scales them (on every labelled image), so its input is the same whatever the run's seed or
    split, and a re-train of the same images with any seed reads the head back
    (``<cache_dir>/<key>.npy``, under the feature cache: cleared and evicted with it) instead of fitting it again.

    Args:
        labelled: the features of ``items`` (train then validation) scaled by ``labelled_scales`` (depths).
        labelled_scales: the depths blocks' scales of ``labelled`` (:func:`block_scales` of every labelled
            image); the head is returned for the run's own scales (``choice.scales``, its training images'):
            each block's weights times the ratio of the two, the same logits.
    Returns:
        (the head over the run's features, {"reused": whether it was read back, "iterations"})
    """
    order = sorted(range(len(items)), key=lambda i: _content_order(items, i))
    x = np.ascontiguousarray(labelled[order], dtype=np.float32)
    y = np.array([cidx[items[i].label] for i in order], np.int64)
    cfg = dataclasses.replace(cfg, seed=0)
    f = cache_dir / f"{_record_key(['refit', _REFIT_VERSION, len(cidx), cfg.linear_c, cfg.class_balance], [x, y])}.npy"
    out = {"reused": False, "iterations": 0}

    def fit() -> np.ndarray:
        head, fitted = fit_linear_head(x, y, x[:0], y[:0], len(cidx), cfg, should_cancel=should_cancel)
        out["iterations"] = fitted["iterations"]
        return np.concatenate([head.weight.detach().numpy(), head.bias.detach().numpy()[:, None]], 1)

    def check(wb: np.ndarray) -> None:
        if wb.shape != (len(cidx), x.shape[1] + 1) or wb.dtype != np.float32:
            raise ValueError(f"shape {wb.shape} {wb.dtype}")

    wb, out["reused"] = recorded(f, fit, check)
    w = wb[:, :-1].astype(np.float64)
    if choice.variant == "depths" and labelled_scales is not None and len(choice.scales):
        a = x.shape[1] - sum(choice.block_dims)  # the last layer's columns come first, unscaled
        for n, k_all, k_run in zip(choice.block_dims, labelled_scales, choice.scales):
            w[:, a:a + n] *= float(np.float32(k_all)) / float(np.float32(k_run))
            a += n
    head = nn.Linear(x.shape[1], len(cidx))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(np.ascontiguousarray(wb[:, -1])))
    return head, out


def _classifier_name(model: nn.Module) -> str:
    clf = model.get_classifier()
    return next(name for name, m in model.named_modules() if m is clf)


def _broadcast_head(head: nn.Linear | None, dim: int, n_classes: int, rt: Runtime) -> nn.Linear:
    """Rank 0's fitted head on every rank."""
    out = head if head is not None else nn.Linear(dim, n_classes)
    values = broadcast(rt, torch.cat([out.weight.detach().flatten(), out.bias.detach()]).tolist())
    flat = torch.tensor(values, dtype=torch.float32)
    with torch.no_grad():
        out.weight.copy_(flat[:dim * n_classes].view(n_classes, dim))
        out.bias.copy_(flat[dim * n_classes:])
    return out


def _set_head(model: nn.Module, head: nn.Linear) -> None:
    clf = model.get_classifier()
    with torch.no_grad():
        clf.weight.copy_(head.weight)
        clf.bias.copy_(head.bias)


def _open_set(bank_feats: np.ndarray, calibration_feats: np.ndarray | None, model: nn.Module,
              bank_items: list[ImageItem], root: Any, bank_style: np.ndarray | None = None,
              calibration_style: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray, Any] | None:
    """The open-set record, bank and style bank (:mod:`tl_core.models.openset`), or None (logged) when there are
    too few images for one: the run stays usable, its predictions just carry no ``unknown``. ``bank_style`` None
    (a backbone without style statistics): content only."""
    if bank_style is None:
        dims = None
    elif isinstance(model, RecordedProbe):
        dims = style_widths(model.feature_channels, DEFAULT_STYLE) if model.feature_channels else None
    else:
        dims = style_dims(model, DEFAULT_STYLE)
    try:
        return build_open_set(bank_feats, calibration_feats, bank_style=bank_style if dims else None,
                              calibration_style=calibration_style,
                              style_spec={**DEFAULT_STYLE.to_dict(), "dims": dims} if dims else None,
                              paths=[i.path for i in bank_items], labels=[i.label for i in bank_items], root=root)
    except ValueError as e:
        log.warning("no open-set score for this run: %s", e)
        return None


def _recorded_if_cached(cfg: TrainConfig, weights: str, workspace: Workspace, split: Split,
                        test_items: list[ImageItem], multi_label: bool, rt: Runtime
                        ) -> tuple[RecordedBackbone, _ProbeInput] | None:
    """The backbone's record (:func:`~tl_core.models.backbones.recorded_backbone`) and the probe's input read back
    (:func:`_read_back`) when this run (a frozen backbone's,
    :attr:`Strategy.frozen_backbone`) is in one process and its every vector (features and style statistics) is
    already cached, else None: the run then never builds the network, and reads each vector once."""
    if rt.distributed:
        return None
    rec = recorded_backbone(workspace.cache_dir, cfg.backbone, weights)
    if rec is None:
        return None
    pre = Preprocess.from_data_config(rec.data_config)
    _, variant, fcache, style, scache = _probe_caches(cfg, workspace, rec.weights, pre, multi_label)
    if (variant == "depths" and not recorded_block_dims(fcache)) or not rec.feature_channels:
        return None
    # read (and touched) now, once: _linear_probe takes them from here (one missing: the network is built)
    feats, widths = _read_back(rec, variant, fcache, split.train + split.val + test_items, style, scache)
    return None if feats is None else (rec, _ProbeInput(feats, widths, fcache.hits))


# --------------------------------------------------------------------------------------------------
# the strategies: each a fit function over the run's shared state, in one registry
# --------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What the phases of one run share (built by :func:`train_model` once the data is open and the model built)."""

    cfg: TrainConfig
    strategy: "Strategy"
    workspace: Workspace
    rt: Runtime
    emit: Progress
    should_cancel: Callable[[], bool] | None  # the group's (under torchrun every rank stops together)
    local_cancel: Callable[[], bool] | None  # this process's own (for work rank 0 does alone)
    ds: Any
    split: Split
    test_items: list[ImageItem]
    weights: str  # what build_model was asked for ("random" for a strategy that is not pretrained)
    model: Any  # the network, or a RecordedBackbone (a frozen backbone whose every vector is cached)
    winfo: WeightsInfo
    data_cfg: dict[str, Any]
    pre: Preprocess
    decoded: DecodedImageCache
    history: list[dict[str, Any]] = field(default_factory=list)  # the per-epoch metrics written with the run
    read: _ProbeInput | None = None  # a recorded backbone's probe input, read back by _build

    @property
    def classes(self) -> list[str]:
        return self.ds.classes

    @property
    def cidx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.ds.classes)}

    @property
    def multi(self) -> bool:
        return self.ds.multi_label

    @property
    def n_tr(self) -> int:
        return len(self.split.train)

    @property
    def n_va(self) -> int:
        return len(self.split.val)

    def emit_epoch(self, e: dict[str, Any]) -> None:
        """``emit``, keeping every epoch's metrics in ``history``."""
        if e.get("stage") == "epoch":
            self.history.append({k: v for k, v in e.items() if k != "stage"})
        self.emit(e)


@dataclass
class _Fitted:
    """What a strategy's fit hands to evaluation and writing: the model to save, its logits, and how it was fitted."""

    model: Any
    val_logits: np.ndarray
    test_logits: np.ndarray
    open_set: tuple[dict[str, Any], np.ndarray, Any] | None
    info: dict[str, Any]  # best_epoch, epochs_run, val_loss, stop, feature_cache, features (linear)
    val_head: dict[str, torch.Tensor] | None = None  # a refitted probe's training-only head (validation's model)
    cv_estimate: dict[str, Any] | None = None  # linear, single-label: k-fold accuracy on train + validation
    oof_train: np.ndarray | None = None  # linear, multi-label: out-of-fold probabilities of the training images
    fit_on: str = "train"
    val_model: str = SAVED
    test_model: str = SAVED


@dataclass
class _Scores:
    """The evaluation of a fitted model: validation and test metrics, and a multi-label run's thresholds."""

    val: dict[str, Any]
    test: dict[str, Any] | None
    thresholds: list[float] | None = None
    thresholds_on: str | None = None


def _probe(run: _Run, emit: Progress) -> tuple[np.ndarray, nn.Linear | None, dict[str, Any]]:
    """:func:`_linear_probe` of the run's images (with a recorded backbone, on the vectors :func:`_build` read)."""
    return _linear_probe(run.model, run.split, run.test_items, run.classes, run.pre, run.decoded, run.cfg,
                         run.workspace, run.winfo, emit, run.should_cancel, run.rt, run.local_cancel,
                         multi_label=run.multi, read=run.read)


def _fit_linear(run: _Run) -> _Fitted | None:
    """The linear probe: a logistic-regression head on the frozen backbone's (cached) features, its k-fold estimate
    (or out-of-fold probabilities), optionally refitted on train + validation, and its open-set bank. The head on
    cached features equals the whole model on the images: no second forward pass. Rank 0 alone fits it."""
    cfg, split, n_tr, n_va, classes = run.cfg, run.split, run.n_tr, run.n_va, run.classes
    feats, head, info = _probe(run, run.emit_epoch)
    if not run.rt.is_main:
        return None  # the probe is fitted once, on rank 0
    # out of fold, on the features already extracted: the probe's k-fold accuracy on every labelled image
    # (single-label), or the training images' probabilities the thresholds are chosen on
    run.emit({"stage": "features", "message": "Cross-validating the probe"})
    ccfg = dataclasses.replace(cfg, linear_c=info["features"].linear_c)
    cv_estimate = oof_train = None
    with single_threaded():
        recorded = run.workspace.cache_dir / "features" / "outoffold"
        if run.multi:
            oof_train = _out_of_fold_once(recorded, feats[:n_tr],
                                          label_matrix([i.labels for i in split.train], classes), ccfg,
                                          run.local_cancel)
        else:
            cv_feats = info.pop("cv_features", feats[:n_tr + n_va])
            cv_estimate = _cross_validate_once(recorded, cv_feats, split.train + split.val, run.cidx, ccfg,
                                               run.local_cancel)
    model = wrap_trained(run.model, info["features"], head)  # the last layer: the model itself; else a wrapper
    with torch.no_grad():
        val_logits = head(torch.from_numpy(feats[n_tr:n_tr + n_va])).numpy()
        test_logits = head(torch.from_numpy(feats[n_tr + n_va:])).numpy()
    val_head, fit_on, val_model = None, "train", SAVED
    if cfg.refit and n_va:
        # Validated on images it never saw, the head is fitted again on every labelled image, as the classic
        # recipe does. The validation predictions stay those of the training-only head, kept beside the saved
        # one, so that every view of them explains the model that made them. Test images use the refit.
        run.emit({"stage": "refit", "message": "Refitting the head on training + validation images"})
        name = _classifier_name(model)
        val_head = {f"{name}.weight": head.weight.detach().clone(), f"{name}.bias": head.bias.detach().clone()}
        with single_threaded():
            refit_cfg = dataclasses.replace(cfg, linear_c=info["features"].linear_c)
            if run.multi:
                y_ml = label_matrix([i.labels for i in split.train + split.val], classes)
                head, _ = fit_ovr_head(feats[:n_tr + n_va], y_ml, feats[:0], y_ml[:0], refit_cfg,
                                       should_cancel=run.local_cancel, init=head)
            else:
                head, info["refit"] = _refit_once(recorded.parent / "refits", cv_feats, info.pop("cv_scales", None),
                                                  info["features"], split.train + split.val, run.cidx, refit_cfg,
                                                  run.local_cancel)
        _set_head(model, head)
        with torch.no_grad():
            test_logits = head(torch.from_numpy(feats[n_tr + n_va:])).numpy()
        fit_on, val_model = "train+val", VALIDATION_FIT
    # the bank holds what the saved head was fitted on; a refitted head saw the validation images, so the
    # threshold comes from leave-one-out distances within the bank instead
    n_bank = n_tr + n_va if fit_on == "train+val" else n_tr
    keep = bank_indices([i.label for i in (split.train + split.val)[:n_bank]], seed=cfg.seed)
    sty = info.get("style")
    open_set = _open_set(feats[keep], None if fit_on == "train+val" else feats[n_tr:n_tr + n_va], model,
                         [(split.train + split.val)[k] for k in keep], run.ds.root,
                         None if sty is None else sty[keep], None if sty is None else sty[n_tr:n_tr + n_va])
    return _Fitted(model, val_logits, test_logits, open_set, info, val_head=val_head, cv_estimate=cv_estimate,
                   oof_train=oof_train, fit_on=fit_on, val_model=val_model)


def _fit_finetune(run: _Run) -> _Fitted | None:
    """Fine-tuning (partial, full, scratch): from the linear probe's head where the strategy says so (LP-FT,
    Kumar et al., ICLR 2022; under torchrun rank 0 fits it and every rank fine-tunes from it), then the kept
    checkpoint's logits and the open-set bank of its own features, by rank 0 alone."""
    probe_info = None
    if run.strategy.probe_first:
        feats, head, probe_info = _probe(run, run.emit)
        if run.rt.distributed:  # rank 0 fitted it; every rank fine-tunes from it
            head = _broadcast_head(head, feats.shape[1], len(run.classes), run.rt)
        _set_head(run.model, head)
    model, split, pre, decoded, emit = run.model, run.split, run.pre, run.decoded, run.emit
    info = finetune(model, split, run.classes, pre, decoded, run.cfg, run.emit_epoch, run.should_cancel,
                    start_from_probe=probe_info is not None, runtime=run.rt, multi_label=run.multi)
    if probe_info:
        info["feature_cache"] = probe_info.get("feature_cache")
    if not run.rt.is_main:
        return None  # rank 0 evaluates the kept checkpoint and writes the run
    model.eval()
    release_free_memory()
    emit({"stage": "evaluate", "message": "Evaluating the best checkpoint"})
    one = dataclasses.replace(run.rt, rank=0, world_size=1)  # rank 0 alone: no collectives from here on
    val_logits, val_feats, val_style = logits_of_items(model, split.val, pre, decoded, batch_size=EVAL_BATCH,
                                                       should_cancel=run.local_cancel, runtime=one,
                                                       with_features=True, style=DEFAULT_STYLE)
    # the open-set bank: the fine-tuned model's features of (at most MAX_BANK_ROWS) training images; no feature
    # cache (it is keyed by the pretrained weights, and these are not theirs)
    emit({"stage": "evaluate", "message": "Recording the training images' features (open-set score)"})
    keep = bank_indices([i.label for i in split.train], seed=run.cfg.seed)
    t_bank = time.perf_counter()
    bank_feats, bank_style = extract_features(
        model, [split.train[k] for k in keep], pre, decoded, None, batch_size=EVAL_BATCH,
        progress=lambda d, t: emit({"stage": "evaluate", "message": "Recording the training images' features "
                                    "(open-set score)", "done": d, "total": t,
                                    "eta_s": (time.perf_counter() - t_bank) / max(d, 1) * (t - d)}),
        should_cancel=run.local_cancel, runtime=one, style=DEFAULT_STYLE)
    open_set = _open_set(bank_feats, val_feats, model, [split.train[k] for k in keep], run.ds.root, bank_style,
                         val_style)
    test_logits = logits_of_items(model, run.test_items, pre, decoded, batch_size=EVAL_BATCH,
                                  should_cancel=run.local_cancel, runtime=one)
    model.to("cpu")
    return _Fitted(model, val_logits, test_logits, open_set, info)


@dataclass(frozen=True)
class Strategy:
    """One training strategy (``cfg.strategy``): how its model starts and the function that fits it.

    ``fit`` gets the run's shared state (the data opened, the model built) and returns the fitted model with its
    validation and test logits, or None on the ranks other than 0 of a distributed group. A strategy made of
    other strategies' runs has ``compose`` instead, called in place of every phase with :func:`train_model` first
    (``auto``: :func:`tl_core.runs.auto.train_auto`).
    """

    name: str
    fit: Callable[[_Run], _Fitted | None] | None = None
    compose: Callable[..., dict[str, Any] | None] | None = None
    #: False: it starts from random weights (asked for: no warning about them)
    pretrained: bool = True
    #: the backbone only extracts features: read back from its record when every vector is cached, else built and
    #: recorded (packaged or local weights)
    frozen_backbone: bool = False
    #: fine-tuning starts from the linear probe's head
    probe_first: bool = False
    #: the linear probe is the run's model: its solver rounds are the run's epochs, and the held-out test images'
    #: features are extracted with the rest (the probe is what is tested); False: the probe only starts a fine-tune
    probe_is_model: bool = False
    #: the probe's features are chosen by cross-validation (last layer, several depths, flip); without it the probe
    #: sees the last layer, which is what the network's own head sees
    choose_features: bool = False
    #: its features also record each image's style statistics (the open-set bank's second input)
    open_set_style: bool = False


#: every strategy of :data:`tl_core.config.STRATEGIES`, by name (a test checks that the two agree)
STRATEGY_REGISTRY: dict[str, Strategy] = {s.name: s for s in [
    Strategy("linear", fit=_fit_linear, frozen_backbone=True, probe_is_model=True, choose_features=True,
             open_set_style=True),
    Strategy("partial", fit=_fit_finetune, probe_first=True),
    Strategy("full", fit=_fit_finetune, probe_first=True),
    Strategy("scratch", fit=_fit_finetune, pretrained=False),
    Strategy("auto", compose=train_auto),
]}


# --------------------------------------------------------------------------------------------------
# a run, phase by phase
# --------------------------------------------------------------------------------------------------
def train_model(data: str | os.PathLike, cfg: TrainConfig, workspace: Workspace, run_dir: Path,
                progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
                test_data: str | os.PathLike | None = None, runtime: Runtime | None = None
                ) -> dict[str, Any] | None:
    """Open the data, build the model, fit it per ``cfg.strategy`` (:data:`STRATEGY_REGISTRY`), evaluate the kept
    model and write ``run_dir`` (as a whole).

    Args:
        runtime: device, precision and distributed group (default: ``cfg.device`` in this one process).
            Under torchrun every rank calls this; rank 0 alone evaluates and writes, the others return None.
    Returns:
        A summary dict (classes, counts, metrics, weights info, best epoch, how training stopped, ...).
    Raises:
        TLError subclasses for the user's input; CancelledError when asked to stop.
    """
    emit: Progress = progress or (lambda e: None)
    cfg = cfg.resolved()
    strategy = STRATEGY_REGISTRY[cfg.strategy]
    if strategy.compose is not None:  # strategies made of other strategies' runs (each a train_model call)
        return strategy.compose(train_model, data, cfg, workspace, run_dir, progress, should_cancel, test_data,
                                runtime)
    rt = runtime or Runtime.create(cfg.device)
    local_cancel = should_cancel
    should_cancel = Cancel(rt, local_cancel) if rt.distributed else local_cancel
    set_seed(cfg.seed)
    t0 = time.perf_counter()

    # -- load the data: check the images, split them, add the held-out test set
    ds, split, test_items = _load_data(data, test_data, cfg, workspace, rt, emit)
    # -- build the model the strategy starts from
    weights = cfg.weights if strategy.pretrained else "random"
    model, winfo, data_cfg, read = _build(strategy, cfg, weights, workspace, ds, split, test_items, rt)
    run = _Run(cfg, strategy, workspace, rt, emit, should_cancel, local_cancel, ds, split, test_items, weights,
               model, winfo, data_cfg, Preprocess.from_data_config(data_cfg),
               DecodedImageCache(workspace.cache_dir / "decoded"), read=read)
    # -- fit, per strategy (the ranks other than 0 of a distributed group stop here)
    fitted = strategy.fit(run)
    if fitted is None:
        return None
    # -- evaluate the kept model on the validation (and test) images
    scores = _evaluate(run, fitted)
    seconds = time.perf_counter() - t0
    # -- write the run, as a whole, and summarise it
    report = dataset_report(ds, split)
    _write_run(run_dir, run, fitted, scores, report, seconds)
    return _summary(run, fitted, scores, report, seconds)


def _load_data(data: str | os.PathLike, test_data: str | os.PathLike | None, cfg: TrainConfig,
               workspace: Workspace, rt: Runtime, emit: Progress) -> tuple[Any, Split, list[ImageItem]]:
    """Open (and check) the data, split it, and add the held-out test set.

    Returns:
        (the dataset, its split, the test images whose labels the training data knows).
    Raises:
        DatasetError: a test set given twice, or test data of another kind or with unknown classes.
    """
    emit({"stage": "check", "message": "Checking the images"})

    def opened() -> Any:
        return open_data(data, workspace, progress=lambda d, t: emit({"stage": "check", "done": d, "total": t}))

    # rank 0 checks the images first (and fills the check cache); the others then open the data at no cost
    if rt.is_main:
        ds = opened()
        barrier(rt)
    else:
        barrier(rt)
        ds = opened()
    if cfg.test_split > 0 and (test_data is not None or any(i.split == "test" for i in ds.items)):
        raise DatasetError("This run has a test set already (" + ("the one given" if test_data is not None else
                           "the data's own test folder") + "); set the locked test share to 0, or give no test set.")
    split = split_dataset(ds, cfg.val_split, cfg.seed, cfg.max_per_class, cfg.test_split)
    if test_data is not None:
        tds = open_data(test_data, workspace, min_per_class=1)
        if tds.multi_label != ds.multi_label:
            raise DatasetError("The test data is " + ("multi-label" if tds.multi_label else "single-label")
                               + " but the training data is not; give test data of the same kind.")
        unknown = sorted(set(tds.classes) - set(ds.classes))
        if unknown:
            raise DatasetError(f"The test data has classes the training data lacks: {', '.join(unknown)}.")
        split.test = list(tds.items)
    cidx = {c: i for i, c in enumerate(ds.classes)}
    return ds, split, [i for i in split.test if all(lab in cidx for lab in i.label_set)]


def _build(strategy: Strategy, cfg: TrainConfig, weights: str, workspace: Workspace, ds: Any, split: Split,
           test_items: list[ImageItem], rt: Runtime
           ) -> tuple[Any, WeightsInfo, dict[str, Any], _ProbeInput | None]:
    """The model the strategy starts from, its weights' provenance, its data config, and a recorded backbone's
    probe input (else None).

    A frozen backbone whose every vector is cached needs of its backbone only its tensors: read back from its
    record (no timm import, no network built: ~3 s of CPU of a warm re-train on 2 cores), with the vectors;
    otherwise built, and recorded for the next run.
    """
    found = _recorded_if_cached(cfg, weights, workspace, split, test_items, ds.multi_label, rt) \
        if strategy.frozen_backbone else None
    if found is not None:
        model, read = found
        return model, model.weights, model.data_config, read
    model, winfo = build_model(cfg.backbone, len(ds.classes), weights=weights, seed=cfg.seed)
    if winfo.source == "random" and strategy.pretrained:
        log.warning("training %s from random weights: the result will be poor", cfg.backbone)
    data_cfg = data_config_for(model)
    if strategy.frozen_backbone and winfo.source in ("packaged", "local"):
        record_backbone(workspace.cache_dir, cfg.backbone, weights, model, winfo, data_cfg)
    return model, winfo, data_cfg, None


def _evaluate(run: _Run, fitted: _Fitted) -> _Scores:
    """Metrics of the fitted model's validation (and test) logits; a multi-label run's per-label thresholds (max
    F1) too, used by every later prediction."""
    split, classes, test_items = run.split, run.classes, run.test_items
    if not run.multi:
        cidx = run.cidx
        return _Scores(compute_metrics([cidx[i.label] for i in split.val], softmax(fitted.val_logits), classes),
                       compute_metrics([cidx[i.label] for i in test_items], softmax(fitted.test_logits), classes)
                       if test_items else None)
    yva_ml = label_matrix([i.labels for i in split.val], classes)
    if fitted.oof_train is not None:
        # a linear run chooses them on its training images' out-of-fold probabilities: the validation
        # images its figures are reported on choose nothing
        thresholds = choose_thresholds(label_matrix([i.labels for i in split.train], classes), fitted.oof_train)
        thresholds_on = "training images, out of fold"
    else:  # a fine-tuned model's own training images are in-sample: validation chooses (figures optimistic)
        thresholds = choose_thresholds(yva_ml, sigmoid(fitted.val_logits))
        thresholds_on = "validation images"
    return _Scores(multilabel_metrics(yva_ml, sigmoid(fitted.val_logits), classes, thresholds),
                   multilabel_metrics(label_matrix([i.labels for i in test_items], classes),
                                      sigmoid(fitted.test_logits), classes, thresholds) if test_items else None,
                   thresholds, thresholds_on)


def _write_run(run_dir: Path, run: _Run, fitted: _Fitted, scores: _Scores, report: dict[str, Any],
               seconds: float) -> None:
    """Write the run's files through their one owner, staged and published as a whole (nothing left on failure)."""
    cfg, ds, split, model, info = run.cfg, run.ds, run.split, fitted.model, fitted.info
    staged = RunFiles.staging(run_dir)
    try:
        staged.write_weights(model.state_dict())
        if fitted.val_head is not None:
            staged.write_validation_head(fitted.val_head)
        staged.write_config(cfg)
        staged.write_meta(RunMeta(
            backbone=cfg.backbone,
            arch=model.default_cfg.get("architecture", cfg.backbone) if hasattr(model, "default_cfg") else cfg.backbone,
            classes=run.classes, preprocess=run.pre.to_dict(), data_config=run.data_cfg, weights=run.winfo.to_dict(),
            dataset={**{k: report[k] for k in ("source", "fingerprint", "counts", "num_images", "imbalance_ratio",
                                               "skipped", "image_size", "warnings", "split")},
                     "version": ds.version or None},
            fit_on=fitted.fit_on, runtime=run.rt.to_dict(), multi_label=run.multi, thresholds=scores.thresholds,
            features=info["features"].to_dict() if info.get("features") else {},
            extra={k: v for k, v in (("cv", fitted.cv_estimate), ("thresholds_chosen_on", scores.thresholds_on),
                                     ("test_split", cfg.test_split or None)) if v is not None}))
        splits = {"val": SplitPredictions("val", [str(i.path) for i in split.val], [i.label for i in split.val],
                                          np.asarray(fitted.val_logits, np.float64), fitted.val_model)}
        if run.test_items:
            splits["test"] = SplitPredictions("test", [str(i.path) for i in run.test_items],
                                              [i.label for i in run.test_items],
                                              np.asarray(fitted.test_logits, np.float64), fitted.test_model)
        staged.write_predictions(Predictions(run.classes, splits))
        if fitted.open_set is not None:
            staged.write_open_set(*fitted.open_set)
        staged.write_metrics(RunMetrics(val=scores.val, test=scores.test, history=run.history,
                                        best_epoch=info["best_epoch"], epochs_run=info["epochs_run"],
                                        seconds=round(seconds, 3), stop=info.get("stop") or {},
                                        cv=fitted.cv_estimate))
        staged.publish(run_dir)
    except BaseException:
        RunFiles.discard([staged.dir])
        raise


def _summary(run: _Run, fitted: _Fitted, scores: _Scores, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The run's summary (what the run store keeps and :func:`_result` reads)."""
    info, val, test = fitted.info, scores.val, scores.test
    return {
        "classes": run.classes,
        "counts": report["counts"],
        "split": report["split"],
        "val_accuracy": val["accuracy"],
        "val_accuracy_ci": val.get("accuracy_ci"),
        "val_count": val.get("count", 0),
        "val_loss": info["val_loss"],
        "test_accuracy": test["accuracy"] if test else None,
        "test_accuracy_ci": test.get("accuracy_ci") if test else None,
        "test_count": test.get("count", 0) if test else 0,
        "cv_estimate": fitted.cv_estimate,
        "best_epoch": info["best_epoch"],
        "epochs_run": info["epochs_run"],
        "stop": info.get("stop") or {},
        "seconds": round(seconds, 3),
        "weights": run.winfo.to_dict(),
        "dataset_fingerprint": run.ds.fingerprint,
        "dataset_version": run.ds.version or None,
        "feature_cache": info.get("feature_cache"),
        **({"refit": info["refit"]} if info.get("refit") else {}),  # the recorded head: {reused, iterations}
        "features": info["features"].to_dict() if info.get("features") else None,
        "decoded_cache": {"hits": run.decoded.hits, "misses": run.decoded.misses},
        **run.rt.to_dict(),
        **({"multi_label": True, "thresholds_chosen_on": scores.thresholds_on,
            **{k: val.get(k) for k in ("micro_f1", "macro_f1", "mAP", "exact_match", "micro_f1_ci", "mAP_ci")}}
           if run.multi else {}),
    }


def run_training(workspace: Workspace, data: str | os.PathLike, cfg: TrainConfig, run_id: str | None = None,
                 progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
                 test_data: str | os.PathLike | None = None, raise_errors: bool = True,
                 runtime: Runtime | None = None) -> TrainResult:
    """Train and record the run in the store: status, per-epoch metrics, progress, summary.

    Under torchrun every rank calls this; rank 0 alone creates and updates the run (the others return a
    result with the run id None and touch neither the store nor the run's files).

    Args:
        workspace: where the run is stored.
        data: dataset path.
        cfg: the configuration (resolved here; errors before the run exists are raised as ConfigError).
        run_id: an existing queued run to execute (the worker's case); a new run is created when None.
        progress: extra progress callback (the CLI prints to stderr with it).
        should_cancel: extra cancel check; the store's cancel flag is always honoured.
        test_data: optional held-out folder evaluated at the end.
        raise_errors: re-raise the error after recording it (the CLI needs it; the worker does not). A run
            created here whose data or settings fail before any training (DatasetError, ConfigError) is then
            not recorded at all: the raised error is the whole answer to the user's typo.
        runtime: the device and process group (default: started from ``cfg.device`` and torchrun's environment).
    """
    cfg = cfg.resolved()
    # absolute paths in the run record and predictions: the run works from any directory later; a managed
    # dataset is recorded as NAME@VERSION, the version trained on
    check_backbone_name(cfg.backbone)  # fail before checking thousands of images
    try:
        data = pin(workspace, data)
    except DatasetError:
        if run_id is None:
            raise  # a queued run whose data went away fails below, recorded
    test_data = Path(test_data).expanduser().resolve() if test_data is not None else None
    if runtime is None and under_torchrun():
        rt = distributed_start(cfg.device)
        try:  # the group is left at the end, so that torchrun sees every rank finish cleanly
            return run_training(workspace, data, cfg, run_id, progress, should_cancel, test_data, raise_errors, rt)
        finally:
            distributed_stop()
    rt = runtime or Runtime.create(cfg.device)
    if not rt.is_main:
        train_model(data, cfg, workspace, Path(os.devnull), None, should_cancel, test_data, rt)
        return _result(None, Path(os.devnull), "done", rt.to_dict(), 0.0, None)
    store = workspace.store()
    pid, pid_start = identity()
    created_here = run_id is None  # the CLI's run: a typo in its input must not leave a run behind
    if run_id is None:
        run_id = store.create_run(str(data), cfg.to_dict(), status="running")
        store.update(run_id, pid=pid, pid_start=pid_start)
    else:
        store.update(run_id, status="running", pid=pid, pid_start=pid_start, config=cfg.to_dict())
    run_dir = workspace.run_dir(run_id)
    last_write = [0.0]
    last_check = [0.0, False]
    began = [False]  # past checking the data: the run did some work worth keeping a record of

    def cancel() -> bool:
        if should_cancel and should_cancel():
            return True
        now = time.monotonic()
        if now - last_check[0] > 0.5:  # one tiny query at most twice a second
            last_check[0] = now
            last_check[1] = store.cancel_requested(run_id)
        return bool(last_check[1])

    epochs: list[tuple[int, dict[str, Any]]] = []  # reported, not yet in the store

    def flush_epochs() -> None:
        store.add_epochs(run_id, epochs)
        epochs.clear()

    def on_progress(e: dict[str, Any]) -> None:
        # the epochs go to the store at most twice a second, together (a linear probe reports a few hundred
        # solver rounds a second; a fine-tune's epoch, seconds apart, goes at once), and all of them before any
        # other stage's report and before the run ends
        if e.get("stage") != "check":
            began[0] = True
        now = time.monotonic()
        if e.get("stage") == "epoch":
            epochs.append((int(e["epoch"]), {k: v for k, v in e.items() if k not in ("stage", "epoch")}))
            if now - last_write[0] <= 0.5:
                if progress:
                    progress(e)
                return
        flush_epochs()
        if e.get("stage") in ("epoch", "evaluate", "check") or now - last_write[0] > 0.5:
            last_write[0] = now
            store.update(run_id, progress={**e, "time": time.time()})
        if progress:
            progress(e)

    def failed(status: str, msg: str, e: BaseException) -> TrainResult:
        with contextlib.suppress(Exception):  # the curve so far stays with the failed run
            flush_epochs()
        if raise_errors and created_here and not began[0] and isinstance(e, (DatasetError, ConfigError)):
            # the user's input error, found before any training: the raised error is the answer and no run is
            # recorded (a queued run of the app keeps its record: its task shows the message)
            store.delete(run_id, workspace.runs_dir)
            raise e
        store.update(run_id, status=status, error=msg, pid=None)
        if raise_errors:
            raise e
        return _result(run_id, run_dir, status, rt.to_dict(), time.perf_counter() - t0, msg)

    t0 = time.perf_counter()
    try:
        with _stopped_by_torchrun(rt):
            summary = train_model(data, cfg, workspace, run_dir, on_progress, cancel, test_data, rt)
    except CancelledError as e:
        return failed("cancelled", str(e), e)
    except TLError as e:
        return failed("failed", str(e), e)
    except MemoryError as e:
        return failed("failed", "Ran out of memory; lower the batch size or use a smaller backbone.", e)
    except OSError as e:
        return failed("failed", f"Could not write the run's files ({e.strerror or e}); free disk space and try "
                                "again.", e)
    except Exception as e:  # a bug: record it, never leave the run 'running'
        # torch reports CPU/GPU out-of-memory and safetensors a full disk as their own exception types
        text = str(e)
        if isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text):
            msg = "Ran out of memory; lower the batch size or use a smaller backbone."
        elif "No space left on device" in text or "os error 28" in text or "disk is full" in text:
            msg = "Could not write the run's files (No space left on device); free disk space and try again."
        elif rt.distributed and isinstance(e, (RankFailedError, RuntimeError)):
            msg = (f"A process of the distributed group stopped ({text.splitlines()[0][:200] if text else type(e).__name__}); "
                   "the run failed. The log of the failed rank says why.")
        else:
            log.exception("run %s crashed", run_id)
            msg = f"Internal error: {type(e).__name__}: {e}"
        return failed("failed", msg, e)
    flush_epochs()
    try:
        enforce_cache_limit(workspace.cache_dir)
    except OSError as e:  # maintenance must never fail a finished run
        log.warning("cache eviction failed: %s", e)
    store.update(run_id, status="done", error=None, pid=None, summary=summary,
                 dataset_fingerprint=summary["dataset_fingerprint"], weights=summary["weights"],
                 progress={"stage": "done", "time": time.time()})
    return _result(run_id, run_dir, "done", summary, summary["seconds"], None)


@contextlib.contextmanager
def _stopped_by_torchrun(rt: Runtime) -> Any:
    """Under torchrun, turn the SIGTERM torchrun sends when another rank failed into an error the run records."""
    if not rt.distributed:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise RankFailedError("torchrun stopped the group: another rank failed or was stopped")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def result_of(workspace: Workspace, run_id: str) -> TrainResult:
    """The :class:`TrainResult` of a run as the store records it (a run trained by a torchrun group)."""
    run = workspace.store().get(run_id)
    s = run.get("summary") or {}
    return _result(run_id, workspace.run_dir(run_id), run["status"], s, float(s.get("seconds") or 0.0), run.get("error"))


def _result(run_id: str | None, run_dir: Path, status: str, s: dict[str, Any], seconds: float,
            error: str | None) -> TrainResult:
    return TrainResult(run_id=run_id, run_dir=str(run_dir), status=status, classes=s.get("classes", []),
                       val_accuracy=s.get("val_accuracy"), val_loss=s.get("val_loss"),
                       test_accuracy=s.get("test_accuracy"), best_epoch=s.get("best_epoch"),
                       epochs_run=s.get("epochs_run", 0), seconds=round(seconds, 3), weights=s.get("weights", {}),
                       counts=s.get("counts", {}), error=error, stop=s.get("stop") or {},
                       world_size=int(s.get("world_size", 1)), device=str(s.get("device", "cpu")),
                       precision=str(s.get("precision", "fp32")), dataset_version=s.get("dataset_version"),
                       features=(s.get("features") or {}).get("variant"),
                       linear_c=(s.get("features") or {}).get("linear_c"),
                       cv=(s.get("features") or {}).get("cv") or None, auto=s.get("auto"),
                       val_accuracy_ci=s.get("val_accuracy_ci"), test_accuracy_ci=s.get("test_accuracy_ci"),
                       val_count=int(s.get("val_count") or 0), test_count=int(s.get("test_count") or 0),
                       cv_accuracy=(s.get("cv_estimate") or {}).get("accuracy"),
                       cv_accuracy_ci=(s.get("cv_estimate") or {}).get("accuracy_ci"),
                       cv_count=int((s.get("cv_estimate") or {}).get("count") or 0),
                       cv_folds=int((s.get("cv_estimate") or {}).get("folds") or 0),
                       **{k: s.get(k) for k in _MULTI_LABEL_FIELDS if k in s})


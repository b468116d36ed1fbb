"""Which frozen features the linear probe sees: the last layer (the classic recipe), several depths, or
flipped views averaged; and ``auto``, which picks between them by cross-validation (on every labelled image, see
runs.training).

"Several depths" concatenates the pooled pre-logit features F with each ``forward_intermediates`` stage
output, global-average-pooled and scaled by k_i = mean‖F‖ / mean‖stage_i‖ over the training images, so each
stage weighs about as much as the last layer under the probe's L2 penalty. Earlier stages hold texture and
stroke features the last layer has abstracted away: on small sets unlike ImageNet (digits, Fashion-MNIST) they
add 2-6 points; on photo-like sets they add nothing. Standardising every column instead hurt (emoji 0.91 ->
0.86), which is why whole stages are scaled, not columns.

One forward pass gives all of it (``forward_intermediates`` then ``forward_head(pre_logits=True)``), so the
feature cache of a ``depths`` extraction stores the unscaled concatenation, whose first ``num_features``
columns *are* the last-layer features: ``auto`` needs no second extraction. The scales come from the
training features afterwards.

:class:`VariantModel` wraps a timm backbone with the timm interface the engine uses (``forward_features`` →
the variant vector, ``forward_head``, ``get_classifier``, ``num_features``, ``default_cfg``), the scales as a
buffer; so saving, loading, exports, Grad-CAM and :func:`~tl_core.models.features.pooled_features` work on it
unchanged. The ``last`` variant keeps the plain timm model (old runs load as they are).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..cache import FeatureCache
from ..config import TrainConfig
from ..errors import ConfigError, ExportError
from ..fileio import write_json_atomic
from .backbones import RecordedBackbone

__all__ = ["VARIANTS", "CANDIDATES", "VariantModel", "extraction_variant", "extractor",
           "recorded_extractor", "recorded_block_dims", "RecordedProbe", "wrap_trained",
           "model_from_meta", "block_scales", "apply_variant", "FeatureChoice", "choose_features"]

log = logging.getLogger(__name__)

VARIANTS = ("last", "depths", "flip")

#: what ``auto`` compares, C as a multiple of the config's ``linear_c`` (default 1: last@1, depths@1, depths@0.3);
#: a tie goes to the first in :data:`TIE_ORDER`
CANDIDATES: tuple[tuple[str, float], ...] = (("last", 1.0), ("depths", 1.0), ("depths", 0.3))
# Ties (equal mean CV accuracy) go to depths@1 first, then depths@0.3, then last: depths never scored below
# the last layer on a held-out test set in our measurements (emoji equal, digits +6, fashion +2.5-3), while
# CV folds of a few dozen images tie often; and C=1 before C=0.3 because it is the classic recipe's C.
TIE_ORDER: tuple[tuple[str, float], ...] = (("depths", 1.0), ("depths", 0.3), ("last", 1.0))


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pool of an NCHW map (a token sequence (B, N, C): mean over the tokens)."""
    return t.mean((2, 3)) if t.ndim == 4 else t.mean(1)


class VariantModel(nn.Module):
    """A timm backbone whose "pooled features" are a feature variant, with its own linear classifier.

    Args:
        backbone: the timm model; its own classifier is removed (``reset_classifier(0)``).
        variant: ``depths`` or ``flip``.
        num_classes: outputs of the classifier (0: ``forward`` returns the features).
        n_blocks: number of ``forward_intermediates`` outputs (``depths``); found by a probe pass when None.
        own_head: remove the backbone's classifier (False: an extractor that leaves ``backbone`` as it is).
        block_dims: the widths of the ``forward_intermediates`` outputs when already known (recorded beside the
            feature cache by an earlier run of the same backbone and weights): no probe pass.
    """

    def __init__(self, backbone: nn.Module, variant: str, num_classes: int, n_blocks: int | None = None,
                 own_head: bool = True, block_dims: list[int] | None = None):
        super().__init__()
        if variant not in ("depths", "flip"):
            raise ConfigError(f"Unknown feature variant {variant!r} for a wrapped model; use depths or flip.")
        if variant == "depths" and not hasattr(backbone, "forward_intermediates"):
            raise ConfigError(f"{type(backbone).__name__} cannot give features at several depths (timm has no "
                              "forward_intermediates for it); use --features last.")
        self.variant = variant
        self.last_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        if own_head and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.block_dims: list[int] = []
        if variant == "depths":
            self.block_dims = [int(d) for d in block_dims] if block_dims else self._probe_block_dims(n_blocks)
        self.register_buffer("scales", torch.ones(len(self.block_dims)))
        self.num_features = self.head_hidden_size = self.last_features + sum(self.block_dims)
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _probe_block_dims(self, n_blocks: int | None) -> list[int]:
        info = getattr(self.backbone, "feature_info", None)
        dims = None
        try:
            if info is not None and hasattr(info, "channels"):
                dims = list(info.channels())
            elif isinstance(info, list) and n_blocks is not None:
                # a timm model's own feature_info is a list of dicts; trusted only for a known block count (a
                # saved run's), so loading one skips the probe pass (0.3-0.7 s on 2 cores)
                dims = [int(d["num_chs"]) for d in info]
        except Exception:
            dims = None
        if dims is None or (n_blocks is not None and len(dims) != n_blocks):
            size = (self.backbone.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-1]
            was = self.backbone.training
            self.backbone.eval()
            with torch.no_grad():
                _, inter = self.backbone.forward_intermediates(torch.zeros(1, 3, size, size))
            self.backbone.train(was)
            dims = [int(_pool(t).shape[1]) for t in inter]
        return dims

    # -- the timm interface ----------------------------------------------------------------------
    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.backbone.default_cfg

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The variant's (B, num_features) vector (already pooled)."""
        b = self.backbone
        if self.variant == "flip":
            # the image and its mirror as one batch: every layer runs once (Grad-CAM's hooks see one output,
            # whose second half is the mirror's; insight.explain folds it back)
            fg = b.forward_head(b.forward_features(torch.cat([x, torch.flip(x, dims=[3])])), pre_logits=True)
            return fg.unflatten(0, (2, -1)).mean(0)  # no batch size baked into an exported graph
        final, inter = b.forward_intermediates(x)
        parts = [b.forward_head(final, pre_logits=True)]
        parts += [_pool(t) * self.scales[i] for i, t in enumerate(inter)]
        return torch.cat(parts, 1)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.classifier(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def extraction_variant(features: str, chooses_features: bool) -> str:
    """The features extracted (and cached) for a run asking for ``features``: a probe that is the run's model
    (``chooses_features``, the strategy registry's flag) extracts what it asked for, ``auto`` as ``depths`` (whose
    first columns are the last layer's); a probe that only starts a fine-tune sees the last layer (the network's own
    head does)."""
    if not chooses_features:
        return "last"
    return "depths" if features == "auto" else features


def extractor(model: nn.Module, variant: str, block_dims: list[int] | None = None) -> nn.Module:
    """The module whose pooled features are ``variant`` (unscaled for depths), sharing ``model``'s weights.
    ``last``: the model itself. The model's own classifier is left in place.

    Args:
        block_dims: the depths' widths when known (see :class:`VariantModel`): spares a forward pass of a
            224-px image (0.3-0.7 s on 2 cores, a sixth of a warm re-train).
    """
    if variant == "last":
        return model
    return VariantModel(model, variant, 0, own_head=False, block_dims=block_dims)


def recorded_extractor(model: nn.Module, variant: str, fcache: FeatureCache) -> nn.Module:
    """:func:`extractor`, its block widths (``depths``) recorded beside the features it caches
    (``<feature cache>/block_dims.json``: the cache's key fixes the backbone, weights, preprocessing and variant,
    hence the widths) and read back later (a re-train, an audit), which then needs no probe pass through the
    network. Training and the audit's label check both call it with the ``depths`` cache.

    Args:
        fcache: the feature cache namespace of ``variant`` (``feature_key(..., variant)``).
    """
    if variant != "depths":
        return extractor(model, variant)
    known = recorded_block_dims(fcache)
    ex = extractor(model, variant, known or None)
    if not known:
        record = fcache.dir / "block_dims.json"
        try:
            write_json_atomic(record, list(getattr(ex, "block_dims", [])), indent=None)
        except OSError as e:  # a read-only or full disk: the next run probes again
            log.warning("could not record %s (%s)", record, e)
    return ex


def recorded_block_dims(fcache: FeatureCache) -> list[int] | None:
    """The ``depths`` widths :func:`recorded_extractor` recorded beside ``fcache``, or None."""
    record = fcache.dir / "block_dims.json"
    try:
        return [int(d) for d in json.loads(record.read_text())] or None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("recorded block widths %s are unusable (%s); probing again", record, e)
        return None


def block_scales(raw: np.ndarray, last_dim: int, block_dims: list[int]) -> np.ndarray:
    """k_i = mean‖F‖ / mean‖block_i‖ over ``raw`` (the training images' unscaled depths features)."""
    fn = float(np.linalg.norm(raw[:, :last_dim], axis=1).mean()) if len(raw) else 1.0
    out, a = [], last_dim
    for n in block_dims:
        bn = float(np.linalg.norm(raw[:, a:a + n], axis=1).mean()) if len(raw) else 1.0
        out.append(fn / (bn + 1e-8))
        a += n
    return np.asarray(out, np.float64)


def apply_variant(raw: np.ndarray, variant: str, last_dim: int, block_dims: list[int],
                  scales: np.ndarray | None) -> np.ndarray:
    """The probe's input from raw extracted features: ``last`` takes the first ``last_dim`` columns of a depths
    extraction (or all of a last-layer one); ``depths`` scales each block; ``flip`` is as extracted."""
    if variant == "last":
        return raw[:, :last_dim]
    if variant != "depths":
        return raw
    out = np.array(raw, dtype=np.float32, copy=True)
    a = last_dim
    for n, k in zip(block_dims, scales if scales is not None else np.ones(len(block_dims))):
        out[:, a:a + n] *= np.float32(k)
        a += n
    return out


@dataclasses.dataclass
class FeatureChoice:
    """What the probe is fitted on: the variant, its C, the block scales, and how it was chosen."""

    variant: str
    linear_c: float
    scales: list[float]
    block_dims: list[int]
    chosen_by: str  # "cross-validation" | "setting"
    cv: dict[str, float] = dataclasses.field(default_factory=dict)  # "depths@1" -> mean CV accuracy
    folds: int = 0
    seconds: float = 0.0
    reused: bool = False  # read back from the record of an earlier run on the same images (runs.training)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key(variant: str, c: float) -> str:
    return f"{variant}@{c:g}"


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds (each class dealt round-robin after a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), int)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold_of[idx] = np.arange(len(idx)) % k
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def choose_features(raw_train: np.ndarray, y_train: np.ndarray, n_classes: int, cfg: TrainConfig,
                    last_dim: int, block_dims: list[int],
                    fit: Callable[..., tuple[nn.Linear, dict[str, Any]]],
                    should_cancel: Callable[[], bool] | None = None) -> FeatureChoice:
    """The variant and C the probe uses. A fixed variant is taken as set; ``auto`` runs k-fold cross-validation
    (5, fewer when a class has fewer training images) over :data:`CANDIDATES` (C times ``cfg.linear_c``, so a C
    the user set is respected) with ``fit`` (the engine's probe),
    the block scales computed on each fold's training part as the final fit computes them on all of it.

    Args:
        raw_train: the training images' extracted features (unscaled depths for auto/depths).
        fit: ``fit_linear_head``.
    """
    t0 = time.perf_counter()
    variant = cfg.features
    if variant != "auto":
        scales = block_scales(raw_train, last_dim, block_dims) if variant == "depths" else np.zeros(0)
        return FeatureChoice(variant, cfg.linear_c, [float(s) for s in scales], list(block_dims), "setting")
    k = int(min(5, np.bincount(y_train, minlength=n_classes)[np.unique(y_train)].min()))
    scores: dict[str, float] = {}
    cands = tuple((v, c * cfg.linear_c) for v, c in CANDIDATES)
    order = tuple((v, c * cfg.linear_c) for v, c in TIE_ORDER)
    if k >= 2:
        folds = _folds(y_train, k, cfg.seed)
        for v, c in cands:
            accs = []
            for tr, te in folds:
                s = block_scales(raw_train[tr], last_dim, block_dims)
                xtr = apply_variant(raw_train[tr], v, last_dim, block_dims, s)
                xte = apply_variant(raw_train[te], v, last_dim, block_dims, s)
                head, _ = fit(xtr, y_train[tr], xte[:0], y_train[:0], n_classes,
                              dataclasses.replace(cfg, linear_c=c, epochs=max(cfg.epochs, 100)),
                              should_cancel=should_cancel)
                with torch.no_grad():
                    pred = head(torch.from_numpy(np.ascontiguousarray(xte, np.float32))).argmax(1).numpy()
                accs.append(float((pred == y_train[te]).mean()))
            scores[_key(v, c)] = round(float(np.mean(accs)), 4)
        best = max(order, key=lambda vc: (scores[_key(*vc)], -order.index(vc)))
    else:  # a class with one training image: nothing to cross-validate; the measured-best default
        best = order[0]
    v, c = best
    scales = block_scales(raw_train, last_dim, block_dims) if v == "depths" else np.zeros(0)
    return FeatureChoice(v, c, [float(s) for s in scales], list(block_dims), "cross-validation", scores, k,
                         round(time.perf_counter() - t0, 3))


class RecordedProbe:
    """:func:`wrap_trained`'s model when the backbone is a record (:class:`~tl_core.models.backbones.RecordedBackbone`,
    a linear run on cached features): what the run reads of its model (``state_dict``, ``get_classifier``,
    ``named_modules`` for the classifier's name, ``default_cfg``), the same tensors under the same names as the
    wrapped network would give, without building it.
    """

    def __init__(self, backbone: RecordedBackbone, choice: FeatureChoice, head: nn.Linear):
        self.backbone = backbone
        self.variant = choice.variant
        self.default_cfg = backbone.default_cfg
        self.feature_channels = backbone.feature_channels
        self._name = backbone.classifier if choice.variant == "last" else "classifier"
        self._classifier = copy.deepcopy(head)
        self._scales = torch.tensor(choice.scales, dtype=torch.float32)

    def get_classifier(self) -> nn.Linear:
        return self._classifier

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        return [(self._name, self._classifier)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``wrap_trained(network, choice, head).state_dict()``: the backbone's tensors (under ``backbone.`` in a
        :class:`VariantModel`), its ``scales``, then the classifier."""
        trunk = self.backbone.trunk()
        out = trunk if self.variant == "last" else {"backbone." + k: v for k, v in trunk.items()}
        if self.variant != "last":
            out["scales"] = self._scales
        out[self._name + ".weight"] = self._classifier.weight.detach()
        out[self._name + ".bias"] = self._classifier.bias.detach()
        return out


def wrap_trained(model: nn.Module | RecordedBackbone, choice: FeatureChoice,
                 head: nn.Linear) -> nn.Module | RecordedProbe:
    """The model to save: ``model`` itself (last layer, its classifier set to ``head``), or a
    :class:`VariantModel` around it with the choice's scales and ``head``; for a recorded backbone, the
    :class:`RecordedProbe` whose state dict is the same."""
    if isinstance(model, RecordedBackbone):
        return RecordedProbe(model, choice, head)
    if choice.variant == "last":
        clf = model.get_classifier()
        with torch.no_grad():
            clf.weight.copy_(head.weight)
            clf.bias.copy_(head.bias)
        return model
    out = VariantModel(model, choice.variant, head.out_features, n_blocks=len(choice.block_dims) or None)
    with torch.no_grad():
        out.scales.copy_(torch.tensor(choice.scales, dtype=torch.float32))
        out.classifier.weight.copy_(head.weight)
        out.classifier.bias.copy_(head.bias)
    return out


def model_from_meta(model: nn.Module, features: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild the saved model's shape from ``meta.json``'s ``features`` record (empty or last: ``model``)."""
    v = (features or {}).get("variant", "last")
    if v == "last":
        return model
    if v not in VARIANTS:
        raise ExportError(f"meta.json names the feature variant {v!r}, which this TL Studio does not know; update it.")
    return VariantModel(model, v, num_classes, n_blocks=len(features.get("block_dims") or []) or None)

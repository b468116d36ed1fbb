"""Which open-set score tells a model's own kind of image from images unlike its training images, on many pairs.

    .venv/bin/python benchmarks/openset.py [--sets DIR] [--backbone efficientnet_lite0] [--pairs a,b] [--no-write]

The image sets are built from packaged sources by ``scripts/build_openset_sets.py`` into ``--sets`` (default
``/tmp/openset_sets``; built there if missing), plus the repository's samples (``sample_emoji``,
``sample_fashion``). Each pair is (training set, foreign set): the training set's classes are split per class into a
*bank* (the first ``--bank`` images of each class, shuffled with a fixed seed: what a small model is trained on)
and *held-out* images (the rest: the model's own kind, never seen); the foreign set is every image of the other
set. Features are those of the frozen backbone (packaged weights, the engine's eval preprocessing and image
loading: transparent images on white), computed once per set and cached under ``DIR/.features/<backbone>/``:

- ``head``: the pooled pre-logit features (what the classifier head sees; what the shipped score uses);
- ``m<i>`` / ``s<i>``: the channel-wise spatial mean / standard deviation of the feature map of stage ``i`` of
  ``forward_intermediates`` (0-based; Lite0: 16, 24, 40, 112, 320 channels at strides 2-32);
- ``g<i>``: the upper triangle of the channel Gram matrix of stage ``i`` (i <= 2), divided by the map's area.

Scores (higher = more unusual) are entries of :data:`CANDIDATES`: a function of (bank views, query views) that
returns its calibration scores (the bank scored leave-one-out, or cross-fitted for fitted models) and the query
scores; the threshold is always the conformal ⌈(n+1)·0.95⌉-th smallest calibration score, as the engine's. A new
candidate is one more entry. Printed and recorded per pair and score: AUROC (held-out vs foreign), the share of
foreign images flagged at the threshold, and the share of held-out images flagged (false alarms), each with a 95%
Wilson interval; for the combined scores, which component fired on the flagged foreign images (style, content,
both). The table is prepended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

COVERAGE = 0.95
SAMPLES = {"sample_emoji": ROOT / "sample_data" / "emoji", "sample_fashion": ROOT / "sample_data" / "fashion_mnist" / "test"}
STAGES = (0, 1, 2, 3, 4)
GRAM_STAGES = (0, 1, 2)
#: (training set, its classes (None: all), foreign set, near/far).
PAIRS: list[tuple[str, tuple[str, ...] | None, str, str]] = [
    ("stamps", ("animals", "food", "town", "vehicles"), "digits", "far"),
    ("openmoji", None, "digits", "far"),
    ("emoji_google", None, "digits", "far"),
    ("emoji_google", None, "emoji_twitter", "near"),
    ("photos", None, "openmoji_line", "far"),
    ("openmoji_line", None, "openmoji", "near"),
    ("digits", None, "icons", "far"),
    ("emoji_google", None, "icons", "mid"),
    ("emoji_google", None, "stamps", "mid"),
    ("textures", None, "photos", "mid"),
    ("icons", None, "text", "far"),
    ("stamps", ("animals", "food", "town", "vehicles"), "text", "far"),
    ("fashion", None, "emoji_google", "far"),
    ("sample_emoji", None, "sample_fashion", "far"),
    ("emoji_google", None, "flags", "near"),
    ("photos", None, "textures", "mid"),
    ("stamps", ("animals", "food", "town", "vehicles"), "photos", "far"),
    ("openmoji", None, "photos", "far"),
]


# ------------------------------------------------------------------------------------------------------- features
def image_paths(set_dir: Path, classes: tuple[str, ...] | None = None) -> list[tuple[str, Path]]:
    """(class, path) of every image of a class-folder set, sorted."""
    out = []
    for c in sorted(p for p in set_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if classes is None or c.name in classes:
            out += [(c.name, p) for p in sorted(c.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    return out


def stage_views(maps: list, head) -> dict[str, np.ndarray]:
    """The views of one batch: pooled head features, per-stage channel mean/std and Gram upper triangles."""
    import torch

    out = {"head": head.float().numpy()}
    for i, m in enumerate(maps):
        m = m.float()
        flat = m.flatten(2)  # (B, C, HW)
        out[f"m{i}"] = flat.mean(2).numpy()
        out[f"s{i}"] = flat.std(2).numpy()
        if i in GRAM_STAGES:
            g = torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[2]
            iu = torch.triu_indices(g.shape[1], g.shape[1])
            out[f"g{i}"] = g[:, iu[0], iu[1]].numpy()
    return out


def set_features(set_dir: Path, backbone: str, cache: Path, batch: int = 32) -> tuple[list[str], dict[str, np.ndarray]]:
    """Labels and views of every image of a set (cached in ``cache/<set>.npz``)."""
    items = image_paths(set_dir)
    f = cache / f"{set_dir.name}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        if list(z["paths"]) == [str(p) for _, p in items]:
            return [c for c, _ in items], {k: z[k] for k in z.files if k not in ("paths",)}
    import torch

    from tl_core.data.images import load_image
    model, pre = _backbone(backbone)
    views: dict[str, list] = {}
    with torch.inference_mode():
        for s in range(0, len(items), batch):
            x = torch.stack([pre.eval_from_pil(load_image(p)) for _, p in items[s:s + batch]])
            final, maps = model.forward_intermediates(x, indices=len(STAGES))  # final: after conv_head
            head = model.forward_head(final, pre_logits=True)
            for k, v in stage_views(maps, head).items():
                views.setdefault(k, []).append(v)
    arrays = {k: np.concatenate(v).astype(np.float32) for k, v in views.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, paths=np.array([str(p) for _, p in items]), **arrays)
    return [c for c, _ in items], arrays


_MODELS: dict[str, tuple] = {}


def _backbone(name: str):
    if name not in _MODELS:
        from tl_core.models.backbones import build_model
        from tl_core.models.preprocess import resolve_preprocess

        model, _ = build_model(name, num_classes=0, weights="packaged")
        _MODELS[name] = (model.eval(), resolve_preprocess(model))
    return _MODELS[name]


# ---------------------------------------------------------------------------------------------- statistics
def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside image > score of an inside one), ties counted half (Mann-Whitney U)."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    greater = (b[:, None] > a[None, :]).sum() + 0.5 * (b[:, None] == a[None, :]).sum()
    return float(greater / (len(a) * len(b)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a share k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def share(flags: np.ndarray, repeats: int = 1) -> str:
    """'12% [8-17]' : the share of True and its Wilson interval; ``repeats``: the same images were scored that
    many times (one per split), so the interval counts each once."""
    k, n = int(round(np.sum(flags) / repeats)), len(flags) // repeats
    lo, hi = wilson(k, n)
    return f"{k / max(n, 1):.0%} [{lo:.0%}-{hi:.0%}]"


def conformal_threshold(scores: np.ndarray, coverage: float = COVERAGE) -> float:
    """The ⌈(n+1)·coverage⌉-th smallest score (the largest when n is too small), as tl_core.models.openset."""
    s = np.sort(np.asarray(scores, np.float64))
    return float(s[min(math.ceil((len(s) + 1) * coverage), len(s)) - 1])


# ------------------------------------------------------------------------------------------------ components
def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def transform(view: np.ndarray, bank: np.ndarray, how: str) -> np.ndarray:
    """A view prepared for cosine distance: ``raw`` (as is), ``z`` (standardised with the bank's per-dimension mean
    and std), ``log`` (log of a non-negative statistic, then standardised), each then L2-normalised."""
    if how == "raw":
        return l2n(view)
    if how == "log":
        view, bank = np.log(view + 1e-3), np.log(bank + 1e-3)
    mu, sd = bank.mean(0), bank.std(0) + 1e-6
    return l2n((view - mu) / sd)


def knn_cos(bank: np.ndarray, query: np.ndarray | None, k: int = 1) -> np.ndarray:
    """Mean cosine distance to the k nearest bank rows (rows already L2-normalised); query None = the bank
    itself, leave-one-out."""
    q = bank if query is None else query
    sim = q @ bank.T
    if query is None:
        np.fill_diagonal(sim, -np.inf)
    k = min(k, bank.shape[0] - (1 if query is None else 0))
    top = -np.sort(-sim, axis=1)[:, :k]
    return np.clip(1.0 - top.mean(1), 0.0, 2.0)


@dataclass
class Part:
    """One component score: calibration (bank, leave-one-out / cross-fitted) and query scores, and its kind."""

    name: str
    kind: str  # "style" | "content"
    cal: np.ndarray
    query: np.ndarray

    @property
    def threshold(self) -> float:
        return conformal_threshold(self.cal)


def knn_part(view: str, bank: dict, query: dict, k: int = 1, how: str = "raw") -> Part:
    """Cosine kNN on one view; its calibration scores are the bank's, leave-one-out."""
    b, q = transform(bank[view], bank[view], how), transform(query[view], bank[view], how)
    if how != "raw":  # the standardisation used the bank: refit it without each fold for honest calibration
        cal = np.empty(len(b))
        for tr, te in _folds(len(b)):
            bt = transform(bank[view][tr], bank[view][tr], how)
            et = transform(bank[view][te], bank[view][tr], how)
            cal[te] = knn_cos(bt, et, k)
    else:
        cal = knn_cos(b, None, k)
    return Part(f"{view}:{how}:k{k}", "content" if view == "head" else "style", cal, knn_cos(b, q, k))


def _folds(n: int, k: int = 10, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    idx = np.random.default_rng(seed).permutation(n)
    return [(np.setdiff1d(idx, te), te) for te in np.array_split(idx, k)]


def _maha_fit(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Squared Mahalanobis distance to the mean of rows x under the Ledoit-Wolf shrunk covariance
    a*I + (1-shrink)*S, computed in the n x n dual (Woodbury; n rows << d dimensions)."""
    mu = x.mean(0)
    xc = (x - mu).astype(np.float64)
    n, d = xc.shape
    kern = xc @ xc.T
    sq = np.diag(kern)
    tr = sq.sum() / n
    m = tr / d
    fro2 = np.sum(kern ** 2) / n ** 2
    b2 = (np.sum(sq ** 2) / n - fro2) / n
    d2 = fro2 - 2 * m * tr + m * m * d
    shrink = min(1.0, max(0.0, b2 / d2)) if d2 > 0 else 1.0
    a, c = shrink * m, (1 - shrink) / n  # cov = a I + c xc^T xc
    if c <= 0:
        return lambda q: np.sum((q - mu) ** 2, axis=1) / a
    inner = np.linalg.inv(np.eye(n) * (a / c) + kern)

    def dist2(q: np.ndarray) -> np.ndarray:
        dq = (q - mu).astype(np.float64)
        proj = dq @ xc.T  # (m, n)
        return (np.sum(dq ** 2, axis=1) - np.einsum("ij,jk,ik->i", proj, inner, proj)) / a

    return dist2


def maha_part(view: str, bank: dict, query: dict, how: str = "log") -> Part:
    """Mahalanobis distance to the bank's mean (one Gaussian, Ledoit-Wolf shrinkage), cross-fitted calibration."""
    def prep(x, ref):
        if how == "log":
            x, ref = np.log(x + 1e-3), np.log(ref + 1e-3)
        return (x - ref.mean(0)) / (ref.std(0) + 1e-6)

    def dist(tr, te):
        return np.sqrt(np.maximum(_maha_fit(prep(tr, tr))(prep(te, tr)), 0))

    x = bank[view]
    cal = np.empty(len(x))
    for tr, te in _folds(len(x)):
        cal[te] = dist(x[tr], x[te])
    return Part(f"{view}:maha-{how}", "content" if view == "head" else "style", cal, dist(x, query[view]))


# ---------------------------------------------------------------------------------------------- combinations
@dataclass
class Result:
    """A candidate's calibration and query scores, and the parts it combines (for the style/content reason)."""

    cal: np.ndarray
    query: np.ndarray
    parts: list[Part] = field(default_factory=list)


def combine_max(parts: list[Part]) -> Result:
    """Each part divided by its own conformal threshold; the maximum over parts."""
    t = [p.threshold for p in parts]
    cal = np.max([p.cal / ti for p, ti in zip(parts, t)], axis=0)
    q = np.max([p.query / ti for p, ti in zip(parts, t)], axis=0)
    return Result(cal, q, parts)


def _loo_thresholds(cal: np.ndarray) -> np.ndarray:
    """For each calibration score, the conformal threshold of the others (n-1 scores): the normaliser a bank row's
    own score must not set."""
    order = np.sort(cal)
    n = len(cal) - 1
    k = min(math.ceil((n + 1) * COVERAGE), n) - 1  # index into the n others
    rank = np.searchsorted(order, cal, side="left")  # where each score sits among all n+1
    # removing a score at or below position k moves the k-th of the others one up
    return np.where(rank <= k, order[min(k + 1, len(order) - 1)], order[k])


def combine_max_xfit(parts: list[Part]) -> Result:
    """As :func:`combine_max`, but each bank row's calibration ratio uses the view thresholds of the other rows
    (cross-fitted normalisers: the final threshold is not set on scores that also set the normalisers)."""
    cal = np.max([p.cal / _loo_thresholds(p.cal) for p in parts], axis=0)
    q = np.max([p.query / p.threshold for p in parts], axis=0)
    return Result(cal, q, parts)


def combine_max_robust(parts: list[Part]) -> Result:
    """Each part as a robust z-score of its log: (log s - median) / MAD of the calibration logs; the maximum."""
    def z(p: Part, x: np.ndarray) -> np.ndarray:
        lc = np.log(p.cal + 1e-6)
        med = np.median(lc)
        mad = np.median(np.abs(lc - med)) + 1e-9
        return (np.log(x + 1e-6) - med) / mad

    return Result(np.max([z(p, p.cal) for p in parts], axis=0), np.max([z(p, p.query) for p in parts], axis=0),
                  parts)


def _pvalues(cal: np.ndarray, q: np.ndarray | None) -> np.ndarray:
    """Conformal p-values: (1 + #{cal >= s}) / (n + 1); q None = each cal score against the others."""
    c = np.sort(cal)
    if q is None:
        ge = len(c) - np.searchsorted(c, cal, side="left") - 1  # the others at or above it
        return (1 + ge) / len(c)
    return (1 + len(c) - np.searchsorted(c, q, side="left")) / (len(c) + 1)


def combine_fisher(parts: list[Part]) -> Result:
    """Fisher's method on the parts' conformal p-values: -2 sum log p."""
    cal = -2 * np.sum([np.log(_pvalues(p.cal, None)) for p in parts], axis=0)
    q = -2 * np.sum([np.log(_pvalues(p.cal, p.query)) for p in parts], axis=0)
    return Result(cal, q, parts)


def combine_minp(parts: list[Part]) -> Result:
    """The smallest conformal p-value over parts (as a score: -log p)."""
    cal = np.max([-np.log(_pvalues(p.cal, None)) for p in parts], axis=0)
    q = np.max([-np.log(_pvalues(p.cal, p.query)) for p in parts], axis=0)
    return Result(cal, q, parts)


def combine_density(parts: list[Part]) -> Result:
    """A small density model over the parts' log scores: each standardised with the calibration scores' mean and
    std (a diagonal Gaussian), one-sided (only larger than usual counts): the norm of the positive parts."""
    cal = np.stack([np.log(p.cal + 1e-9) for p in parts], axis=1)
    q = np.stack([np.log(p.query + 1e-9) for p in parts], axis=1)
    mu, sd = cal.mean(0), cal.std(0) + 1e-9

    def f(x):
        return np.linalg.norm(np.maximum((x - mu) / sd, 0), axis=1)

    return Result(f(cal), f(q), parts)


def combine_sum(parts: list[Part]) -> Result:
    """Each part divided by its own conformal threshold; the sum over parts (evidence adds up)."""
    t = [p.threshold for p in parts]
    return Result(np.sum([p.cal / ti for p, ti in zip(parts, t)], axis=0),
                  np.sum([p.query / ti for p, ti in zip(parts, t)], axis=0), parts)


def _cat_views(bank: dict, query: dict, stages, stat: str = "s") -> tuple[dict, dict]:
    """Adds ``cat``: the stages' statistics, each L2-normalised, concatenated (cosine = mean of per-stage cosines)."""
    b, q = dict(bank), dict(query)
    for src, dst in ((bank, b), (query, q)):
        dst["cat"] = np.concatenate([l2n(src[f"{stat}{i}"]) for i in stages], axis=1)
    return b, q


def _cat_part(bank, query, stages, k=1):
    b, q = _cat_views(bank, query, stages)
    return knn_part("cat", b, q, k)


def _sum_part(bank, query, stages, k=1) -> Part:
    """The stages' std scores, each divided by its own threshold, summed: one style part."""
    r = combine_sum(_style_parts(bank, query, stages, k=k))
    return Part("sum-style", "style", r.cal, r.query)


def single(part: Part) -> Result:
    return Result(part.cal, part.query, [part])


def _style_parts(bank, query, stages, stat="s", k=1, how="raw"):
    return [knn_part(f"{stat}{i}", bank, query, k, how) for i in stages]


def _ms_views(bank: dict, query: dict, stages) -> tuple[dict, dict]:
    """Adds ``ms<i>``: channel mean and std of stage i concatenated, each half L2-normalised first."""
    b, q = dict(bank), dict(query)
    for i in stages:
        for src, dst in ((bank, b), (query, q)):
            dst[f"ms{i}"] = np.concatenate([l2n(src[f"m{i}"]), l2n(src[f"s{i}"])], axis=1)
    return b, q


def _ms(bank, query, stages, k=1, how="raw"):
    b, q = _ms_views(bank, query, stages)
    return [knn_part(f"ms{i}", b, q, k, how) for i in stages]


Scorer = Callable[[dict, dict], Result]
#: name -> f(bank views, query views) -> Result. The first is the shipped score.
CANDIDATES: dict[str, Scorer] = {
    "shipped: head kNN k1": lambda b, q: single(knn_part("head", b, q, 1)),
    "head kNN k5": lambda b, q: single(knn_part("head", b, q, 5)),
    "head maha": lambda b, q: single(maha_part("head", b, q, how="z")),
    "s1 kNN k1": lambda b, q: single(knn_part("s1", b, q, 1)),
    "s2 kNN k1": lambda b, q: single(knn_part("s2", b, q, 1)),
    "s3 kNN k1": lambda b, q: single(knn_part("s3", b, q, 1)),
    "s2 maha": lambda b, q: single(maha_part("s2", b, q)),
    "g1 kNN k1": lambda b, q: single(knn_part("g1", b, q, 1)),
    "max(s1,s2,s3,head) k1": lambda b, q: combine_max(_style_parts(b, q, (1, 2, 3)) + [knn_part("head", b, q, 1)]),
    "max(s1,s2,s3,head) k5": lambda b, q: combine_max(_style_parts(b, q, (1, 2, 3), k=5)
                                                      + [knn_part("head", b, q, 5)]),
    "max(s1,s2,head) k1": lambda b, q: combine_max(_style_parts(b, q, (1, 2)) + [knn_part("head", b, q, 1)]),
    "max(s1,head) k1": lambda b, q: combine_max(_style_parts(b, q, (1,)) + [knn_part("head", b, q, 1)]),
    "max(s1,s3,head) k1": lambda b, q: combine_max(_style_parts(b, q, (1, 3)) + [knn_part("head", b, q, 1)]),
    "max(s1,s3,head) k1 xfit": lambda b, q: combine_max_xfit(_style_parts(b, q, (1, 3))
                                                             + [knn_part("head", b, q, 1)]),
    "robustmax(s1,s3,head) k1": lambda b, q: combine_max_robust(_style_parts(b, q, (1, 3))
                                                                + [knn_part("head", b, q, 1)]),
    "max(s1,s3,head) k5": lambda b, q: combine_max(_style_parts(b, q, (1, 3), k=5) + [knn_part("head", b, q, 5)]),
    "max(s1,s3 maha,head)": lambda b, q: combine_max([maha_part(f"s{i}", b, q) for i in (1, 3)]
                                                     + [knn_part("head", b, q, 1)]),
    "fisher(s1,s3,head) k1": lambda b, q: combine_fisher(_style_parts(b, q, (1, 3)) + [knn_part("head", b, q, 1)]),
    "cat(s1,s2,s3) k1": lambda b, q: single(_cat_part(b, q, (1, 2, 3))),
    "max(cat(s1,s2,s3),head) k1": lambda b, q: combine_max([_cat_part(b, q, (1, 2, 3)), knn_part("head", b, q, 1)]),
    "max(cat(s0..s4),head) k1": lambda b, q: combine_max([_cat_part(b, q, STAGES), knn_part("head", b, q, 1)]),
    "sum(s1,s2,s3,head) k1": lambda b, q: combine_sum(_style_parts(b, q, (1, 2, 3)) + [knn_part("head", b, q, 1)]),
    "sum(s1,s2,s3) max head k1": lambda b, q: combine_max([_sum_part(b, q, (1, 2, 3)), knn_part("head", b, q, 1)]),
    "max(s0..s4,head) k1": lambda b, q: combine_max(_style_parts(b, q, STAGES) + [knn_part("head", b, q, 1)]),
    "max(ms1,ms2,ms3,head) k1": lambda b, q: combine_max(_ms(b, q, (1, 2, 3)) + [knn_part("head", b, q, 1)]),
    "max(s1..s3 z,head) k1": lambda b, q: combine_max(_style_parts(b, q, (1, 2, 3), how="z")
                                                      + [knn_part("head", b, q, 1)]),
    "max(s1..s3 maha,head) ": lambda b, q: combine_max([maha_part(f"s{i}", b, q) for i in (1, 2, 3)]
                                                       + [knn_part("head", b, q, 1)]),
    "fisher(s1,s2,s3,head) k1": lambda b, q: combine_fisher(_style_parts(b, q, (1, 2, 3))
                                                            + [knn_part("head", b, q, 1)]),
    "density(s1,s2,s3,head) k1": lambda b, q: combine_density(_style_parts(b, q, (1, 2, 3))
                                                              + [knn_part("head", b, q, 1)]),
    "minp(s1,s2,s3,head) k1": lambda b, q: combine_minp(_style_parts(b, q, (1, 2, 3)) + [knn_part("head", b, q, 1)]),
}


#: The scores run by default (``--scores all`` runs every candidate; the others lost on the first pairs, see
#: benchmarks/openset_findings.md).
CORE = ("shipped: head kNN k1", "s1 kNN k1", "s3 kNN k1", "max(s1,s2,s3,head) k1", "max(s0..s4,head) k1",
        "max(s1,s3,head) k1", "max(s1,s3,head) k1 xfit", "robustmax(s1,s3,head) k1", "max(s1,s3,head) k5", "max(s1,s3 maha,head)", "fisher(s1,s3,head) k1",
        "max(cat(s1,s2,s3),head) k1")


def reasons(res: Result, flagged: np.ndarray) -> str:
    """Of the flagged query images, which parts are above their own threshold: style only / content only / both /
    neither (flagged by the combination alone), as counts."""
    if len(res.parts) < 2:
        return "-"
    style = np.zeros(len(res.query), bool)
    content = np.zeros(len(res.query), bool)
    for p in res.parts:
        above = p.query > p.threshold
        if p.kind == "style":
            style |= above
        else:
            content |= above
    f = flagged
    return (f"S{int(np.sum(f & style & ~content))} C{int(np.sum(f & content & ~style))} "
            f"B{int(np.sum(f & style & content))} -{int(np.sum(f & ~style & ~content))}")


# ---------------------------------------------------------------------------------------------------- pairs
def split_bank(labels: list[str], bank_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class, ``bank_per_class`` images (shuffled with ``seed``) to the bank, the rest held out."""
    rng = random.Random(seed)
    bank, held = [], []
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        rng.shuffle(idx)
        bank += idx[:bank_per_class]
        held += idx[bank_per_class:]
    return np.array(sorted(bank)), np.array(sorted(held))


def run_pair(feats: dict, train: str, classes, foreign: str, bank_per_class: int,
             candidates: dict[str, Scorer], seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """Every candidate on one pair, over bank/held-out splits with each seed: AUROC averaged over seeds, flags
    (held-out, foreign) and reasons pooled."""
    runs = [_run_pair_once(feats, train, classes, foreign, bank_per_class, candidates, sd) for sd in seeds]
    rows = []
    for per_seed in zip(*runs):
        r = dict(per_seed[0])
        r["auroc"] = float(np.mean([x["auroc"] for x in per_seed]))
        r["held_flag"] = np.concatenate([x["held_flag"] for x in per_seed])
        r["foreign_flag"] = np.concatenate([x["foreign_flag"] for x in per_seed])
        r["why"] = _sum_why([x["why"] for x in per_seed])
        r["seeds"] = len(per_seed)
        rows.append(r)
    return rows


def _sum_why(whys: list[str]) -> str:
    if whys[0] == "-":
        return "-"
    tot = np.sum([[int(t[1:]) for t in w.split()] for w in whys], axis=0)
    return " ".join(f"{k}{v}" for k, v in zip("SCB-", tot))


def _run_pair_once(feats: dict, train: str, classes, foreign: str, bank_per_class: int,
                   candidates: dict[str, Scorer], seed: int) -> list[dict]:
    labels, views = feats[train]
    keep = np.array([classes is None or l in classes for l in labels])
    labels = [l for l, k in zip(labels, keep) if k]
    views = {k: v[keep] for k, v in views.items()}
    bi, hi = split_bank(labels, bank_per_class, seed)
    bank = {k: v[bi] for k, v in views.items()}
    held = {k: v[hi] for k, v in views.items()}
    other = feats[foreign][1]
    n_held = len(hi)
    query = {k: np.concatenate([held[k], other[k]]) for k in bank}
    rows = []
    for name, fn in candidates.items():
        res = fn(bank, query)
        t = conformal_threshold(res.cal)
        h, o = res.query[:n_held], res.query[n_held:]
        rows.append({"train": train, "foreign": foreign, "score": name, "auroc": auroc(h, o),
                     "held_flag": h > t, "foreign_flag": o > t, "why": reasons(
                         Result(res.cal, o, [Part(p.name, p.kind, p.cal, p.query[n_held:]) for p in res.parts]),
                         o > t), "n_bank": len(bi)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=Path, default=Path("/tmp/openset_sets"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--bank", type=int, default=25, help="training (bank) images per class; the rest are held out")
    p.add_argument("--seeds", type=int, default=3, help="bank/held-out splits per pair (flags pooled)")
    p.add_argument("--pairs", default="", help="comma-separated train>foreign pairs (default: all)")
    p.add_argument("--scores", default="", help="candidate names separated by ;, or all (default: CORE)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = p.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load = os.getloadavg()[0]
    t0 = time.time()
    from build_openset_sets import build_sets

    pairs = PAIRS
    if args.pairs:
        want = {tuple(x.split(">")) for x in args.pairs.split(",")}
        pairs = [pr for pr in PAIRS if (pr[0], pr[2]) in want]
    needed = {s for pr in pairs for s in (pr[0], pr[2])}
    build_sets(args.sets, sorted(needed - set(SAMPLES)))
    dirs = {s: SAMPLES.get(s, args.sets / s) for s in needed}
    cache = args.sets / ".features" / args.backbone
    feats = {s: set_features(d, args.backbone, cache) for s, d in sorted(dirs.items())}
    names = CORE if not args.scores else CANDIDATES if args.scores == "all" else args.scores.split(";")
    cands = {k: CANDIDATES[k] for k in names}
    rows = []
    for train, classes, foreign, kind in pairs:
        for r in run_pair(feats, train, classes, foreign, args.bank, cands, tuple(range(args.seeds))):
            r["kind"] = kind
            rows.append(r)
            print(f"{train}>{foreign} ({kind})\t{r['score']:28s}\tAUROC {r['auroc']:.3f}\tforeign "
                  f"{share(r['foreign_flag'], r['seeds'])}\theld {share(r['held_flag'])}\t{r['why']}", flush=True)
    table = markdown_table(
        ("training set > foreign", "kind", "score", "AUROC", "foreign flagged", "held-out flagged", "why (S/C/B/-)"),
        [(f"{r['train']} ({r['n_bank']}) > {r['foreign']} ({len(r['foreign_flag'])})", r["kind"], r["score"],
          f"{r['auroc']:.3f}", share(r["foreign_flag"], r["seeds"]), f"{share(r['held_flag'])} of {len(r['held_flag'])}",
          r["why"]) for r in rows])
    summary = [(name, f"{np.mean([r['auroc'] for r in rows if r['score'] == name]):.3f}",
                f"{np.mean([r['foreign_flag'].mean() for r in rows if r['score'] == name and r['kind'] == 'far']):.0%}",
                f"{np.mean([r['foreign_flag'].mean() for r in rows if r['score'] == name]):.0%}",
                share(np.concatenate([r["held_flag"] for r in rows if r["score"] == name])))
               for name in cands]
    stable = markdown_table(("score", "mean AUROC", "far flagged (mean)", "all flagged (mean)",
                             "held-out flagged (pooled)"), summary)
    head = (f"## {dt.datetime.now():%Y-%m-%d %H:%M} — open-set scores on {len(pairs)} pairs "
            f"(`benchmarks/openset.py`, {args.backbone})\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores; load average {load:.1f} at the start; {time.time() - t0:.0f} s. "
            f"Frozen {args.backbone} (packaged weights) features; bank = {args.bank} images per class of the "
            f"training set, held-out = its other images ({args.seeds} random splits per pair: AUROC averaged, "
            "flags pooled; the foreign intervals count each image once, the held-out ones every split's images, "
            "which overlap, so they are somewhat too narrow), foreign = every image of the other set "
            "(sets: scripts/build_openset_sets.py). Thresholds: conformal 95% of the bank's leave-one-out "
            "(kNN) or 10-fold cross-fitted (Mahalanobis, standardisation) scores. Shares with 95% Wilson "
            "intervals. why: flagged foreign images by which parts are above their own threshold: S style only, "
            "C content (head) only, B both, - neither (the combination alone).")
    print(stable)
    if not args.no_write:
        print(f"written to {prepend(head, stable + chr(10) + chr(10) + table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

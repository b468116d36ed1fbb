"""Open-set answers: how far an image is from the model's training images, in *content* and in *style*, and
``unknown`` beyond a threshold.

A classifier always answers with one of its classes, even for a digit shown to a model of colour drawings. Every
trained run therefore keeps a *bank* of its training images (at most :data:`MAX_BANK_ROWS`, float16,
``ood_bank.safetensors``), two vectors per image, both from the forward pass that gives the prediction:

- **content**: the L2-normalised pre-logit features (what the classifier head sees): *what the image shows*;
- **style**: per-channel statistics (standard deviation over the map) of earlier backbone stages
  (:class:`~tl_core.models.features.StyleSpec`; one distance per stage, the largest counts): *what kind of image
  it is* (colours, strokes, texture). On a
  small, varied training set the pooled last layer only says "a drawing of something", so a handwritten digit
  passes the content test of a clip-art model; its style statistics do not look like any clip-art's.

An image's content distance (style distance) is the mean cosine distance to its :data:`K` nearest bank rows
(:func:`knn_distance`), divided by its own calibrated threshold: 1.0 = that threshold. ``ood_score`` is the larger
of the two; above the run's ``threshold`` (1.0 unless a person moved it) the image is ``unknown``, and
``ood_reason`` says which distance was above it (``content``, ``style`` or ``both``).

Calibration (:func:`build_open_set`): each distance's threshold is the conformal 95% quantile of its
calibration distances, then the larger-of-the-two score is calibrated once more (a conformal factor over the
calibration images' combined scores, folded into both thresholds), so that about 95% of images like the
calibration images pass 1.0 in total, not per distance. Calibration images are the validation images scored
against the training bank; for a linear run whose head was refitted on every image they are the bank's own rows,
each scored leave-one-out. ``ood.json`` records the score, both thresholds, the style statistics, how it was
calibrated, the calibration scores (the Evaluate page draws them and moves the threshold: :func:`with_threshold`)
and each bank row's image (path relative to the dataset, and label: the nearest training images of a prediction).

Version 1 runs (``knn-cosine``: content only, the threshold a cosine distance) still load and predict as before.

Numpy only (no torch): the app's server reads ``ood.json`` through :class:`tl_core.storage.files.RunFiles`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, RunError
from ..storage.files import MAX_THRESHOLD, SCORE, V1_SCORE, VERSION, RunFiles

__all__ = ["SCORE", "VERSION", "V1_SCORE", "COVERAGE", "MAX_BANK_ROWS", "K", "MAX_THRESHOLD", "OpenSet", "Scores",
           "normalise", "nn_distance", "knn_distance", "style_vectors", "conformal_threshold", "bank_indices",
           "build_open_set", "flagged_share", "with_threshold", "open_set_fields", "set_threshold", "describe",
           "reason_of", "summary", "UNKNOWN_NOTE", "STYLE_WORDS", "CONTENT_WORDS"]

#: Share of in-distribution images the default threshold lets pass.
COVERAGE = 0.95
#: Rows of the bank at most (subsampled evenly per class above it).
MAX_BANK_ROWS = 2048
#: Nearest bank rows whose mean distance is an image's distance (content and style alike).
K = 1
#: Style distances per group of stages (indices into the style spec's stages; a group's blocks are each
#: L2-normalised, then joined): None, one group per stage, each its own distance and threshold, the style
#: distance being the largest (measured better than one joined group: benchmarks/openset.py).
STYLE_GROUPS: tuple[tuple[int, ...], ...] | None = None
#: Nearest training images a prediction lists.
NEAREST = 3
#: What a prediction says when the model predates open-set scores.
UNKNOWN_NOTE = ("This model was trained before open-set scores existed, so it cannot say when an image is unlike "
                "its training images; train it again to get them.")
#: What each reason means, in plain words (Try it, the model card).
STYLE_WORDS = "unlike your training images in style (colours, strokes, texture: the kind of picture)"
CONTENT_WORDS = "unlike your training images in what it shows"


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def knn_distance(feats: np.ndarray, bank: np.ndarray, k: int = 1, exclude_self: bool = False, chunk: int = 1024,
                 normalised: bool = False) -> np.ndarray:
    """Mean cosine distance (1 - cosine similarity) from each row of ``feats`` to its ``k`` nearest rows of ``bank``.

    Args:
        feats: (N, D) features (L2-normalised here unless ``normalised``).
        bank: (M, D) bank rows, already L2-normalised (any float dtype).
        k: neighbours averaged (at most the bank's rows, less one with ``exclude_self``).
        exclude_self: ``feats`` are the bank itself: row i is not compared with bank row i (leave-one-out).
        chunk: rows per matrix product (bounds memory).
        normalised: ``feats`` are unit rows already.
    Returns:
        float64 (N,), in [0, 2].
    """
    f = np.asarray(feats, np.float32) if normalised else normalise(feats)
    b = np.asarray(bank, dtype=np.float32)
    if len(f) == 0 or len(b) == 0:
        return np.full(len(f), np.nan if len(b) == 0 else 0.0)
    k = max(1, min(int(k), len(b) - (1 if exclude_self else 0)))
    out = np.empty(len(f), dtype=np.float64)
    for s in range(0, len(f), chunk):
        sim = f[s:s + chunk] @ b.T
        if exclude_self:
            r = np.arange(s, min(s + chunk, len(f)))
            sim[r - s, r] = -np.inf
        top = sim.max(axis=1, keepdims=True) if k == 1 else -np.partition(-sim, k - 1, axis=1)[:, :k]
        out[s:s + chunk] = 1.0 - top.astype(np.float64).mean(axis=1)
    return np.clip(out, 0.0, 2.0)


def nn_distance(feats: np.ndarray, bank: np.ndarray, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Cosine distance to the nearest row of ``bank`` (:func:`knn_distance` with k = 1)."""
    return knn_distance(feats, bank, 1, exclude_self, chunk)


def _groups(n_stages: int, groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    return [list(g) for g in groups] if groups else [[i] for i in range(n_stages)]


def style_vectors(style: np.ndarray, dims: Sequence[int], groups: Sequence[Sequence[int]] | None = None
                  ) -> list[np.ndarray]:
    """The unit vectors the style distances compare, one (N, ·) array per group of stages: each stage's block of
    statistics L2-normalised, the group's blocks joined and scaled to unit norm again.

    Args:
        style: (N, sum(dims)) raw statistics, one block per stage.
        dims: each stage's width.
        groups: stage indices per group (None: one group per stage).
    """
    x = np.asarray(style, np.float32)
    if x.ndim == 1:
        x = x[None]
    starts = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    blocks = [normalise(x[:, starts[i]:starts[i + 1]]) for i in range(len(dims))]
    return [normalise(np.concatenate([blocks[i] for i in g], 1)) for g in _groups(len(dims), groups)]


def conformal_threshold(scores: Sequence[float], coverage: float = COVERAGE) -> float:
    """The ⌈(n+1)·coverage⌉-th smallest score: a new image like the calibration ones passes with probability
    at least ``coverage`` (split conformal). With too few scores for that rank (n < coverage/(1-coverage)) the
    largest score is used, which lets slightly fewer pass than promised.

    Raises:
        ValueError: no scores.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no calibration scores")
    k = math.ceil((len(s) + 1) * coverage)
    return float(s[min(k, len(s)) - 1])


def bank_indices(labels: Sequence[Any], max_rows: int = MAX_BANK_ROWS, seed: int = 0) -> np.ndarray:
    """Which rows keep in the bank: all of them up to ``max_rows``, otherwise as many per class as fit
    (classes smaller than their share give the rest to the others), chosen at random with ``seed``."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    take = [0] * len(groups)
    left = max_rows
    open_ = sorted(range(len(groups)), key=lambda g: len(groups[g]))  # smallest class first
    while open_:
        share = left // len(open_)
        if len(groups[open_[0]]) <= share:  # the smallest class fits whole; the rest share what is left
            g = open_.pop(0)
            take[g] = len(groups[g])
            left -= take[g]
            continue
        for i, g in enumerate(open_):  # none fits whole: an even share each, the remainder one by one
            take[g] = share + (1 if i < left - share * len(open_) else 0)
        break
    return np.sort(np.concatenate([grp[:t] for grp, t in zip(groups, take)]))


def flagged_share(scores: Sequence[float], threshold: float) -> float:
    """Share of ``scores`` above ``threshold`` (the images called unknown)."""
    s = np.asarray(scores, dtype=np.float64)
    return float((s > threshold).mean()) if len(s) else 0.0


def _rel(path: Any, root: Any) -> str:
    """``path`` relative to ``root`` when inside it (POSIX separators), else as given."""
    from pathlib import Path

    p = Path(str(path))
    if root:
        try:
            return p.resolve().relative_to(Path(str(root)).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return str(path)


def build_open_set(bank_feats: np.ndarray, calibration_feats: np.ndarray | None = None,
                   coverage: float = COVERAGE, *, bank_style: np.ndarray | None = None,
                   calibration_style: np.ndarray | None = None, style_spec: dict[str, Any] | None = None,
                   paths: Sequence[Any] | None = None, labels: Sequence[Any] | None = None, root: Any = None,
                   k: int = K, groups: Sequence[Sequence[int]] | None = STYLE_GROUPS
                   ) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """The ``ood.json`` record and the float16 banks of a trained model.

    Args:
        bank_feats: (M, D) pre-logit features of the training images to keep (already subsampled with
            :func:`bank_indices`).
        calibration_feats: features of held-out images (validation) to set the thresholds on; None, or fewer
            than two rows, scores the bank's own rows leave-one-out instead (a head fitted on every image).
        coverage: share of calibration images the combined threshold lets pass.
        bank_style: (M, S) raw style statistics of the same images (None: content only, e.g. a backbone
            without ``forward_intermediates``).
        calibration_style: the calibration images' style statistics (with ``calibration_feats``).
        style_spec: :meth:`StyleSpec.to_dict` plus ``dims`` (each stage's width), recorded to compute the same
            statistics at prediction time.
        paths: each bank row's image (stored relative to ``root`` when inside it).
        labels: each bank row's label.
        root: the dataset's folder.
        k: nearest neighbours averaged.
        groups: style stage groups (see :data:`STYLE_GROUPS`).
    Returns:
        (record, content bank float16 (M, D) L2-normalised, style bank float16 (M, S') of the joined unit group
        vectors, or None).
    Raises:
        ValueError: fewer than two bank rows (no leave-one-out score exists).
    """
    bank = normalise(bank_feats).astype(np.float16)
    if len(bank) < 2:
        raise ValueError("an open-set bank needs at least two training images")
    use_val = calibration_feats is not None and len(calibration_feats) >= 2 and \
        (bank_style is None or calibration_style is not None)
    how = "validation" if use_val else "leave-one-out"
    cal_feats = calibration_feats if use_val else bank
    parts = [knn_distance(cal_feats, bank, k, exclude_self=not use_val)]
    sbank = None
    if bank_style is not None and style_spec is not None:
        dims = [int(d) for d in style_spec["dims"]]
        sb = [v.astype(np.float16) for v in style_vectors(bank_style, dims, groups)]
        sbank = np.concatenate(sb, 1)
        cal = style_vectors(calibration_style, dims, groups) if use_val else sb
        parts += [knn_distance(c, b, k, exclude_self=not use_val, normalised=True) for c, b in zip(cal, sb)]
    part_t = [max(conformal_threshold(d, coverage), 1e-6) for d in parts]
    combined = np.max(np.stack([d / t for d, t in zip(parts, part_t)]), axis=0)
    factor = max(conformal_threshold(combined, coverage), 1e-6)  # the larger of several: calibrated once more
    eff = [t * factor for t in part_t]
    norm = [d / t for d, t in zip(parts, eff)]
    record: dict[str, Any] = {
        "score": SCORE, "version": VERSION, "threshold": 1.0, "quantile": coverage, "n": int(len(parts[0])),
        "dim": int(bank.shape[1]), "bank_rows": int(len(bank)), "calibration": how,
        "calibration_scores": [round(float(v), 6) for v in np.max(np.stack(norm), axis=0)],
        "content": {"k": int(k), "threshold": round(eff[0], 8),
                    "calibration": [round(float(v), 5) for v in norm[0]]},
        "style": None, "factor": round(factor, 6)}
    if sbank is not None:
        gl = _groups(len(style_spec["dims"]), groups)
        record["style"] = {**{k_: v for k_, v in style_spec.items() if k_ != "dims"},
                           "dims": [int(d) for d in style_spec["dims"]], "groups": gl, "k": int(k),
                           "thresholds": [round(t, 8) for t in eff[1:]], "bank_dim": int(sbank.shape[1]),
                           "calibration": [round(float(v), 5) for v in np.max(np.stack(norm[1:]), axis=0)]}
    if paths is not None:
        record["bank_paths"] = [_rel(p, root) for p in paths]
        record["bank_root"] = str(root) if root else None
    if labels is not None:
        record["bank_labels"] = [str(v) for v in labels]
    return record, bank, sbank


def _max_threshold(record: dict[str, Any]) -> float:
    return 2.0 if int(record.get("version", 1)) == 1 else MAX_THRESHOLD


def with_threshold(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The record with a threshold a person chose: ``quantile`` becomes the share of calibration images that
    pass it, and ``chosen`` says it was set by hand. Version 2: the threshold is on ``ood_score`` (1.0 = the
    calibrated one); version 1: a cosine distance."""
    t = float(threshold)
    hi = _max_threshold(record)
    if not math.isfinite(t) or not 0.0 <= t <= hi:
        what = "a cosine distance" if hi == 2.0 else "an ood_score (1.0 = the calibrated threshold)"
        raise ValueError(f"threshold {threshold!r} must be {what} between 0 and {hi:g}")
    scores = record.get("calibration_scores") or []
    return {**record, "threshold": t, "quantile": round(1.0 - flagged_share(scores, t), 6) if scores else None,
            "chosen": "by hand"}


@dataclass(frozen=True)
class Scores:
    """Open-set scores of N images.

    Attributes:
        score: ``ood_score`` (N,): version 2, the larger of the two normalised distances; version 1, the cosine
            distance.
        content: content distance / its threshold (N,).
        style: style distance / its threshold (N,), or None (content-only bank).
        nearest: (N, <=3) indices of the nearest bank rows by content; nearest_distance their cosine distances.
    """

    score: np.ndarray
    content: np.ndarray
    style: np.ndarray | None
    nearest: np.ndarray
    nearest_distance: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


def reason_of(content: float | None, style: float | None, threshold: float = 1.0) -> str | None:
    """``style``, ``content``, ``both`` or None: which normalised distances are above ``threshold``."""
    c = content is not None and content > threshold
    s = style is not None and style > threshold
    return "both" if c and s else "content" if c else "style" if s else None


@dataclass(frozen=True)
class OpenSet:
    """A loaded bank and its record: scores images and says which are unknown."""

    bank: np.ndarray  # (M, D) float16, L2-normalised
    record: dict[str, Any]
    style_bank: np.ndarray | None = None  # (M, S') float16: the joined unit style-group vectors (version 2)

    @property
    def version(self) -> int:
        return int(self.record.get("version", 1))

    @property
    def threshold(self) -> float:
        return float(self.record["threshold"])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    @property
    def style(self) -> dict[str, Any] | None:
        """The style part of the record (stages, stat, dims, groups, k, thresholds), or None."""
        st = self.record.get("style") if self.version >= 2 else None
        return st if st and self.style_bank is not None else None

    @property
    def style_spec(self) -> dict[str, Any] | None:
        """What the forward pass must compute: {stages, stat} (None: content only)."""
        st = self.style
        return {"stages": list(st["stages"]), "stat": st.get("stat", "std")} if st else None

    def content_threshold(self) -> float:
        return float(self.record["content"]["threshold"]) if self.version >= 2 else self.threshold

    def scores(self, feats: np.ndarray, style: np.ndarray | None = None) -> Scores:
        """Content and style distances (normalised: 1.0 = each one's calibrated threshold), ``ood_score`` and the
        nearest training images of pre-logit features ``feats`` (N, D) and raw style statistics ``style``
        (N, S; ignored by a content-only bank, required by one with style rows)."""
        f = normalise(feats)
        b = np.asarray(self.bank, np.float32)
        sim = f @ b.T if len(f) else np.zeros((0, len(b)), np.float32)
        n = min(NEAREST, len(b))
        near = np.argsort(-sim, axis=1, kind="stable")[:, :n] if len(f) else np.zeros((0, n), int)
        near_d = np.clip(1.0 - np.take_along_axis(sim, near, 1).astype(np.float64), 0.0, 2.0)
        if self.version < 2:
            d = knn_distance(f, b, 1, normalised=True)
            return Scores(d, d / max(self.threshold, 1e-12), None, near, near_d)
        k = int(self.record["content"].get("k", 1))
        content = knn_distance(f, b, k, normalised=True) / self.content_threshold()
        sty = None
        st = self.style
        if st is not None:
            if style is None:
                raise ValueError("this open-set bank scores style too; pass the images' style statistics")
            vecs = style_vectors(style, st["dims"], st["groups"])
            a, parts = 0, []
            sb = np.asarray(self.style_bank, np.float32)
            for v, t in zip(vecs, st["thresholds"]):
                parts.append(knn_distance(v, sb[:, a:a + v.shape[1]], int(st.get("k", 1)), normalised=True) / t)
                a += v.shape[1]
            sty = np.max(np.stack(parts), axis=0)
        score = content if sty is None else np.maximum(content, sty)
        return Scores(score, content, sty, near, near_d)

    def score(self, feats: np.ndarray, style: np.ndarray | None = None) -> np.ndarray:
        """``ood_score`` of each image (see :meth:`scores`)."""
        return self.scores(feats, style).score

    def unknown(self, scores: Any) -> np.ndarray:
        """True where a score (an array, or :class:`Scores`) is above the threshold."""
        s = scores.score if isinstance(scores, Scores) else scores
        return np.asarray(s) > self.threshold

    def nearest_images(self, idx: Sequence[int], dist: Sequence[float]) -> list[dict[str, Any]] | None:
        """[{path, label, distance}] of bank rows ``idx`` (None when the record keeps no paths): the path joined
        to the dataset's folder when that is known."""
        paths = self.record.get("bank_paths")
        if not paths or len(paths) != len(self.bank):
            return None
        labels = self.record.get("bank_labels") or [None] * len(paths)
        root = self.record.get("bank_root")
        out = []
        for i, d in zip(idx, dist):
            p = paths[int(i)]
            if root and not p.startswith("/") and ":" not in p[:3]:
                p = f"{root.rstrip('/')}/{p}"
            out.append({"path": p, "label": labels[int(i)], "distance": round(float(d), 6)})
        return out


def describe(record: dict[str, Any] | None) -> str:
    """What the threshold means, in plain words (model card, HTML report)."""
    if record is None:
        return UNKNOWN_NOTE
    what = ("training images, each compared with the others (leave-one-out: the head was fitted on every image)"
            if record.get("calibration") == "leave-one-out" else "validation images")
    q = record.get("quantile")
    q_txt = f"{q:.0%}" if isinstance(q, (int, float)) else "most"
    how = (f"It was chosen by hand; {q_txt} of the {record.get('n')} {what} pass it." if record.get("chosen") else
           f"It is the conformal {q_txt} threshold, set on {record.get('n')} {what}: about {q_txt} of new images "
           "like the training images pass it, so about 1 in 20 of them is flagged by mistake.")
    if int(record.get("version", 1)) < 2:
        return (f"Every prediction also gives `ood_score`, the cosine distance between the image's features (what "
                f"the classifier sees) and the nearest of {record.get('bank_rows')} training images "
                f"(`ood_bank.safetensors`). Above {float(record['threshold']):.3f} the image is called `unknown`, "
                f"unlike the training images; the closest class is still given. {how} Images unlike anything in the "
                "training set (another kind of picture, another subject) are flagged; an image of a known kind that "
                "simply belongs to none of the classes may not be.")
    style = record.get("style")
    two = ("two distances to the model's " + str(record.get("bank_rows")) + " training images (`ood_bank.safetensors`): "
           "**content**, how far what the image shows is from the nearest training image (the features the "
           "classifier sees), and **style**, how far the kind of picture is (colours, strokes, texture: the "
           "spread of each channel in earlier layers of the network) from the nearest training image's. Each is "
           "divided by its own calibrated threshold, so 1.0 means 'at the threshold'; `ood_score` is the larger "
           "of the two" if style else
           "the content distance to the model's " + str(record.get("bank_rows")) + " training images (how far "
           "what the image shows is from the nearest training image, in the features the classifier sees; this "
           "backbone gives no style statistics), divided by its calibrated threshold (1.0 = at the threshold)")
    return (f"Every prediction also gives `ood_score`, from {two}. Above {float(record['threshold']):.2f} the image "
            "is called `unknown` (the closest class is still given), and `ood_reason` says why: `style` (a different "
            "kind of picture, e.g. a handwritten digit shown to a model of colour drawings), `content` (the same kind "
            f"of picture showing something else) or `both`. {how} An image of a known kind that simply belongs to "
            "none of the classes may pass.")


def open_set_fields(i: int | None, scores: Scores | None, open_set: OpenSet | None) -> dict[str, Any]:
    """The open-set fields of prediction row ``i``: ``unknown``, ``ood_score``, ``ood_reason`` (``style``,
    ``content``, ``both``, or None when not unknown), ``ood_distances`` {content, style} (1.0 = each one's
    calibrated threshold; style None for a content-only bank) and ``nearest`` (up to 3 training images by
    content [{path, label, distance}], None when the bank keeps no paths). All None without open-set files."""
    if open_set is None or scores is None or i is None:
        return {"unknown": None, "ood_score": None, "ood_reason": None, "ood_distances": None, "nearest": None}
    score = float(scores.score[i])
    unknown = bool(score > open_set.threshold)
    c = float(scores.content[i])
    s = None if scores.style is None else float(scores.style[i])
    if open_set.version < 2:  # the threshold is a cosine distance; the normalised content is score / threshold
        t = 1.0
    else:
        t = open_set.threshold
    return {"unknown": unknown, "ood_score": round(score, 6),
            "ood_reason": reason_of(c, s, t) if unknown else None,
            "ood_distances": {"content": round(c, 6), "style": None if s is None else round(s, 6)},
            "nearest": open_set.nearest_images(scores.nearest[i], scores.nearest_distance[i])}


def set_threshold(run_dir: Any, threshold: float) -> dict[str, Any]:
    """Save a threshold chosen by a person in a run's ``ood.json`` (through its owner, atomically).

    Returns:
        The new record (without the calibration scores and bank paths).
    Raises:
        RunError: the run has no open-set files (trained before them).
        ConfigError: the threshold is out of range.
    """
    files = RunFiles(run_dir)
    record = files.open_set_record()
    if record is None:
        raise RunError(UNKNOWN_NOTE)
    try:
        new = with_threshold(record, threshold)
    except ValueError as e:
        raise ConfigError(f"Cannot use that threshold: {e}.") from None
    files.write_open_set(new)
    return summary(new)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its long lists (calibration scores, bank paths and labels)."""
    out = {k: v for k, v in record.items() if k not in ("calibration_scores", "bank_paths", "bank_labels")}
    for part in ("content", "style"):
        if isinstance(out.get(part), dict):
            out[part] = {k: v for k, v in out[part].items() if k != "calibration"}
    return out

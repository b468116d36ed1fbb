"""The linear probe: L2-regularised logistic regression on frozen features.

This is the classic recipe itself (scikit-learn's ``LogisticRegression(C=linear_c)`` objective; one-vs-rest
for multi-label data), solved full-batch with torch's L-BFGS on a numpy objective and gradient. Its own
module: the audit, the advisor and the lab fit probes without importing the training loop.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim.lbfgs import _strong_wolfe

from ..config import TrainConfig
from ..errors import CancelledError
from .devices import set_seed

__all__ = ["fit_linear_head", "fit_ovr_head", "class_weights", "LBFGS_ITERS_PER_EPOCH", "PROBE_MAX_ITERATIONS"]

#: L-BFGS iterations per reported solver round (each round is one point of the probe's training curve).
LBFGS_ITERS_PER_EPOCH = 2
#: A generous cap on the probe's L-BFGS iterations, never a user setting: the probe stops when it converges
#: (scikit-learn's tolerance), which took 48-228 iterations on the sample sets and 300 scikit-learn digits; the
#: cap only guards against a problem that never does. (It was the linear "epochs", 100 rounds of at most 2
#: iterations by default; 300 digits needed 186 rounds.)
PROBE_MAX_ITERATIONS = 1000

_LBFGS_GTOL = 1e-4  # scikit-learn LogisticRegression's default tol

#: the data term of an objective: logits (N, C) -> (weighted loss summed over the images, its gradient in z)
LossAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]
#: logits of the training and validation images -> train_loss, train_acc, val_loss, val_acc
EpochStats = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def class_weights(labels: np.ndarray, n: int) -> torch.Tensor:
    """Per-class weights inversely proportional to class frequency (absent classes get 0)."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


class _LBFGS:
    """:class:`torch.optim.LBFGS` with its strong-Wolfe line search: the same tensor operations in the same order
    (its ``step`` of torch 2.x, on real dense parameters, no ``maximize``), so the same fit to the last bit, without
    the :class:`torch.optim.Optimizer` machinery, whose construction imports ``torch._dynamo``: ~2 s of CPU on a
    2-core machine, most of what a warm re-train spent outside its data (benchmarks/RESULTS.md, issue 24).
    The line search is torch's own function.

    Attributes:
        state: ``n_iter`` (iterations so far), ``func_evals`` and the curvature history, as torch keeps them.
    """

    def __init__(self, params: list[torch.Tensor], lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100):
        self._params = params
        self.lr, self.max_iter = lr, max_iter
        self.max_eval = max_iter * 5 // 4 if max_eval is None else max_eval
        self.tolerance_grad, self.tolerance_change, self.history_size = tolerance_grad, tolerance_change, history_size
        self.state: dict[str, Any] = {}

    def _gather_flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.view(-1) for p in self._params], 0)

    def _add_grad(self, step_size: Any, update: torch.Tensor) -> None:
        offset = 0
        for p in self._params:  # parameter by parameter, as torch does (the same kernels, hence the same bits)
            numel = p.numel()
            p.add_(update[offset:offset + numel].view_as(p), alpha=step_size)
            offset += numel

    def _directional_evaluate(self, closure: Callable[[], torch.Tensor], x: list[torch.Tensor], t: Any,
                              d: torch.Tensor) -> tuple[float, torch.Tensor]:
        self._add_grad(t, d)
        loss = float(closure())
        flat_grad = self._gather_flat_grad()
        for p, pdata in zip(self._params, x):
            p.copy_(pdata)
        return loss, flat_grad

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """At most ``max_iter`` iterations (``max_eval`` evaluations of ``closure``, which sets the parameters'
        ``grad`` and returns the objective); returns the objective at the start."""
        lr, max_iter, max_eval = self.lr, self.max_iter, self.max_eval
        tolerance_grad, tolerance_change, history_size = self.tolerance_grad, self.tolerance_change, self.history_size
        state = self.state
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        flat_grad = self._gather_flat_grad()
        if flat_grad.abs().max() <= tolerance_grad:
            return orig_loss
        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)
                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al = state["al"]
                q = flat_grad.neg()
                for i in range(num_old - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, H_diag)
                for i in range(num_old):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)
            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break
            x_init = [p.clone(memory_format=torch.contiguous_format) for p in self._params]
            loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                lambda x, t, d: self._directional_evaluate(closure, x, t, d), x_init, t, d, loss, flat_grad, gtd,
                max_ls=max_eval - current_evals)
            self._add_grad(t, d)
            opt_cond = flat_grad.abs().max() <= tolerance_grad
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break
        state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
                     prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        return orig_loss


#: The probe solves in the span of its training images when they are at most this fraction of the feature width
#: (a few hundred images of 1,280-1,792 features: each evaluation and L-BFGS step 3-7x cheaper); above it the
#: decomposition costs more than it saves.
SPAN_BELOW = 0.75


def _row_space(x: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis (features x rank, float64) of the span of ``x``'s rows, or None when ``x`` has more
    than :data:`SPAN_BELOW` rows per feature.

    The probe's optimum lies in that span: a weight component orthogonal to every training image changes no
    training logit and only adds to the L2 penalty, so it is zero at the optimum, and gradient steps from zero
    (or from a head fitted on fewer of the same images) never leave the span. L-BFGS in an orthonormal basis of it
    takes the steps it takes in the features' own coordinates (its dot products are unchanged; only its first
    step's length, which it scales by the gradient's L1 norm, differs) on vectors of rank x classes instead of
    features x classes: the same fit, to the solver's tolerance, for a fraction of the arithmetic.

    The basis comes from the eigenvectors of the images' Gram matrix (V = X^T U / s: ~10 ms for 240 images of
    1,792 features, where LAPACK's SVD took 75 ms idle and 3 s once with both cores busy). Directions of singular
    value below 1e-4 of the largest are left out: their columns would not be orthonormal to float64's precision,
    and what they add to a logit is below the solver's tolerance.
    """
    n, d = x.shape
    if n == 0 or n > SPAN_BELOW * d:
        return None
    x64 = np.asarray(x, dtype=np.float64)
    ev, u = np.linalg.eigh(x64 @ x64.T)
    keep = ev > max(float(ev.max()), 0.0) * 1e-8
    if not keep.any():  # every image all zeros: nothing to span
        return None
    return np.ascontiguousarray((x64.T @ u[:, keep]) / np.sqrt(ev[keep]))


def _lbfgs_head(x_train: np.ndarray, x_val: np.ndarray, n_out: int, cfg: TrainConfig, loss_and_grad: LossAndGrad,
                n_weight: float, stats: EpochStats, on_epoch: Callable[[dict[str, Any]], None] | None,
                should_cancel: Callable[[], bool] | None, init: nn.Linear | None) -> tuple[nn.Linear, dict[str, Any]]:
    """Minimise ``loss_and_grad(x W + b) + ||W||^2 / (2C)`` (intercept not penalised) with full-batch L-BFGS.

    The objective and its gradient are computed by hand in numpy (OpenBLAS): these tall-thin products are
    3-4x faster there than in torch on CPU, and no autograd bookkeeping is needed for two matrix products. With
    fewer images than features (most small data sets) W is solved for in the span of the training images
    (:func:`_row_space`: W = V W', the products in float64 on rank-wide vectors); otherwise the products run in
    float32 (single-precision BLAS is twice as fast), everything else in float64. Each "epoch"
    is ``LBFGS_ITERS_PER_EPOCH`` iterations, reported like any epoch; the fit stops where scikit-learn's solver
    would (the largest entry of the gradient of the per-image mean objective below 1e-4) or once the objective
    stops changing, and at the latest after :data:`PROBE_MAX_ITERATIONS` (``cfg.epochs`` means fine-tuning
    epochs and plays no part here). ``init`` warm-starts the solver (the refit on train + validation starts from
    the train-only fit).
    """
    set_seed(cfg.seed)
    d = x_train.shape[1]
    basis = _row_space(x_train)
    if basis is None:  # as many images as features or more: the features' own coordinates (float32 products)
        xs = np.ascontiguousarray(x_train, dtype=np.float32)
        xvs = np.ascontiguousarray(x_val, dtype=np.float32)
    else:  # fewer images than features: the images' span (float64 products, each several times cheaper)
        xs = np.asarray(x_train, dtype=np.float64) @ basis
        xvs = np.asarray(x_val, dtype=np.float64) @ basis
    r = xs.shape[1]
    w = torch.zeros(r, n_out, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
    if init is not None:
        with torch.no_grad():
            w0 = init.weight.detach().T.double().numpy()
            w.copy_(torch.from_numpy(w0 if basis is None else basis.T @ w0))
            b.copy_(init.bias.detach().double())
    opt = _LBFGS([w, b], lr=1.0, max_iter=LBFGS_ITERS_PER_EPOCH, history_size=20, tolerance_grad=1e-7,
                 tolerance_change=1e-10)
    l2 = 0.5 / cfg.linear_c
    wn, bn = w.detach().numpy(), b.detach().numpy()  # views: L-BFGS updates w and b in place

    def logits(x: np.ndarray) -> np.ndarray:
        return (x @ wn.astype(x.dtype)).astype(np.float64) + bn

    # The objective at the last points evaluated, keyed by their exact bits: each round of L-BFGS starts by
    # evaluating the point its previous line search accepted, and the round's report reads it too. Computed once
    # per point, read back after (the same numbers: this only spares the repeats, half the products of a fit).
    seen: list[tuple[np.ndarray, np.ndarray, tuple[Any, ...]]] = []

    def evaluate() -> tuple[np.ndarray, float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits of the training images, data term, gradient in w, gradient in b, objective) at (w, b) now."""
        bits_w, bits_b = wn.view(np.int64), bn.view(np.int64)
        for pw, pb, out in seen:
            if np.array_equal(pw, bits_w) and np.array_equal(pb, bits_b):
                return out
        z = logits(xs)
        loss, g = loss_and_grad(z)
        out = (z, loss, torch.from_numpy((xs.T @ g.astype(xs.dtype)).astype(np.float64) + (2 * l2) * wn),
               torch.from_numpy(g.sum(0)), torch.tensor(loss + l2 * (wn * wn).sum(), dtype=torch.float64))
        seen.insert(0, (bits_w.copy(), bits_b.copy(), out))
        del seen[3:]
        evaluate.count += 1  # type: ignore[attr-defined]
        return out

    evaluate.count = 0  # type: ignore[attr-defined]

    def closure() -> torch.Tensor:
        _, _, w.grad, b.grad, objective = evaluate()
        return objective

    basis32 = basis.astype(np.float32) if basis is not None else None

    def gradient_max() -> float:
        """The largest entry of the objective's gradient in the features' own coordinates (the stopping rule's,
        as scikit-learn's solver reads it): the span's gradient mapped back. Mapping costs as much as an
        evaluation, so it is skipped while a column's length alone shows an entry above ``stop`` (an entry of a
        column of length L, spread over d features by an orthonormal basis, is at least L / sqrt(d))."""
        gb = float(b.grad.abs().max())
        if basis32 is None:
            return max(float(w.grad.abs().max()), gb)
        g = w.grad.numpy()
        floor = float(np.sqrt((g * g).sum(0)).max()) / np.sqrt(d)
        if floor > stop:
            return max(floor, gb)
        return max(float(np.abs(basis32 @ g.astype(np.float32)).max()), gb)

    stop = _LBFGS_GTOL * n_weight  # the stopping rule on the gradient of the summed objective
    prev = float("inf")
    epoch = 0
    val_loss = float("nan")
    state = opt.state  # L-BFGS counts its iterations here ("n_iter")
    converged = False
    for epoch in range(1, PROBE_MAX_ITERATIONS + 1):  # each round is at least one iteration
        t0 = time.perf_counter()
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled while training the head.")
        opt.step(closure)
        z, data_term = evaluate()[:2]
        obj = data_term + l2 * float((wn * wn).sum())
        s = stats(z, logits(xvs) if len(xvs) else np.zeros((0, n_out)))
        val_loss = s["val_loss"]
        if on_epoch:
            on_epoch({"epoch": epoch, "epochs": None, **s, "lr": 1.0,  # no known end: it runs until converged
                      "seconds": time.perf_counter() - t0, "best": True})
        gmax = gradient_max() / n_weight
        if abs(prev - obj) <= 1e-7 * max(1.0, abs(obj)) or gmax <= _LBFGS_GTOL:
            converged = True
            break
        if state.get("n_iter", epoch) >= PROBE_MAX_ITERATIONS:
            break
        prev = obj
    out = nn.Linear(d, n_out)
    with torch.no_grad():
        weight = w.detach().numpy() if basis is None else basis @ w.detach().numpy()
        out.weight.copy_(torch.from_numpy(weight.T.astype(np.float32)))
        out.bias.copy_(b.detach().float())
    # a probe has no "best epoch": it keeps its converged fit, never a round picked on validation
    return out, {"best_epoch": None, "val_loss": val_loss, "epochs_run": epoch,
                 "iterations": int(state.get("n_iter", epoch)),
                 "converged": converged, "evaluations": evaluate.count}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def fit_linear_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                    n_classes: int, cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None,
                    init: nn.Linear | None = None) -> tuple[nn.Linear, dict[str, Any]]:
    """Fit the linear probe: L2-regularised multinomial logistic regression on frozen features.

    scikit-learn's ``LogisticRegression(C=linear_c)`` objective (an AdamW-trained head was a few points worse on
    our sample data), solved by :func:`_lbfgs_head`. ``class_balance`` other than none weighs each image by
    its class's inverse frequency.

    Returns:
        (a Linear layer over the raw pooled features, info with best_epoch (None), val_loss, epochs_run (solver
        rounds), iterations, converged)
    """
    swn = (class_weights(y_train, n_classes).double().numpy()[y_train] if cfg.class_balance != "none"
           else np.ones(len(y_train)))
    onehot = np.eye(n_classes)[y_train]

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        logp = _log_softmax(z)
        return float(-(swn * (logp * onehot).sum(1)).sum()), (np.exp(logp) - onehot) * swn[:, None]

    def stats(z: np.ndarray, zv: np.ndarray) -> dict[str, float]:
        logp_t, logp_v = _log_softmax(z), _log_softmax(zv)
        return {"train_loss": float(-(logp_t * onehot).sum(1).mean()),
                "train_acc": float((logp_t.argmax(1) == y_train).mean()),
                "val_loss": float(-logp_v[np.arange(len(y_val)), y_val].mean()) if len(y_val) else float("nan"),
                "val_acc": float((logp_v.argmax(1) == y_val).mean()) if len(y_val) else float("nan")}

    return _lbfgs_head(x_train, x_val, n_classes, cfg, loss_and_grad, float(swn.sum()), stats, on_epoch,
                       should_cancel, init)


def _bce(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) - t z, stably."""
    return np.logaddexp(0.0, z) - t * z


def fit_ovr_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 init: nn.Linear | None = None) -> tuple[nn.Linear, dict[str, Any]]:
    """Fit the multi-label probe: one L2-regularised binary logistic regression per label (one-vs-rest).

    The objective is scikit-learn's ``OneVsRestClassifier(LogisticRegression(C=linear_c))`` summed over the
    labels: per label ``sum_i w_i log(1 + exp(-s_i z_i)) + ||w_k||^2 / (2C)`` with s = +-1 and the intercept
    not penalised. The labels' problems share no parameter, so one full-batch L-BFGS over all of them reaches
    each label's own optimum. ``class_balance`` other than none weighs each label's positives and negatives as
    scikit-learn's ``class_weight="balanced"`` does. The reported accuracy is exact match of the label sets at 0.5.

    Args:
        y_train, y_val: (N, C) 0/1 label matrices.
    Returns:
        (a Linear layer of C logits over the raw pooled features, info with best_epoch, val_loss, epochs_run)
    """
    y = np.asarray(y_train, dtype=np.float64)
    yv = np.asarray(y_val, dtype=np.float64).reshape(-1, y.shape[1])
    n = len(y)
    if cfg.class_balance != "none":
        pos = y.sum(0)
        wpos = np.where(pos > 0, n / (2 * np.maximum(pos, 1)), 0.0)
        wneg = np.where(n - pos > 0, n / (2 * np.maximum(n - pos, 1)), 0.0)
        sw = y * wpos + (1 - y) * wneg
    else:
        sw = np.ones_like(y)

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        return float((sw * _bce(z, y)).sum()), (p - y) * sw

    def stats(z: np.ndarray, zv: np.ndarray) -> dict[str, float]:
        return {"train_loss": float(_bce(z, y).mean()), "train_acc": float(((z >= 0) == (y > 0.5)).all(1).mean()),
                "val_loss": float(_bce(zv, yv).mean()) if len(yv) else float("nan"),
                "val_acc": float(((zv >= 0) == (yv > 0.5)).all(1).mean()) if len(yv) else float("nan")}

    return _lbfgs_head(x_train, x_val, y.shape[1], cfg, loss_and_grad, float(n), stats, on_epoch, should_cancel, init)

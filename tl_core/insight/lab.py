"""The transfer-vs-scratch lab: validation accuracy against images per class, with and without pretraining.

Three arms share one validation split and nested training subsets (the 5 images of a class are among its
10, and so on), so the curves differ only by what the arm knows before training:

- ``linear``: the pretrained backbone frozen, a logistic-regression head on its features (the ``linear``
  strategy's probe).
- ``finetune``: the pretrained backbone with its last ``unfreeze_blocks`` stages and the head trained for
  ``epochs`` epochs (AdamW, head initialised from the linear probe as in LP-FT; BatchNorm statistics kept).
  The frozen stages' outputs are computed once per image and reused every epoch, which is exact because
  nothing before them trains and no augmentation is used; that is what makes the lab fast on a CPU.
- ``scratch``: the same architecture from random weights, every layer trained for the same ``epochs``
  (light augmentation; BatchNorm statistics re-estimated on the training images before evaluation).

The lab runs at a reduced input size (``image_size``, default 128 px) so that the whole curve fits in a
couple of minutes on a laptop CPU; pass ``image_size=None`` for the backbone's own size. Accuracies are
those of the last epoch (no selection on the validation images).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..cache import DecodedImageCache
from ..config import LAB_ARMS, TrainConfig
from ..data.intake import Dataset, ImageItem
from ..data.library import open_data
from ..data.splits import split_dataset
from ..errors import CancelledError, ConfigError, DatasetError
from ..models.backbones import build_model
from ..models.devices import configure_threads, set_seed, single_threaded
from ..models.preprocess import Preprocess, data_config_for, train_transform
from ..models.probe import fit_linear_head
from ..models.training import (ImageSet, create_optimizer, evaluate_epoch, set_trainable, train_one_epoch,
                               trainable_groups)
from ..storage.workspace import Workspace

__all__ = ["ARMS", "DEFAULT_SIZES", "learning_curve", "lab_preprocess"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]

#: The lab's arms: key -> plain-language description (the table lives in ``tl_core.config``: pages read it).
ARMS = LAB_ARMS
#: Images per class of the default curve; None means every training image.
DEFAULT_SIZES: tuple[int | None, ...] = (5, 10, 20, None)
# fine-tune arm: learning rates of the new head and of the unfrozen stages, label smoothing
_FT_HEAD_LR, _FT_BODY_LR, _FT_SMOOTHING = 1e-4, 1e-4, 0.0


def lab_preprocess(model: nn.Module, image_size: int | None) -> Preprocess:
    """The model's preprocessing, optionally at a smaller input size (same crop ratio, mean, std, filter).

    Args:
        model: a timm model.
        image_size: input side in pixels; None keeps the model's own.
    Returns:
        The :class:`Preprocess`.
    """
    cfg = dict(data_config_for(model))
    if image_size:
        cfg["input_size"] = [3, int(image_size), int(image_size)]
    return Preprocess.from_data_config(cfg)


def _split_points(model: nn.Module, unfreeze_blocks: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                      Callable[[nn.Module, torch.Tensor], torch.Tensor]] | None:
    """(frozen stem, trainable top) of an EfficientNet/MobileNet-style timm model, or None for others."""
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return None
    k = max(1, min(unfreeze_blocks, len(model.blocks)))

    def stem(x: torch.Tensor) -> torch.Tensor:
        return model.blocks[:-k](model.bn1(model.conv_stem(x)))

    def top(m: nn.Module, h: torch.Tensor) -> torch.Tensor:  # m: a copy of the model (trained in place)
        return m.forward_head(m.bn2(m.conv_head(m.blocks[-k:](h))))

    return stem, top


def _top_features(m: nn.Module, h: torch.Tensor, k: int) -> torch.Tensor:
    return m.forward_head(m.bn2(m.conv_head(m.blocks[-k:](h))), pre_logits=True)


class _Top(nn.Module):
    """The trainable top of a model copy as a module of its own: stage maps in, class scores out."""

    def __init__(self, model: nn.Module, top: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model, self._top = model, top

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._top(self.model, h)


class _Batches(Sampler):
    """Seeded shuffled batches in which a lone last image joins the batch before it (BatchNorm in training
    mode cannot take a batch of one)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True):
        self.n, self.bs, self.gen, self.shuffle = n, batch_size, generator, shuffle

    def _batches(self) -> list[list[int]]:
        order = (torch.randperm(self.n, generator=self.gen) if self.shuffle else torch.arange(self.n)).tolist()
        out = [order[s:s + self.bs] for s in range(0, self.n, self.bs)]
        if len(out) > 1 and len(out[-1]) == 1:
            out[-2] += out.pop()
        return out

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.bs)
        return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel and should_cancel():
        raise CancelledError("Cancelled during the lab.")


class _Clock:
    """Progress of the lab weighted by time, with the time left.

    Every point of the curve is planned as (arm, images, epochs) and its cost estimated as a fixed part
    (building or copying the network, evaluating it) plus a part per image and epoch, both in units of the
    measured seconds per image of the pretrained forward pass (a fine-tuning step runs the top stages forward
    and backward, a scratch step the whole network); once an arm has run a point, its measured cost per image
    and epoch replaces the guess, and the point under way is extrapolated from how far it has got. The
    fraction is time spent over time spent plus the time left, so it moves like a clock, not like a count of
    points.
    """

    # per image and epoch, relative to one pretrained forward pass; the fixed part in forward passes
    _PER = {"features": 1.0, "linear": 0.0, "finetune": 1.0, "scratch": 3.5}

    def __init__(self, plan: list[tuple[str, int, int]], n_val: int, emit: Progress):
        self.plan = plan  # (arm, images, epochs) in the order they run; "features" first when needed
        self.n_val = n_val
        self.emit = emit
        self.t0 = time.perf_counter()
        self.forward_s = 0.01  # per image at the lab's size; measured by the feature pass
        self.seen: dict[str, list[tuple[float, float]]] = {}  # arm -> [(images x epochs, seconds)]
        self.done = 0  # points finished
        self.point_t0 = self.t0

    def _fixed_guess(self, arm: str, images: int) -> float:
        if arm == "scratch":  # a new network, re-estimating BatchNorm on the training images, evaluating
            return 1.0 + (images + self.n_val) * self.forward_s
        if arm == "finetune":
            return 0.3 + 0.5 * self.n_val * self.forward_s
        return 0.0

    def _cost(self, arm: str, images: int, epochs: int) -> float:
        x = images * max(1, epochs)
        if arm == "linear":
            seen = self.seen.get("linear")
            return seen[-1][1] if seen else 0.3
        fixed = self._fixed_guess(arm, images)
        pts = self.seen.get(arm)
        if pts:  # the arm's last point: its measured cost per image and epoch
            px, py = pts[-1]
            per = max(0.0, py - self._fixed_guess(arm, int(px // max(1, epochs)))) / max(1.0, px)
        else:
            per = self._PER[arm] * self.forward_s
        return fixed + per * x

    def finish(self, arm: str, images: int, epochs: int) -> None:
        spent = time.perf_counter() - self.point_t0
        self.seen.setdefault(arm, []).append((images * max(1, epochs), spent))
        self.done += 1
        self.point_t0 = time.perf_counter()

    def tick(self, event: dict[str, Any], within: float = 0.0) -> None:
        """Emit ``event`` with the time-weighted fraction and the time left; ``within`` is how far (0-1) the
        current point has got."""
        now = time.perf_counter()
        elapsed = now - self.t0
        left = sum(self._cost(*p) for p in self.plan[self.done + 1:])
        if self.done < len(self.plan):
            est = self._cost(*self.plan[self.done])
            spent = now - self.point_t0
            if within >= 0.15 and spent > 1.0:  # the point under way tells how long it will take
                left += spent / within - spent
            else:
                left += max(est - spent, 0.0)
        frac = elapsed / (elapsed + left) if elapsed + left > 0 else 1.0
        self.emit({"stage": "lab", **event, "fraction": round(min(1.0, frac), 4), "eta_s": round(left, 1),
                   "points_done": self.done, "points": len(self.plan)})


def learning_curve(data: str | os.PathLike | Dataset, backbone: str = "efficientnet_lite0",
                   sizes: Sequence[int | None] = DEFAULT_SIZES, epochs: int = 4, image_size: int | None = 128,
                   arms: Sequence[str] = ("linear", "finetune", "scratch"), val_split: float = 0.2, seed: int = 0,
                   batch_size: int = 16, unfreeze_blocks: int = 2, workspace: Workspace | None = None,
                   progress: Progress | None = None,
                   should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run the transfer-vs-scratch learning curve.

    Args:
        data: dataset path or opened dataset (a ``test`` split is not used).
        backbone: an EfficientNet/MobileNet-style timm backbone with pretrained weights (``finetune`` needs
            that structure; other architectures run ``linear`` and ``scratch`` only).
        sizes: training images per class; None (or anything above what a class has) means all of them.
        epochs: epochs of the ``finetune`` and ``scratch`` arms (the same for both).
        image_size: input size the lab runs at; None for the backbone's own (slower).
        arms: which of :data:`ARMS` to run.
        val_split, seed: the validation split (shared by all points) and every random choice.
        batch_size: images per step.
        unfreeze_blocks: stages the ``finetune`` arm trains.
        workspace: decoded-image cache location (default ``$TL_HOME``).
        progress: called with {"stage": "lab", "arm", "images_per_class", "done", "total", "message",
            "fraction" (time-weighted, 0-1), "eta_s" (seconds left, estimated), "points_done", "points"}.
        should_cancel: polled between steps; True raises :class:`CancelledError`.
    Returns:
        {"rows": [{"arm", "images_per_class", "train_images", "val_accuracy", "seconds"}], "sizes" (ints),
        "val": validation images, "classes", "epochs", "image_size", "backbone", "arms" (descriptions of
        the arms run), "skipped" ({arm: why}), "feature_seconds" (the one-off frozen pass shared by
        linear and finetune), "seconds", "reading" (plain-language summary)}.
    Raises:
        ConfigError: bad sizes, epochs or arms.
    """
    t_all = time.perf_counter()
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"Unknown lab arm(s) {unknown or arms}; choose from {', '.join(ARMS)}.")
    if not 1 <= epochs <= 100:
        raise ConfigError(f"Lab epochs must be between 1 and 100 (got {epochs}).")
    if any(s is not None and int(s) < 1 for s in sizes) or not sizes:
        raise ConfigError("Images per class must be at least 1.")
    if image_size is not None and not 32 <= int(image_size) <= 1024:
        raise ConfigError(f"Lab image size must be between 32 and 1024 pixels (got {image_size}).")
    configure_threads()
    ws = workspace or Workspace.default()
    ds = open_data(data, ws)
    if ds.multi_label:
        raise DatasetError(f"The lab's learning curve samples images per class, and {os.path.basename(ds.source)} is multi-label (several labels per image); train runs with --max-per-class instead.")
    full = split_dataset(ds, val_split, seed)
    classes = ds.classes
    cidx = {c: i for i, c in enumerate(classes)}
    per_class_max = max(sum(1 for i in full.train if i.label == c) for c in classes)
    resolved = sorted({per_class_max if s is None else min(int(s), per_class_max) for s in sizes})
    subsets = {n: split_dataset(ds, val_split, seed, max_per_class=n).train for n in resolved}
    val = full.val
    y_val = torch.tensor([cidx[i.label] for i in val])

    set_seed(seed)
    model, winfo = build_model(backbone, len(classes), seed=seed)
    if winfo.source == "random":
        raise ConfigError(f"{backbone} has no pretrained weights available; the lab compares pretrained with scratch.")
    pre = lab_preprocess(model, image_size)
    decoded = DecodedImageCache(ws.cache_dir / "decoded")
    split_fns = _split_points(model, unfreeze_blocks)
    skipped: dict[str, str] = {}
    run_arms = [a for a in ARMS if a in arms]
    if "finetune" in run_arms and split_fns is None:
        skipped["finetune"] = (f"{backbone} is not an EfficientNet/MobileNet-style network; the lab fine-tunes only "
                               "those (run partial fine-tuning from the Train page instead).")
        run_arms.remove("finetune")
    k = max(1, min(unfreeze_blocks, len(getattr(model, "blocks", [1]))))

    def tensor_of(item: ImageItem) -> torch.Tensor:
        return pre.eval_from_resized(decoded.get(item, pre.resize, pre.interpolation))

    train_all = subsets[resolved[-1]]
    uniq = {str(i.path): i for i in train_all + val}
    order = list(uniq)
    need_pretrained = any(a in run_arms for a in ("linear", "finetune"))
    plan = [("features", len(order), 1)] if need_pretrained else []
    for n in resolved:
        for arm in run_arms:
            plan.append((arm, len(subsets[n]), epochs))
    clock = _Clock(plan, len(val), progress or (lambda e: None))
    clock.tick({"arm": "features", "message": "Loading the backbone"})

    # -- the frozen pass, once per image: intermediate maps (finetune) and pooled features (linear) --
    t_feat = time.perf_counter()
    acts: dict[str, torch.Tensor] = {}
    feats: dict[str, np.ndarray] = {}
    if need_pretrained:
        model.eval()
        with torch.inference_mode():
            for s in range(0, len(order), 32):
                _check_cancel(should_cancel)
                x = torch.stack([tensor_of(uniq[p]) for p in order[s:s + 32]])
                if split_fns is not None:
                    h = split_fns[0](x)
                    f = _top_features(model, h, k)
                    for j, p in enumerate(order[s:s + 32]):
                        acts[p] = h[j].clone()
                else:
                    f = model.forward_head(model.forward_features(x), pre_logits=True)
                for j, p in enumerate(order[s:s + 32]):
                    feats[p] = f[j].float().numpy()
                done = min(s + 32, len(order))
                # the speed the rest of the plan is estimated from: after the first batch, which pays for warm-up
                if s == 0:
                    t_first, first = time.perf_counter(), done
                    clock.forward_s = (t_first - t_feat) / done
                else:
                    clock.forward_s = (time.perf_counter() - t_first) / (done - first)
                clock.tick({"arm": "features", "done": done, "total": len(order),
                            "message": "Running the pretrained backbone once over the images"}, done / len(order))
        clock.finish("features", len(order), 1)
    feature_seconds = time.perf_counter() - t_feat
    x_val = np.stack([feats[str(i.path)] for i in val]) if need_pretrained else None

    rows: list[dict[str, Any]] = []
    probe_cfg = TrainConfig(strategy="linear", seed=seed).resolved()
    smoothing = TrainConfig().label_smoothing
    for n in resolved:
        tr = subsets[n]
        y_tr = torch.tensor([cidx[i.label] for i in tr])
        head = None
        linear_seconds = 0.0
        if need_pretrained:
            t0 = time.perf_counter()
            x_tr = np.stack([feats[str(i.path)] for i in tr])
            with single_threaded():
                head, _ = fit_linear_head(x_tr, y_tr.numpy(), x_val, y_val.numpy(), len(classes), probe_cfg)
            with torch.inference_mode():
                acc = float((head(torch.from_numpy(x_val)).argmax(1) == y_val).float().mean())
            linear_seconds = time.perf_counter() - t0
            if "linear" in run_arms:
                rows.append({"arm": "linear", "images_per_class": n, "train_images": len(tr),
                             "val_accuracy": round(acc, 4), "seconds": round(linear_seconds, 3)})
                clock.finish("linear", len(tr), epochs)
                clock.tick({"arm": "linear", "images_per_class": n, "val_accuracy": acc})
        if "finetune" in run_arms:
            acc, seconds = _finetune_arm(model, split_fns[1], k, head, acts, tr, y_tr, val, y_val, epochs, batch_size,
                                         seed, clock, n, should_cancel)
            # the probe it starts from is part of its cost
            rows.append({"arm": "finetune", "images_per_class": n, "train_images": len(tr),
                         "val_accuracy": round(acc, 4), "seconds": round(seconds + linear_seconds, 3)})
            clock.finish("finetune", len(tr), epochs)
            clock.tick({"arm": "finetune", "images_per_class": n, "val_accuracy": acc})
        if "scratch" in run_arms:
            acc, seconds = _scratch_arm(backbone, len(classes), pre, decoded, tr, y_tr, val, y_val, epochs, batch_size,
                                        seed, smoothing, clock, n, should_cancel)
            rows.append({"arm": "scratch", "images_per_class": n, "train_images": len(tr),
                         "val_accuracy": round(acc, 4), "seconds": round(seconds, 3)})
            clock.finish("scratch", len(tr), epochs)
            clock.tick({"arm": "scratch", "images_per_class": n, "val_accuracy": acc})
    return {
        "rows": rows,
        "sizes": resolved,
        "val": len(val),
        "classes": classes,
        "epochs": epochs,
        "image_size": pre.input_size,
        "backbone": backbone,
        "weights": winfo.source,
        "arms": {a: ARMS[a] for a in run_arms},
        "skipped": skipped,
        "feature_seconds": round(feature_seconds, 3),
        "seconds": round(time.perf_counter() - t_all, 3),
        "reading": _reading(rows, len(classes), len(val)),
    }


def _loader(dataset: Any, n: int, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_sampler=_Batches(n, batch_size, torch.Generator().manual_seed(seed), shuffle))


def _steps(clock: _Clock, arm: str, n: int, epochs: int) -> Callable[[int, int], Callable[[int, int, float], None]]:
    """An ``on_step`` callback per epoch for :func:`train_one_epoch` that moves the lab's clock."""
    def for_epoch(ep: int, _total: int) -> Callable[[int, int, float], None]:
        def on_step(step: int, steps: int, loss: float) -> None:
            clock.tick({"arm": arm, "images_per_class": n, "done": ep, "total": epochs},
                       (ep + step / max(1, steps)) / epochs)
        return on_step
    return for_epoch


def _finetune_arm(model: nn.Module, top: Callable[[nn.Module, torch.Tensor], torch.Tensor], k: int,
                  head: nn.Linear, acts: dict[str, torch.Tensor], tr: Sequence[ImageItem], y_tr: torch.Tensor,
                  val: Sequence[ImageItem], y_val: torch.Tensor, epochs: int, batch_size: int, seed: int,
                  clock: _Clock, n: int, should_cancel: Callable[[], bool] | None) -> tuple[float, float]:
    """The last ``k`` stages and the head of a copy of ``model`` trained on the cached stage maps with the
    shared loop (:func:`train_one_epoch`); returns (validation accuracy, seconds)."""
    t0 = time.perf_counter()
    set_seed(seed)
    m = copy.deepcopy(model)
    set_trainable(m, "partial", k)  # the last k stages and what follows them: as partial fine-tuning
    clf = m.get_classifier()
    with torch.no_grad():
        clf.weight.copy_(head.weight)
        clf.bias.copy_(head.bias)
    net = _Top(m, top)
    h_tr = torch.stack([acts[str(i.path)] for i in tr])
    loader = _loader(TensorDataset(h_tr, y_tr), len(tr), batch_size, seed)
    opt, sched = create_optimizer(trainable_groups(m, _FT_HEAD_LR, _FT_BODY_LR), TrainConfig().weight_decay,
                                  len(loader) * epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=_FT_SMOOTHING)
    # pretrained BatchNorm statistics stay put, as in training
    frozen = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    steps = _steps(clock, "finetune", n, epochs)
    for ep in range(epochs):
        train_one_epoch(net, loader, opt, sched, loss_fn, frozen, steps(ep, epochs), should_cancel)
    h_va = torch.stack([acts[str(i.path)] for i in val])
    acc = evaluate_epoch(net, DataLoader(TensorDataset(h_va, y_val), batch_size=64))["val_acc"]
    return acc, time.perf_counter() - t0


def _scratch_arm(backbone: str, n_classes: int, pre: Preprocess, decoded: DecodedImageCache, tr: Sequence[ImageItem],
                 y_tr: torch.Tensor, val: Sequence[ImageItem], y_val: torch.Tensor, epochs: int, batch_size: int,
                 seed: int, smoothing: float, clock: _Clock, n: int,
                 should_cancel: Callable[[], bool] | None) -> tuple[float, float]:
    """The same network from random weights, every layer trained with the shared loop (light augmentation);
    BatchNorm statistics re-estimated on the training images before it is judged. Returns (accuracy, seconds)."""
    t0 = time.perf_counter()
    set_seed(seed)
    m, _ = build_model(backbone, n_classes, weights="random", seed=seed)
    cfg = TrainConfig(strategy="scratch").resolved()
    labels = [int(y) for y in y_tr]
    loader = _loader(ImageSet(tr, labels, decoded, pre, train_transform(pre, "light")), len(tr), batch_size, seed)
    opt, sched = create_optimizer(trainable_groups(m, cfg.lr), cfg.weight_decay, len(loader) * epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    m.to(memory_format=torch.channels_last)
    steps = _steps(clock, "scratch", n, epochs)
    for ep in range(epochs):
        train_one_epoch(m, loader, opt, sched, loss_fn, (), steps(ep, epochs), should_cancel)
    # a few dozen steps leave BatchNorm's running averages near their initial values: re-estimate them on the
    # training images so that the scratch arm is judged fairly
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for x, _ in _loader(ImageSet(tr, labels, decoded, pre, pre.eval_from_resized), len(tr), 32, seed,
                            shuffle=False):
            _check_cancel(should_cancel)
            m(x.contiguous(memory_format=torch.channels_last))
    acc = 0.0
    if len(val):
        acc = evaluate_epoch(m, DataLoader(ImageSet(val, [int(y) for y in y_val], decoded, pre, pre.eval_from_resized),
                                           batch_size=32))["val_acc"]
    return acc, time.perf_counter() - t0


def _reading(rows: list[dict[str, Any]], n_classes: int, n_val: int) -> str:
    """One paragraph a teacher can read out."""
    by = {(r["arm"], r["images_per_class"]): r["val_accuracy"] for r in rows}
    sizes = sorted({r["images_per_class"] for r in rows})
    if not sizes:
        return ""
    n = sizes[0]
    parts = [f"Chance is {1 / n_classes:.0%} ({n_classes} classes); accuracies are on {n_val} validation images."]
    pre = [(a, by[(a, n)]) for a in ("linear", "finetune") if (a, n) in by]
    if pre and ("scratch", n) in by:
        best_arm, best = max(pre, key=lambda t: t[1])
        parts.append(f"With {n} images per class the pretrained backbone reaches {best:.0%} ({best_arm}) while the "
                     f"same network trained from scratch reaches {by[('scratch', n)]:.0%}.")
        m = sizes[-1]
        if m != n and ("scratch", m) in by:
            pm = max(by.get((a, m), 0.0) for a in ("linear", "finetune"))
            parts.append(f"With {m} per class: pretrained {pm:.0%}, scratch {by[('scratch', m)]:.0%}. Features learned "
                         "on a million ImageNet photos carry over; from scratch, the network must learn to see from "
                         "your few images alone.")
    return " ".join(parts)

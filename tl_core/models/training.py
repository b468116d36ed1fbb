"""Fine-tuning: the plain training loop (``train_one_epoch``, ``evaluate_epoch``), learning-rate schedule,
which layers train per strategy, best-checkpoint selection with early stopping, and :func:`finetune`, the
whole fine-tuning of a model on a split. Progress goes through callbacks only.
"""

from __future__ import annotations

import dataclasses

import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset, DistributedSampler, Sampler, Subset

from ..cache import DecodedImageCache
from ..config import TrainConfig
from ..data.intake import ImageItem
from ..data.splits import Split
from ..errors import CancelledError
from .devices import Runtime, release_free_memory
from .distributed import all_reduce_sum, barrier, broadcast, shard, wrap
from .multilabel import label_matrix
from .preprocess import Preprocess, train_transform
from .probe import class_weights

__all__ = ["Progress", "EVAL_BATCH", "lr_lambda", "EarlyStopper", "ImageSet", "BalancedSampler", "set_trainable",
           "trainable_groups", "finetune_groups", "create_optimizer", "train_one_epoch", "evaluate_epoch", "finetune"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


# evaluation batch: as fast per image as 64 on CPU, and ~250 MB less peak memory after a training epoch
EVAL_BATCH = 32



def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per optimiser step: linear warm-up over ``warmup_steps``, then cosine decay to 0
    at ``total_steps`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class EarlyStopper:
    """Best-checkpoint selection and early stopping.

    A checkpoint is better when its validation accuracy is higher, or equal with a lower validation loss.
    Loss alone is not the criterion: fine-tuning trains with label smoothing, whose softened outputs score
    a worse cross-entropy than the sharper linear probe they start from even where they classify more
    images correctly (seen on Fashion-MNIST: 0.87 vs 0.85 accuracy, loss 0.51 vs 0.44)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("inf")
        self.best_acc = -1.0
        self.best_epoch = -1
        self.bad = 0

    def step(self, loss: float, epoch: int, acc: float | None = None) -> tuple[bool, bool]:
        """Returns (improved, should_stop)."""
        has_acc = acc is not None and not math.isnan(acc)
        if not has_acc:
            better = loss < self.best - 1e-4
        else:
            better = acc > self.best_acc + 1e-9 or (acc > self.best_acc - 1e-9 and loss < self.best - 1e-4)
        if better:
            self.best, self.best_epoch, self.bad = loss, epoch, 0
            if has_acc:
                self.best_acc = acc
            return True, False
        self.bad += 1
        return False, bool(self.patience) and self.bad >= self.patience


class ImageSet(TorchDataset):
    def __init__(self, items: Sequence[ImageItem], labels: Sequence[int], decoded: DecodedImageCache,
                 pre: Preprocess, transform: Callable[[np.ndarray], torch.Tensor]):
        self.items, self.labels, self.decoded, self.pre, self.transform = items, labels, decoded, pre, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.decoded.get(self.items[i], self.pre.resize, self.pre.interpolation)
        return self.transform(arr), self.labels[i]


def _classifier(model: nn.Module) -> nn.Module:
    return model.get_classifier()


def set_trainable(model: nn.Module, strategy: str, unfreeze_blocks: int) -> list[nn.Module]:
    """Freeze per strategy; returns the frozen modules (kept in eval mode so BN statistics stay put)."""
    if strategy in ("full", "scratch"):
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    for p in model.parameters():
        p.requires_grad_(False)
    children = list(model.named_children())
    # timm CNNs: a 'blocks'/'stages'/'layers' sequence, then head modules after it
    seq_name = next((n for n in ("blocks", "stages", "layers") if hasattr(model, n)), None)
    frozen: list[nn.Module] = []
    if seq_name is not None:
        seq = list(getattr(model, seq_name).children())
        k = min(unfreeze_blocks, len(seq))
        trainable = seq[-k:]
        after = False
        for n, m in children:
            if n == seq_name:
                after = True
                frozen += seq[:-k]
                continue
            if after:
                trainable.append(m)
            else:
                frozen.append(m)
    else:  # generic: unfreeze the last modules that hold roughly a third of the parameters
        trainable, frozen = [], []
        total = sum(p.numel() for p in model.parameters())
        acc = 0
        for n, m in reversed(children):
            if acc < total / 3:
                trainable.append(m)
                acc += sum(p.numel() for p in m.parameters())
            else:
                frozen.append(m)
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    for p in _classifier(model).parameters():
        p.requires_grad_(True)
    return frozen


def trainable_groups(model: nn.Module, lr: float, body_lr: float | None = None) -> list[dict[str, Any]]:
    """The optimiser's parameter groups of ``model`` as :func:`set_trainable` left it.

    Args:
        model: a timm model whose ``requires_grad`` flags say what trains.
        lr: the head's learning rate (every parameter's when ``body_lr`` is None).
        body_lr: the learning rate of the trainable parameters outside the head; None: one group of every
            trainable parameter at ``lr``.
    Returns:
        ``[{"params": head, "lr": lr}, {"params": body, "lr": body_lr}]`` (no body group when nothing else
        trains), or ``[{"params": trainable, "lr": lr}]``; parameters in the model's order.
    """
    if body_lr is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    head = list(_classifier(model).parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": body_lr})
    return groups


def finetune_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """:func:`trainable_groups` of a fine-tuning run: the head at ``cfg.lr``, the rest of what trains at
    ``cfg.lr * cfg.backbone_lr_mult`` (at ``cfg.lr`` from scratch: no pretrained body to protect)."""
    return trainable_groups(model, cfg.lr, cfg.lr if cfg.strategy == "scratch" else cfg.lr * cfg.backbone_lr_mult)


def create_optimizer(groups: list[dict[str, Any]], weight_decay: float, total_steps: int,
                     warmup_steps: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The one optimiser and schedule of every network trained here (fine-tuning, the Lab's arms), as timm's
    ``create_optimizer_v2`` is for its scripts: AdamW over ``groups`` (:func:`trainable_groups`), and per step a
    linear warm-up then cosine decay to 0 (:func:`lr_lambda`).

    Args:
        groups: parameter groups, each with its ``lr``.
        weight_decay: AdamW's decoupled weight decay, every group.
        total_steps: optimiser steps of the whole training (the schedule reaches 0 there).
        warmup_steps: steps of linear warm-up.
    Returns:
        (optimiser, scheduler); call ``scheduler.step()`` after each ``optimiser.step()``.
    """
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup_steps))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loss_fn: nn.Module, frozen: Sequence[nn.Module] = (),
                    on_step: Callable[[int, int, float], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None, runtime: Runtime | None = None
                    ) -> dict[str, float]:
    """One pass over ``loader``; returns mean train loss and accuracy (over every rank's images).

    ``runtime`` puts the batches on its device and runs the forward pass under its mixed precision (with a
    gradient scaler for fp16); the default is the CPU in full precision.
    """
    rt = runtime or Runtime.cpu()
    model.train()
    for m in frozen:
        m.eval()
    tot, correct, n = 0.0, 0, 0
    steps = len(loader)
    for step, (x, y) in enumerate(loader):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled during an epoch.")
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if rt.scaler is not None:
            rt.scaler.scale(loss).backward()
            rt.scaler.step(optimizer)
            rt.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        bs = len(y)
        value = loss.item()
        tot += value * bs
        correct += _correct(logits, y)
        n += bs
        if on_step:
            on_step(step + 1, steps, value)
    tot, correct, n = all_reduce_sum(rt, [tot, correct, n])
    return {"train_loss": tot / max(n, 1), "train_acc": correct / max(n, 1)}


@torch.inference_mode()
def evaluate_epoch(model: nn.Module, loader: DataLoader, runtime: Runtime | None = None) -> dict[str, float]:
    """Validation loss and accuracy under ``torch.inference_mode()`` (summed over the ranks' shards)."""
    rt = runtime or Runtime.cpu()
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    tot, correct, n = 0.0, 0, 0
    for x, y in loader:
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x).float()
        if y.ndim == 2:  # multi-label: per image, the mean over labels of the binary cross-entropy
            tot += nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1]
        else:
            tot += loss_fn(logits, y).item()
        correct += _correct(logits, y)
        n += len(y)
    tot, correct, n = all_reduce_sum(rt, [tot, correct, n])
    return {"val_loss": tot / max(n, 1), "val_acc": correct / max(n, 1)}


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Images classified right: the top class, or (multi-label targets, (N, C)) every label right at logit 0."""
    if y.ndim == 2:
        return int(((logits >= 0) == (y > 0.5)).all(1).sum().item())
    return int((logits.argmax(1) == y).sum().item())


class BalancedSampler(Sampler):
    """Class-balanced sampling (with replacement) that every rank draws the same way: the same global draw per
    epoch from the same seed, each rank taking every world-th index, so N processes see what one does."""

    def __init__(self, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1000003 * self.epoch)
        total = len(self) * self.world  # as many draws for every rank (equal steps keep DDP in step)
        draw = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        return iter(draw[self.rank::self.world])

    def __len__(self) -> int:
        return -(-len(self.weights) // self.world)


def _train_loader(train_set: ImageSet, labels: list[int], n_classes: int, cfg: TrainConfig, rt: Runtime
                  ) -> tuple[DataLoader, Any]:
    """The training loader: shuffled (or class-balanced), each rank its share of every global batch."""
    batch = max(1, cfg.batch_size // rt.world_size)
    if rt.distributed and cfg.batch_size % rt.world_size:
        log.warning("batch size %d is not a multiple of %d processes: each takes %d (global batch %d)",
                    cfg.batch_size, rt.world_size, batch, batch * rt.world_size)
    opts = rt.loader_options()
    if cfg.class_balance == "sampler":
        w = class_weights(np.array(labels), n_classes).numpy()[labels]
        sampler = BalancedSampler(w, cfg.seed, rt.rank, rt.world_size)
        return DataLoader(train_set, batch_size=batch, sampler=sampler, **opts), sampler
    if rt.distributed:
        sampler = DistributedSampler(train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
        return DataLoader(train_set, batch_size=batch, sampler=sampler, **opts), sampler
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(train_set, batch_size=batch, shuffle=True, generator=g, **opts), None


def finetune(model: nn.Module, split: Split, classes: list[str], pre: Preprocess, decoded: DecodedImageCache,
             cfg: TrainConfig, emit: Progress, should_cancel: Callable[[], bool] | None,
             start_from_probe: bool = False, runtime: Runtime | None = None,
             multi_label: bool = False) -> dict[str, Any]:
    """Fine-tune per strategy. With ``start_from_probe`` the head already holds the linear probe and the
    probe itself is the epoch-0 checkpoint: fine-tuning is kept only where it is more accurate on validation
    (or as accurate with a lower loss; see ``EarlyStopper``).

    Under torchrun (``runtime.distributed``) the model trains in ``DistributedDataParallel``: each rank decodes
    and trains on its share, validation is summed over the ranks' shards, and rank 0 decides the kept
    checkpoint, early stopping and cancel for all of them.
    """
    rt = runtime or Runtime.cpu()
    idx = {c: i for i, c in enumerate(classes)}
    if multi_label:  # one sigmoid output per label, trained with binary cross-entropy; targets are 0/1 rows

        ytr = list(label_matrix([i.labels for i in split.train], classes).astype(np.float32))
        yva = list(label_matrix([i.labels for i in split.val], classes).astype(np.float32))
    else:
        ytr = [idx[i.label] for i in split.train]
        yva = [idx[i.label] for i in split.val]
    # decode everything once up front (reported as a stage; each rank its share): epochs never touch JPEG/PNG
    all_items = split.train + split.val
    rounds = -(-len(all_items) // rt.world_size)  # as many on every rank: a cancel check is a collective
    for n in range(rounds):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled while preparing the images.")
        k = n * rt.world_size + rt.rank
        if k < len(all_items):
            decoded.get(all_items[k], pre.resize, pre.interpolation)
        if n % 16 == 0 or n + 1 == rounds:
            emit({"stage": "decode", "done": min(len(all_items), (n + 1) * rt.world_size), "total": len(all_items)})
    barrier(rt)
    train_set = ImageSet(split.train, ytr, decoded, pre, train_transform(pre, cfg.augment))
    val_set = ImageSet(split.val, yva, decoded, pre, pre.eval_from_resized)
    if multi_label and cfg.class_balance == "sampler":
        log.info("class-balanced sampling does not apply to multi-label data: shuffling instead")
        cfg = dataclasses.replace(cfg, class_balance="none")
    train_loader, sampler = _train_loader(train_set, ytr, len(classes), cfg, rt)
    val_loader = DataLoader(Subset(val_set, shard(len(val_set), rt)), batch_size=EVAL_BATCH, **rt.loader_options())

    frozen = set_trainable(model, cfg.strategy, cfg.unfreeze_blocks)
    if cfg.strategy != "scratch":
        # keep pretrained BatchNorm statistics: batches of a few dozen images estimate them badly, and the
        # probe head was fitted on features computed with them
        frozen = frozen + [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    elif rt.distributed and rt.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics of the global batch
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * cfg.epochs
    opt, sched = create_optimizer(finetune_groups(model, cfg), cfg.weight_decay, total,
                                  int(cfg.warmup_epochs * steps_per_epoch))
    if multi_label:
        pos = np.stack(ytr).sum(0) if ytr else np.zeros(len(classes))
        # "weights": each label's positives weighed by negatives/positives (BCEWithLogits' pos_weight)
        pos_weight = (torch.tensor(np.where(pos > 0, (len(ytr) - pos) / np.maximum(pos, 1), 1.0), dtype=torch.float32,
                                   device=rt.device) if cfg.class_balance == "weights" else None)
        loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    else:
        weight = class_weights(np.array(ytr), len(classes)).to(rt.device) if cfg.class_balance == "weights" else None
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    model.to(rt.device, memory_format=torch.channels_last)
    net = wrap(model, rt)
    stopper = EarlyStopper(cfg.patience)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if start_from_probe:
        t0 = time.perf_counter()
        m0 = evaluate_epoch(net, val_loader, rt)
        stopper.step(m0["val_loss"], 0, m0["val_acc"])
        # recorded as epoch 0 (validation only): the curves start from the probe fine-tuning must beat
        emit({"stage": "epoch", "epoch": 0, "epochs": cfg.epochs, "lr": 0.0, "seconds": time.perf_counter() - t0,
              "best": True, "probe": True, **m0})
    t_start = time.perf_counter()
    epoch = 0
    stop = False
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

        first_step_done = [0.0]

        def on_step(step: int, steps: int, loss: float, epoch: int = epoch) -> None:
            done = (epoch - 1) * steps + step
            now = time.perf_counter()
            if step == 1:
                first_step_done[0] = now
            # the pace of this epoch's steps after its first (loaders and caches warm up in the first steps of a
            # run: a rate over them overshoots the time left 2-4x); validation passes are the page's to add
            per_step = ((now - first_step_done[0]) / (step - 1) if step > 1 else (now - t_start) / done)
            emit({"stage": "train", "epoch": epoch, "epochs": cfg.epochs, "step": step, "steps": steps,
                  "loss": loss, "done": done, "total": total, "eta_s": per_step * (total - done)})

        m = train_one_epoch(net, train_loader, opt, sched, loss_fn, frozen, on_step, should_cancel, rt)
        m["train_seconds"] = time.perf_counter() - t0  # the training pass alone (benchmarks/run.py row 3)
        release_free_memory()  # the backward pass's freed buffers: give them back before evaluating
        m.update(evaluate_epoch(net, val_loader, rt))
        improved, stop = stopper.step(m["val_loss"], epoch, m["val_acc"])
        improved, stop = (bool(v) for v in broadcast(rt, [improved, stop]))  # rank 0 decides for all
        if improved:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        emit({"stage": "epoch", "epoch": epoch, "epochs": cfg.epochs, "lr": sched.get_last_lr()[0],
              "seconds": time.perf_counter() - t0, "best": improved, **m})
        if stop:
            log.info("early stop at epoch %d (best %d)", epoch, stopper.best_epoch)
            break
    model.load_state_dict(best_state)
    model.to("cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    stopped = bool(stop) and epoch < cfg.epochs
    return {"best_epoch": stopper.best_epoch, "val_loss": stopper.best, "epochs_run": epoch,
            "stop": {"reason": "patience" if stopped else "epochs", "epoch": epoch, "epochs": cfg.epochs,
                     "patience": cfg.patience, "best_epoch": stopper.best_epoch}}

"""Loading a trained model from a run (id or directory) or a bundle zip, validating everything in it.

A run directory and a bundle hold the same files, parsed by their one owner
(:class:`tl_core.storage.files.RunFiles`). What is checked before use: weights only through safetensors (a
pickle is refused: it can run code), every tensor's name and shape against the architecture in
``meta.json``, JSON syntax, sizes, and a bundle's checksums (``manifest.json``).

A refitted linear run can be loaded with its validation head (``head=VALIDATION_FIT``): the model that
produced the run's validation predictions, which the views of those predictions (Grad-CAM of a mistake,
``tl-core explain`` of a validation image) explain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import FeatureCache
from ..errors import ExportError
from ..models.catalogue import timm_kwargs
from ..models.feature_variants import model_from_meta
from ..models.devices import Runtime
from ..models.features import StyleSpec, feature_key, style_key
from ..models.inference import CachedFeatures
from ..models.preprocess import Preprocess
from ..models.openset import OpenSet
from ..storage.files import METRICS, SAVED, VALIDATION_FIT, RunFiles, RunMeta, RunMetrics, resolve_run
from ..storage.workspace import Workspace

__all__ = ["TrainedModel", "load_model", "load_bundle", "resolve_run"]  # resolve_run: tl_core.storage.files


@dataclass
class TrainedModel:
    """A model ready to predict: the network, its classes, its exact preprocessing and its files."""

    model: nn.Module
    files: RunFiles
    source: str  # the run directory or bundle it was loaded from
    head: str = SAVED  # SAVED, or VALIDATION_FIT: the training-only head of a refitted linear run
    runtime: Runtime | None = None  # where it runs (its device and precision); None: the CPU
    open_set: OpenSet | None = None  # the open-set bank and threshold; None for a run from before them

    @property
    def meta(self) -> RunMeta:
        return self.files.meta()

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def pre(self) -> Preprocess:
        return Preprocess.from_dict(self.meta.preprocess)

    @property
    def config(self) -> dict[str, Any]:
        return self.files.config_dict()

    @property
    def metrics(self) -> RunMetrics:
        return self.files.metrics()

    @property
    def temperature(self) -> float:
        return self.meta.temperature

    @property
    def refitted(self) -> bool:
        return self.meta.refitted

    def cached_features(self, workspace: Workspace) -> CachedFeatures | None:
        """Where this model's probe input can come from in ``workspace``'s feature cache, or None.

        A ``linear`` run's backbone is the frozen pretrained one (its weights fingerprint is in ``meta.json``), so
        its logits are its head on the feature variant it was fitted on, cached under the same key as in
        training; every other strategy changed the backbone (None: the whole network runs).
        """
        meta = self.meta
        fingerprint = (meta.weights or {}).get("fingerprint")
        if (self.config.get("strategy") != "linear" or not fingerprint or (meta.weights or {}).get("source") == "random"
                or not hasattr(self.model, "get_classifier")):
            return None
        variant = (meta.features or {}).get("variant", "last")
        pre, model = self.pre, self.model
        root = workspace.cache_dir / "features"
        last = FeatureCache(root, feature_key(meta.backbone, fingerprint, pre))
        spec = self.style_spec
        # the open-set score's style statistics of the frozen backbone, cached beside its features
        style = FeatureCache(root, style_key(meta.backbone, fingerprint, pre, spec)) if spec is not None else None
        if variant == "last":
            return CachedFeatures(last, "last", int(getattr(model, "head_hidden_size", None) or model.num_features),
                                  style_cache=style)
        # the saved wrapper's own block widths and scales (meta.json records the same)
        return CachedFeatures(FeatureCache(root, feature_key(meta.backbone, fingerprint, pre, variant)), variant,
                              int(model.last_features), tuple(int(d) for d in model.block_dims),
                              tuple(float(k) for k in model.scales.tolist()) if variant == "depths" else (),
                              last if variant == "depths" else None, style_cache=style)

    @property
    def style_spec(self) -> StyleSpec | None:
        """The style statistics the open-set score needs from each forward pass (None: none needed)."""
        spec = self.open_set.style_spec if self.open_set is not None else None
        return StyleSpec.from_dict(spec) if spec else None


def _build(meta: RunMeta, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    import timm

    arch = meta.arch
    if not timm.is_model(arch.split(".")[0]):
        raise ExportError(f"{where}: meta.json names the architecture {arch!r}, which this timm "
                          f"({timm.__version__}) does not know; update timm.")
    try:
        model = timm.create_model(arch.split(".")[0], pretrained=False, num_classes=meta.num_classes,
                                  **timm_kwargs(arch))
    except Exception as e:
        raise ExportError(f"{where}: cannot build architecture {arch!r} ({e}).") from None
    model = model_from_meta(model, meta.features, meta.num_classes)  # a feature-variant probe's wrapper
    target = model.state_dict()
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if k in state and state[k].shape != v.shape]
    if wrong:
        k, got, need = wrong[0]
        raise ExportError(f"{where}: tensor {k} has shape {got} but {arch} with {meta.num_classes} classes needs "
                          f"{need} ({len(wrong)} tensor(s) wrong); the weights do not match meta.json.")
    missing = [k for k in target if k not in state]
    if missing:
        raise ExportError(f"{where}: {len(missing)} tensor(s) missing from model.safetensors (e.g. {missing[0]}); "
                          f"the weights are not those of {arch}.")
    unexpected = [k for k in state if k not in target]
    if unexpected:
        raise ExportError(f"{where}: model.safetensors has {len(unexpected)} tensor(s) that {arch} does not have "
                          f"(e.g. {unexpected[0]}); the weights do not match meta.json.")
    bad = [k for k, v in state.items() if target[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        raise ExportError(f"{where}: tensor {bad[0]} is {state[bad[0]].dtype}, expected floating point; refused.")
    model.load_state_dict(state, strict=True)
    return model.eval().to(memory_format=torch.channels_last)


def _with_head(model: nn.Module, head: dict[str, torch.Tensor], where: str) -> None:
    target = model.state_dict()
    if not head or any(k not in target or target[k].shape != v.shape for k, v in head.items()):
        raise ExportError(f"{where}: val_head.safetensors does not fit the model's classifier; train the run again.")
    model.load_state_dict(head, strict=False)


def load_model(ref: str | os.PathLike, head: str = SAVED, device: str = "cpu") -> TrainedModel:
    """Load a run directory or a ``.zip`` bundle for prediction, validating everything in it.

    Needs no workspace: a bundle carries its classes, preprocessing and architecture.

    Args:
        ref: a run directory or a bundle ``.zip``.
        head: ``saved`` (the model as saved), or ``validation-fit``: for a refitted linear run, the head fitted
            on training images alone, which produced the run's validation predictions (other runs: the saved
            model, which produced them).
        device: where it runs: cpu (the default: exports and their verification need the CPU), auto, cuda, mps.
    Returns:
        The model (eval mode) with its files (classes, preprocessing, meta, config, metrics).
    Raises:
        ExportError: missing files, pickled weights, bad JSON, checksum mismatch, tensors that do not
            fit the architecture, or a damaged archive; the message says which and what to do.
    """
    files = RunFiles.open(ref)
    meta = files.meta()
    files.config_dict()  # validated now: a damaged config fails here, not later
    if files.has(METRICS):
        files.metrics()
    model = _build(meta, files.weights(), files.where)
    used = SAVED
    if head == VALIDATION_FIT and meta.refitted:
        vh = files.validation_head()
        if vh is not None:
            _with_head(model, vh, files.where)
            used = VALIDATION_FIT
    elif head not in (SAVED, VALIDATION_FIT):
        raise ExportError(f"Unknown head {head!r}; use {SAVED} or {VALIDATION_FIT}.")
    rt = Runtime.create(device)
    bank = files.open_set_bank()  # validated now, like the rest (None: a run from before open-set scores)
    open_set = OpenSet(bank, files.open_set_record(), files.open_set_style_bank()) if bank is not None else None
    return TrainedModel(model=model.to(rt.device), files=files, source=str(Path(ref)), head=used, runtime=rt,
                        open_set=open_set)


load_bundle = load_model

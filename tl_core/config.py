"""The training configuration and the choice tables that the pages and the CLI read.

One frozen :class:`TrainConfig` travels from a page (or the command line) to the engine and is
saved with every run and every export, so that a run can always be explained and repeated.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "Choice",
    "STRATEGIES",
    "DEFAULT_TIME_BUDGET_S",
    "AUGMENT_PRESETS",
    "CLASS_BALANCE",
    "DEVICES",
    "check_device_name",
    "EXPORT_FORMATS",
    "LAB_ARMS",
    "FieldSpec",
    "TrainConfig",
    "field_help",
    "field_spec",
    "config_fields",
    "fields_for_strategy",
    "strategy_default",
]


@dataclass(frozen=True)
class Choice:
    """One option of a choice table: its key, a short label, and a one-line explanation."""

    key: str
    label: str
    help: str
    defaults: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Choice] = {
    c.key: c
    for c in [
        Choice(
            "linear",
            "Linear probe (frozen backbone)",
            "Keep every pretrained layer fixed, compute each image's features once, and fit only a new "
            "final layer on them (logistic regression). Fastest, hard to overfit; the right first try.",
            {"epochs": 100, "lr": 1.0, "patience": 0},
        ),
        Choice(
            "partial",
            "Partial fine-tuning (last blocks)",
            "Unfreeze the last few blocks of the backbone and train them with the new head. Adapts the "
            "high-level features to your images at moderate cost.",
            {"epochs": 8, "lr": 1e-3, "patience": 4},
        ),
        Choice(
            "full",
            "Full fine-tuning",
            "Train every layer; the pretrained backbone gets a smaller learning rate than the new head so "
            "that it adapts without forgetting. Most accurate with enough data; slowest.",
            {"epochs": 8, "lr": 1e-3, "patience": 4},
        ),
        Choice(
            "auto",
            "Automatic (try and compare)",
            "Fit the linear probe (features chosen by cross-validation); where the time budget allows and the "
            "data can show a difference, also the other offline backbones' probes (scored by the same "
            "cross-validation) and a short partial fine-tune on the same split; keep the best, fine-tuning only "
            "if it beats the probe by more than the noise, and say what was tried, skipped and why.",
            {"epochs": 8, "lr": 1e-3, "patience": 4},
        ),
        Choice(
            "scratch",
            "From scratch (no pretraining)",
            "Same architecture with random weights, for comparison: shows what pretraining buys you. "
            "Expect much lower accuracy on small datasets.",
            {"epochs": 8, "lr": 3e-3, "patience": 4},
        ),
    ]
}

AUGMENT_PRESETS: dict[str, Choice] = {
    c.key: c
    for c in [
        Choice("none", "None", "Show every training image as it is (only resized and centre-cropped)."),
        Choice(
            "light",
            "Light",
            "Random crops of 60-100% of the image and horizontal flips: cheap variety that rarely hurts.",
        ),
        Choice(
            "strong",
            "Strong",
            "Light plus stronger crops, small rotations and colour jitter: helps tiny datasets generalise, "
            "but can hurt when colour or orientation is the label.",
        ),
    ]
}

CLASS_BALANCE: dict[str, Choice] = {
    c.key: c
    for c in [
        Choice("none", "None", "Train on the images as they come."),
        Choice(
            "weights",
            "Loss weights",
            "Weight each class's loss by the inverse of its frequency so that rare classes count as much "
            "as common ones.",
        ),
        Choice(
            "sampler",
            "Balanced sampling",
            "Draw training images so that every class is seen equally often in each epoch (the linear probe sees "
            "every image at once, so for it this is the same as loss weights).",
        ),
    ]
}


FEATURE_VARIANTS: dict[str, Choice] = {
    c.key: c
    for c in [
        Choice("auto", "Automatic", "Compare the last layer and several depths by cross-validation on the labelled "
               "images (on cached features, once per dataset version) and use the better one."),
        Choice("last", "Last layer", "The backbone's pooled last-layer features: the classic recipe."),
        Choice("depths", "Several depths", "The last layer plus each stage's pooled output, each stage scaled to "
               "weigh like the last layer: helps on images unlike photos (digits, sketches, textures)."),
        Choice("flip", "Flipped views averaged", "Last-layer features of the image and its mirror image, averaged: "
               "two forward passes per image; can hurt where left and right differ."),
    ]
}


DEVICES: dict[str, Choice] = {
    c.key: c
    for c in [
        Choice("auto", "Automatic", "A CUDA GPU when there is one, else Apple's GPU (MPS), else the CPU."),
        Choice("cpu", "CPU", "The processor: always there; slow for fine-tuning large backbones."),
        Choice("cuda", "CUDA GPU", "An NVIDIA GPU, in mixed precision (bf16 where supported, else fp16)."),
        Choice("mps", "Apple GPU (MPS)", "The GPU of an Apple-silicon Mac, through Metal."),
    ]
}
#: ``cuda:N`` picks one GPU of several.
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """``name`` if it is a device TL Studio understands (a key of :data:`DEVICES` or ``cuda:N``). Raises ConfigError
    otherwise."""
    if not _DEVICE.match(str(name or "")):
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.")
    return name


#: The export formats and what each is for (the Runs page shows these before anything is exported; the
#: exporter, ``tl_core.share.export``, imports torch, which the app's server never does).
EXPORT_FORMATS: dict[str, str] = {
    "bundle": "Zip with safetensors weights, config, classes, preprocessing, metrics and a model card; "
              "loads with `tl-core predict BUNDLE images...` anywhere TL Studio is installed.",
    "onnx": "ONNX model (opset 18, dynamic batch) for onnxruntime and other runtimes, with a JSON sidecar "
            "of classes and preprocessing; verified against PyTorch after export.",
    "webpage": "A web page (folder and zip: index.html, the verified ONNX model, ONNX Runtime Web) that classifies "
               "the webcam and dropped images offline in any browser, with a small JavaScript API "
               "(docs/webpage.md).",
    "tflite": "TFLite (LiteRT) for phones and edge devices: a float32 and a full-integer int8 file (int8 calibrated "
              "on the training images), run with the LiteRT interpreter on held-out images and compared with the "
              "run; needs the optional extra (pip install -e '.[edge]').",
    "torchscript": "TorchScript (torch.jit.trace) for C++/Python PyTorch without TL Studio or timm, with the "
                   "same JSON sidecar; verified against PyTorch after export. TorchScript is deprecated upstream: "
                   "prefer ONNX for new deployments.",
}

#: The lab's arms (``tl_core.insight.lab``): key -> plain-language description, for the Lab page.
LAB_ARMS: dict[str, str] = {
    "linear": "Pretrained backbone, frozen; only a new last layer is fitted (logistic regression).",
    "finetune": "Pretrained backbone; its last stages and the new last layer are trained for a few epochs.",
    "scratch": "The same network from random weights, every layer trained for the same epochs.",
}


ALL = ("linear", "partial", "full", "auto", "scratch")
PROBED = ("linear", "auto")  # strategies whose model may be the linear probe (auto keeps it unless fine-tuning wins)
TUNED = ("partial", "full", "scratch")  # strategies that run the training loop


@dataclass(frozen=True)
class FieldSpec:
    """How one :class:`TrainConfig` field appears on every surface: its label, help, which strategies use it,
    its widget on the Train form (``section`` None: not on the form) and its bounds. The command line's
    ``tl-core train`` flags and the Train form are generated from these (``config_flags``, ``form_fields``)."""

    name: str
    label: str
    help: str
    strategies: tuple[str, ...] = ALL
    section: str | None = None  # "main" | "advanced" | None
    widget: str = "number"  # number | select_slider | select | radio | toggle | slider
    choices: dict[str, Choice] | None = None
    strict: bool = True  # only the choices are valid (False: they are the common values, e.g. cuda:1 for device)
    options: tuple[Any, ...] = ()  # the values of a select_slider
    min: float | None = None
    max: float | None = None
    step: float | None = None
    per_strategy: bool = False  # its default depends on the strategy (STRATEGIES[...].defaults)


def _f(default: Any, label: str, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"help": help, "label": label, "spec": spec})


LEARNING_RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
BATCH_SIZES = (8, 16, 32, 64, 128)
#: auto's default time budget: two minutes, what a newcomer waits for a first model on a CPU. The linear probe
#: always runs; on a 2-core CPU a short fine-tune of 300 images is estimated at several minutes, so it is skipped
#: and a default run costs about what ``linear`` costs (benchmarks/RESULTS.md, "auto as the default").
DEFAULT_TIME_BUDGET_S = 120.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved as ``config.json`` with the run; the ``tl-core train``
    flags and the Train form are generated from these fields (see :class:`FieldSpec`)."""

    backbone: str = _f("efficientnet_lite0", "Backbone", "Catalogue name or timm model name of the pretrained "
                       "backbone (`tl-core backbones` lists the catalogue).")
    strategy: str = _f("auto", "Strategy", "How much of the backbone is trained: auto (the default: try the linear "
                       "probe, then what the time budget affords, keep the best), linear, partial, full or scratch.",
                       choices=STRATEGIES)
    time_budget: float = _f(
        DEFAULT_TIME_BUDGET_S, "Time budget (seconds)", "auto only: seconds auto may spend in all. The linear probe "
        "always runs; each further try (the other offline backbones' probes, a short partial fine-tune) runs only "
        "if its estimated time fits what is left, and the summary says which were skipped and why.",
        strategies=("auto",), section="main", min=10.0, max=86400.0, step=10.0)
    weights: str = _f(
        "auto", "Weights",
        "Where the pretrained weights come from: auto (packaged, else timm's hub), packaged, hub, "
        "random, or a path to a local .safetensors/.pth file.", strategies=("linear", "partial", "full", "auto"))
    epochs: int | None = _f(None, "Epochs", "Fine-tuning passes over the training images; empty means the strategy's "
                            "default. The linear probe has no epochs: its solver runs until it converges.",
                            strategies=TUNED, section="main", min=1, max=1000, step=1, per_strategy=True)
    lr: float | None = _f(None, "Learning rate", "Peak learning rate of the new head; empty means the strategy's "
                          "default.", strategies=TUNED, section="main", widget="select_slider",
                          options=LEARNING_RATES, per_strategy=True)
    batch_size: int = _f(
        16, "Batch size", "Images per optimisation step. Smaller uses less memory (EfficientNet-Lite0 training: "
        "about 1.4 GB at 16, 2.8 GB at 32); on a CPU the speed per image is about the same.",
        strategies=TUNED, section="main", widget="select_slider", options=BATCH_SIZES)
    seed: int = _f(0, "Seed", "Random seed: the same seed, data and settings give the same result.",
                   section="main", min=0, max=2**31 - 1, step=1)
    augment: str = _f("light", "Augmentation", "Augmentation preset for training images: none, light or strong.",
                      strategies=TUNED, section="augment", widget="radio", choices=AUGMENT_PRESETS)
    val_split: float = _f(0.2, "Validation share", "Fraction of each class held out for validation (stratified).",
                          section="advanced", widget="slider", min=0.05, max=0.5, step=0.05)
    test_split: float = _f(0.0, "Locked test share", "Fraction of each class set aside as a locked test set "
                           "(stratified, duplicates kept together, seeded) that no choice ever sees: reported beside "
                           "validation as the unbiased figure. 0 = none (a dataset's own test folder or an uploaded "
                           "test set is used instead).", section="advanced", widget="slider", min=0.0, max=0.5,
                           step=0.05)
    class_balance: str = _f("none", "Class balance", "Counter class imbalance: none, weights (loss weights) or "
                            "sampler.", section="advanced", widget="select", choices=CLASS_BALANCE)
    patience: int | None = _f(
        None, "Early-stopping patience", "Stop when validation accuracy (then loss) has not improved for this many "
        "epochs (0 = never; empty = strategy default).", strategies=TUNED, section="advanced", min=0, max=100,
        step=1, per_strategy=True)
    linear_c: float = _f(
        1.0, "Linear probe C", "Linear probe only: inverse L2 strength (scikit-learn's C); larger fits the training "
        "images more closely.", strategies=PROBED, section="advanced", min=0.001, max=1000.0)
    features: str = _f(
        "auto", "Features", "Linear probe only: which frozen features the head sees: auto (cross-validated choice "
        "between the last layer and several depths), last, depths or flip.", strategies=PROBED,
        section="advanced", widget="select", choices=FEATURE_VARIANTS)
    refit: bool = _f(
        True, "Refit on all labelled images", "Linear probe only: once validated, fit the saved head again on "
        "training + validation images (as the classic recipe trains on all labelled images); validation figures "
        "stay those of the training-only fit.", strategies=PROBED, section="advanced", widget="toggle")
    weight_decay: float = _f(0.01, "Weight decay", "AdamW weight decay (L2-style regularisation).", strategies=TUNED,
                             section="advanced", min=0.0, max=1.0, step=0.005)
    label_smoothing: float = _f(0.1, "Label smoothing", "Spread this much probability over the other classes in "
                                "the loss.", strategies=TUNED, section="advanced", min=0.0, max=0.5, step=0.05)
    warmup_epochs: float = _f(1.0, "Warm-up epochs", "Epochs of linear learning-rate warm-up before the cosine "
                              "decay.", strategies=TUNED, section="advanced", min=0.0, max=20.0, step=0.5)
    backbone_lr_mult: float = _f(0.1, "Backbone LR multiplier", "For full/partial: backbone learning rate as a "
                                 "fraction of the head's.", strategies=("partial", "full"), section="advanced",
                                 min=0.001, max=10.0)
    unfreeze_blocks: int = _f(2, "Blocks to unfreeze", "For partial: how many of the last backbone stages are "
                              "trained.", strategies=("partial",), section="advanced", min=1, max=12, step=1)
    max_per_class: int | None = _f(None, "Max images per class", "Use at most this many training images per class "
                                   "(learning curves).")
    device: str = _f("auto", "Device", "Where training runs: auto (a CUDA GPU, then Apple's MPS, then the CPU), cpu, "
                     "cuda, cuda:N or mps. On a GPU it trains in mixed precision (bf16 where supported, else fp16).",
                     section="advanced", widget="select", choices=DEVICES, strict=False)

    # -- derived / validation -------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """Return a copy with the strategy's defaults filled in and every field checked.

        Raises:
            ConfigError: a value is unknown or out of range.
        """
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"Unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}."
            )
        if self.augment not in AUGMENT_PRESETS:
            raise ConfigError(f"Unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}.")
        if self.class_balance not in CLASS_BALANCE:
            raise ConfigError(
                f"Unknown class balance {self.class_balance!r}; choose one of {', '.join(CLASS_BALANCE)}."
            )
        if self.features not in FEATURE_VARIANTS:
            raise ConfigError(f"Unknown features {self.features!r}; choose one of {', '.join(FEATURE_VARIANTS)}.")
        d = STRATEGIES[self.strategy].defaults
        cfg = dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else d["epochs"],
            lr=self.lr if self.lr is not None else d["lr"],
            patience=self.patience if self.patience is not None else d["patience"],
        )
        check_device_name(cfg.device)
        checks = [
            (1 <= cfg.epochs <= 1000, f"epochs must be between 1 and 1000 (got {cfg.epochs})."),
            (0 < cfg.lr <= 1.0, f"learning rate must be above 0 and at most 1 (got {cfg.lr})."),
            (1 <= cfg.batch_size <= 1024, f"batch size must be between 1 and 1024 (got {cfg.batch_size})."),
            (0.0 < cfg.val_split < 0.9, f"validation split must be above 0 and below 0.9 (got {cfg.val_split})."),
            (0.0 <= cfg.test_split < 0.9 and cfg.val_split + cfg.test_split < 0.9,
             f"test split must be 0 or more, and validation + test below 0.9 (got {cfg.test_split})."),
            (0 <= cfg.weight_decay <= 1, f"weight decay must be between 0 and 1 (got {cfg.weight_decay})."),
            (0 <= cfg.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {cfg.label_smoothing})."),
            (cfg.warmup_epochs >= 0, f"warm-up epochs must be 0 or more (got {cfg.warmup_epochs})."),
            (cfg.patience >= 0, f"patience must be 0 or more (got {cfg.patience})."),
            (0 < cfg.backbone_lr_mult <= 10, f"backbone LR multiplier must be in (0, 10] (got {cfg.backbone_lr_mult})."),
            (cfg.unfreeze_blocks >= 1, f"unfreeze blocks must be at least 1 (got {cfg.unfreeze_blocks})."),
            (cfg.linear_c > 0, f"linear C must be above 0 (got {cfg.linear_c})."),
            (cfg.time_budget > 0, f"time budget must be above 0 seconds (got {cfg.time_budget})."),
            (cfg.max_per_class is None or cfg.max_per_class >= 1, "max images per class must be at least 1."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg[0].upper() + msg[1:])
        return cfg

    @property
    def runs_forward_passes(self) -> bool:
        """Whether the training is mostly forward passes, batch after batch: a linear probe's feature extraction (and
        auto's, whose tries are probes unless its budget affords a fine-tune). Its process keeps freed activations in
        the heap (tl_core.models.devices.reuse_heap_memory); a fine-tune keeps glibc's defaults."""
        return self.strategy in ("linear", "auto")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build a config from saved data, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            import logging

            logging.getLogger(__name__).warning("ignoring unknown config keys: %s", sorted(unknown))
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_saved(cls, saved: dict[str, Any], overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """The one reader of a saved config (a run's ``config.json``, the run store's copy, ``tl-core train
        --config``): what :func:`saved_config_dict` says a saved config means, with ``overrides`` (flags given on
        the command line) on top. Not resolved: call :meth:`resolved` to fill the strategy's defaults.
        """
        return cls.from_dict({**saved_config_dict(saved), **(overrides or {})})


def saved_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A config as saved by a run (``config.json``, the run store): one saved before the linear probe chose its
    features (no ``features`` key) used the last layer, and repeating it must too."""
    return {**data, "features": "last"} if isinstance(data, dict) and data and "features" not in data else data


def config_fields() -> list[FieldSpec]:
    """Every :class:`TrainConfig` field with how it appears on the command line and the Train form."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        md = f.metadata
        out.append(FieldSpec(name=f.name, label=md["label"], help=md["help"], **md["spec"]))
    return out


def field_spec(name: str) -> FieldSpec:
    """The :class:`FieldSpec` of one field. Raises KeyError for an unknown name."""
    for spec in config_fields():
        if spec.name == name:
            return spec
    raise KeyError(name)


def field_help(name: str) -> str:
    """The help string of a :class:`TrainConfig` field (pages use it for ``help=``)."""
    return field_spec(name).help


def fields_for_strategy(strategy: str) -> list[str]:
    """The names of the fields a strategy uses (what a report or a comparison should show for its runs)."""
    return [f.name for f in config_fields() if strategy in f.strategies]


def strategy_default(name: str, strategy: str) -> Any:
    """A field's default under ``strategy``: the strategy's own default where it has one."""
    defaults = STRATEGIES[strategy].defaults if strategy in STRATEGIES else {}
    if name in defaults:
        return defaults[name]
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)

"""The training configuration and the choice tables that the pages and the CLI read.

One frozen :class:`TrainConfig` travels from a page (or the command line) to the engine and is
saved with every run and every export, so that a run can always be explained and repeated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "Choice",
    "STRATEGIES",
    "AUGMENT_PRESETS",
    "CLASS_BALANCE",
    "TrainConfig",
    "field_help",
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
            "Draw training images so that every class is seen equally often in each epoch.",
        ),
    ]
}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved as ``config.json`` with the run."""

    backbone: str = _f("efficientnet_lite0", "Catalogue name or timm model name of the pretrained backbone.")
    strategy: str = _f("linear", "How much of the backbone is trained: linear, partial, full or scratch.")
    weights: str = _f(
        "auto",
        "Where the pretrained weights come from: auto (packaged, else timm's hub), packaged, hub, "
        "random, or a path to a local .safetensors/.pth file.",
    )
    epochs: int | None = _f(None, "Passes over the training images; empty means the strategy's default.")
    lr: float | None = _f(None, "Peak learning rate of the new head; empty means the strategy's default.")
    batch_size: int = _f(
        16, "Images per optimisation step. Smaller uses less memory (EfficientNet-Lite0 training: about 1.4 GB at 16, "
        "2.8 GB at 32); on a CPU the speed per image is about the same."
    )
    val_split: float = _f(0.2, "Fraction of each class held out for validation (stratified).")
    seed: int = _f(0, "Random seed: the same seed, data and settings give the same result.")
    augment: str = _f("light", "Augmentation preset for training images: none, light or strong.")
    weight_decay: float = _f(0.01, "AdamW weight decay (L2-style regularisation).")
    label_smoothing: float = _f(0.1, "Spread this much probability over the other classes in the loss.")
    warmup_epochs: float = _f(1.0, "Epochs of linear learning-rate warm-up before the cosine decay.")
    patience: int | None = _f(
        None, "Stop when validation accuracy (then loss) has not improved for this many epochs "
        "(0 = never; empty = strategy default)."
    )
    backbone_lr_mult: float = _f(0.1, "For full/partial: backbone learning rate as a fraction of the head's.")
    unfreeze_blocks: int = _f(2, "For partial: how many of the last backbone stages are trained.")
    class_balance: str = _f("none", "Counter class imbalance: none, weights (loss weights) or sampler.")
    linear_c: float = _f(
        1.0, "Linear probe only: inverse L2 strength (scikit-learn's C); larger fits the training images more closely."
    )
    max_per_class: int | None = _f(None, "Use at most this many training images per class (learning curves).")
    refit: bool = _f(
        True, "Linear probe only: once validated, fit the saved head again on training + validation images (as "
        "the classic recipe trains on all labelled images); validation figures stay those of the training-only fit."
    )

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
        d = STRATEGIES[self.strategy].defaults
        cfg = dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else d["epochs"],
            lr=self.lr if self.lr is not None else d["lr"],
            patience=self.patience if self.patience is not None else d["patience"],
        )
        checks = [
            (1 <= cfg.epochs <= 1000, f"epochs must be between 1 and 1000 (got {cfg.epochs})."),
            (0 < cfg.lr <= 1.0, f"learning rate must be above 0 and at most 1 (got {cfg.lr})."),
            (1 <= cfg.batch_size <= 1024, f"batch size must be between 1 and 1024 (got {cfg.batch_size})."),
            (0.0 < cfg.val_split < 0.9, f"validation split must be above 0 and below 0.9 (got {cfg.val_split})."),
            (0 <= cfg.weight_decay <= 1, f"weight decay must be between 0 and 1 (got {cfg.weight_decay})."),
            (0 <= cfg.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {cfg.label_smoothing})."),
            (cfg.warmup_epochs >= 0, f"warm-up epochs must be 0 or more (got {cfg.warmup_epochs})."),
            (cfg.patience >= 0, f"patience must be 0 or more (got {cfg.patience})."),
            (0 < cfg.backbone_lr_mult <= 10, f"backbone LR multiplier must be in (0, 10] (got {cfg.backbone_lr_mult})."),
            (cfg.unfreeze_blocks >= 1, f"unfreeze blocks must be at least 1 (got {cfg.unfreeze_blocks})."),
            (cfg.linear_c > 0, f"linear C must be above 0 (got {cfg.linear_c})."),
            (cfg.max_per_class is None or cfg.max_per_class >= 1, "max images per class must be at least 1."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg[0].upper() + msg[1:])
        return cfg

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


def field_help(name: str) -> str:
    """The help string of a :class:`TrainConfig` field (pages use it for ``help=``)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)

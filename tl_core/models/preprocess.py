"""Preprocessing from the model's data config, and the training augmentation presets.

Split from ``data.py``: the decoded-image cache stores each image already resized the way timm's
eval transform resizes it (shorter side = floor(input / crop_pct), same interpolation), so evaluation
is a centre crop plus normalisation on cached uint8 pixels, and equals ``timm.data.create_transform``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .data import resize_shorter

__all__ = ["Preprocess", "train_transform"]


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of one model, derived from ``timm.data.resolve_model_data_config``."""

    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, cfg: dict[str, Any]) -> "Preprocess":
        size = cfg["input_size"][-1]
        crop_pct = cfg.get("crop_pct") or 0.875
        return cls(
            input_size=int(size),
            resize=int(math.floor(size / crop_pct)),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def center_crop(self, arr: np.ndarray) -> np.ndarray:
        """Centre crop a resized HWC uint8 array to the input size (torchvision's rounding)."""
        h, w = arr.shape[:2]
        s = self.input_size
        top = int(round((h - s) / 2.0))
        left = int(round((w - s) / 2.0))
        return arr[top:top + s, left:left + s]

    def eval_from_resized(self, arr: np.ndarray) -> torch.Tensor:
        """Normalised CHW float tensor from an HWC uint8 array already resized to ``self.resize``."""
        x = torch.from_numpy(np.ascontiguousarray(self.center_crop(arr))).permute(2, 0, 1).float().div_(255.0)
        return self._normalize(x)

    def resized_array(self, img: Image.Image) -> np.ndarray:
        """HWC uint8 array of an RGB image resized like timm's eval transform (before the crop)."""
        return np.array(resize_shorter(img, self.resize, self.interpolation), dtype=np.uint8)  # writable for torch

    def eval_from_pil(self, img: Image.Image) -> torch.Tensor:
        """The full eval transform of one RGB image."""
        return self.eval_from_resized(self.resized_array(img))


def train_transform(pre: Preprocess, preset: str) -> Callable[[np.ndarray], torch.Tensor]:
    """Augmenting transform for a resized HWC uint8 array → normalised CHW float tensor.

    Args:
        pre: the model's preprocessing.
        preset: none | light | strong (see ``config.AUGMENT_PRESETS``).
    """
    from torchvision.transforms import v2

    if preset == "none":
        return pre.eval_from_resized
    size = pre.input_size
    if preset == "light":
        ops = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
        ]
    pipeline = v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))])

    def apply(arr: np.ndarray) -> torch.Tensor:
        return pipeline(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))

    return apply

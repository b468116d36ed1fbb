"""What a warm re-train spends before its fit (issue 24, "Speed as a new user meets it"): no probe pass through
the network once the feature widths are recorded. In process, no network weights: the fast tier."""

from __future__ import annotations

import json

import torch
from torch import nn

from tl_core.cache import FeatureCache
from tl_core.models.feature_variants import recorded_extractor as _extractor_of


class _TinyBackbone(nn.Module):
    """A two-stage backbone with the timm interface VariantModel uses; counts its forward passes."""

    num_features = 8
    pretrained_cfg = {"input_size": (3, 16, 16)}
    feature_info = None  # nothing to trust: only a probe pass (or a record) gives the widths

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.passes = 0

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.passes += 1
        h1 = self.a(x)
        h2 = self.b(h1)
        return h2, [h1, h2]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))


def test_the_depths_widths_are_probed_once_then_read_back(tmp_path):
    fcache = FeatureCache(tmp_path / "features", "key")
    model = _TinyBackbone()
    first = _extractor_of(model, "depths", fcache)
    assert model.passes == 1 and first.block_dims == [4, 8]
    assert json.loads((fcache.dir / "block_dims.json").read_text()) == [4, 8]
    again = _extractor_of(model, "depths", fcache)
    assert model.passes == 1, "a recorded width must spare the probe pass"
    assert again.block_dims == [4, 8]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(first.forward_features(x), again.forward_features(x))


def test_an_unusable_record_is_probed_again(tmp_path):
    fcache = FeatureCache(tmp_path / "features", "key")
    fcache.dir.mkdir(parents=True)
    (fcache.dir / "block_dims.json").write_text("{not json")
    model = _TinyBackbone()
    assert _extractor_of(model, "depths", fcache).block_dims == [4, 8]
    assert model.passes == 1
    assert json.loads((fcache.dir / "block_dims.json").read_text()) == [4, 8]


def test_the_last_layer_needs_no_record(tmp_path):
    fcache = FeatureCache(tmp_path / "features", "key")
    model = _TinyBackbone()
    assert _extractor_of(model, "last", fcache) is model
    assert model.passes == 0 and not (fcache.dir / "block_dims.json").exists()

"""Batch norms folded into the convolutions for the PyTorch engine (tl_core.models.folding): the folded copy of
the packaged Lite0 gives the original's features on real images within 1e-4, the network itself is untouched
(fine-tuning goes on from it), and a pairing the module order gets wrong is caught by the check, never used."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from conftest import EMOJI
from tl_core.cache import DecodedImageCache
from tl_core.data.intake import open_dataset
from tl_core.models import engines
from tl_core.models.backbones import build_model
from tl_core.models.feature_variants import extractor
from tl_core.models.features import extract_features
from tl_core.models.folding import FOLD_MIN_IMAGES, folded, folded_copy
from tl_core.models.preprocess import Preprocess, data_config_for


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def lite0():
    model, _ = build_model("efficientnet_lite0", 5)
    return model.eval(), Preprocess.from_data_config(data_config_for(model))


@pytest.mark.parametrize("variant", ["last", "depths"])
def test_folded_lite0_gives_the_originals_features_and_leaves_it_untouched(lite0, variant, tmp_path, monkeypatch):
    model, pre = lite0
    run = extractor(model, variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = folded_copy(run, engines._pooled)
    assert folded is not None and _norms(folded) == 0 and _norms(model) >= 40
    # the engine runs the copy; with TL_FOLD_BN=off, the network itself: the same features on real images
    items = open_dataset(EMOJI).items[::20][:6]
    monkeypatch.setenv("TL_ENGINE", "torch")
    feats = {}
    for fold in ("on", "off"):
        monkeypatch.setenv("TL_FOLD_BN", fold)
        feats[fold] = extract_features(run, items, pre, DecodedImageCache(tmp_path / fold), batch_size=3)
    diff = float(np.abs(feats["on"] - feats["off"]).max())
    assert diff <= 1e-4, diff
    assert float(np.abs(feats["off"] - feats["off"].mean(0)).max()) > 1.0  # not a constant output
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.is_inference() for p in model.parameters())  # the network can still be fine-tuned


def test_engine_runs_the_folded_copy_for_a_large_job_or_when_on(lite0, monkeypatch):
    model, pre = lite0
    x = torch.randint(0, 256, (2, pre.input_size, pre.input_size, 3), dtype=torch.uint8)
    monkeypatch.setenv("TL_ENGINE", "torch")
    ran = {}
    for fold, n_images in (("on", 1), ("off", 1000), ("auto", FOLD_MIN_IMAGES - 1), ("auto", FOLD_MIN_IMAGES)):
        monkeypatch.setenv("TL_FOLD_BN", fold)
        eng = engines.feature_engine(model, pre, n_images=n_images)
        eng(x)
        ran[fold, n_images] = eng._run
    folded_runs = [ran["on", 1], ran["auto", FOLD_MIN_IMAGES]]
    assert all(r is not model and _norms(r) == 0 for r in folded_runs)
    assert folded_runs[0] is folded_runs[1]  # made once for the unchanged model
    # a one-image job would pay more for the copy than it saves: the network itself
    assert ran["off", 1000] is model and ran["auto", FOLD_MIN_IMAGES - 1] is model


class _NormFirst(nn.Module):
    """A conv registered before a batch norm that is applied before it: module order suggests a pair that is not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def _random_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def test_a_pairing_module_order_gets_wrong_is_caught_by_the_check(caplog):
    model = _random_stats(_NormFirst())
    with caplog.at_level(logging.WARNING, logger="tl_core.models.folding"):
        assert folded_copy(model, check=torch.randn(2, 4, 16, 16)) is None
    assert "differs" in caplog.text


def test_a_true_pair_folds_exactly_and_nothing_to_fold_gives_none():
    model = _random_stats(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)))
    folded = folded_copy(model)
    assert folded is not None and _norms(folded) == 0 and _norms(model) == 2
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert folded_copy(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) is None


def test_the_copy_is_made_once_while_the_weights_stay_and_again_after_a_change():
    model = _random_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    first = folded(model)
    assert first is not None and folded(model) is first
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an optimiser step changes weights in place
    second = folded(model)
    assert second is not None and second is not first
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(second(x), model(x), atol=1e-5)

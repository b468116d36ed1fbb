"""What torch's ONNX exporters are given: the network with its activations out of place, and after the export
(finished or failed) the network as it was (tl_core.models.tracing; the exports' agreement with PyTorch is
test_engines.py's and test_export.py's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tl_core.models import engines
from tl_core.models.backbones import build_model
from tl_core.models.preprocess import Preprocess, data_config_for
from tl_core.models.tracing import activations_out_of_place
from tl_core.share import export


def _in_place(model: nn.Module) -> list[bool]:
    return [m.inplace for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]


@pytest.fixture(scope="module")
def lite0():
    model, _ = build_model("efficientnet_lite0", 3)
    return model.eval()


def test_activations_are_out_of_place_inside_and_as_they_were_after(lite0):
    before = _in_place(lite0)
    assert before.count(True) == 33  # Lite0's ReLU6s, each in place
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = lite0(x)
        with activations_out_of_place(lite0) as m:
            assert m is lite0 and not any(_in_place(lite0))
            assert torch.equal(lite0(x), want)  # only memory changes, never a value
    assert _in_place(lite0) == before
    with pytest.raises(RuntimeError), activations_out_of_place(lite0):
        raise RuntimeError("an export that fails")
    assert _in_place(lite0) == before


@pytest.fixture
def handed_to_torch(monkeypatch) -> list[list[bool]]:
    """``torch.onnx.export`` records the in-place flags of the network it is given, then fails."""
    seen = []

    def recording_export(module, *args, **kwargs):
        seen.append(_in_place(module))
        raise RuntimeError("stopped before exporting")

    monkeypatch.setattr(torch.onnx, "export", recording_export)
    return seen


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_a_models_export_hands_torch_no_in_place_activation(lite0, exporter, handed_to_torch, tmp_path):
    before = _in_place(lite0)
    with pytest.raises(RuntimeError, match="stopped"):
        export._export_onnx_file(lite0, torch.rand(1, 3, 224, 224), tmp_path / "m.onnx", exporter)
    assert len(handed_to_torch) == 1 and handed_to_torch[0] and not any(handed_to_torch[0]), handed_to_torch
    assert _in_place(lite0) == before


def test_the_feature_engines_export_hands_torch_no_in_place_activation(lite0, handed_to_torch, tmp_path):
    before = _in_place(lite0)
    with pytest.raises(RuntimeError, match="stopped"):
        engines._export(lite0, tmp_path / "f.onnx", Preprocess.from_data_config(data_config_for(lite0)))
    assert len(handed_to_torch) == 1 and handed_to_torch[0] and not any(handed_to_torch[0]), handed_to_torch
    assert _in_place(lite0) == before

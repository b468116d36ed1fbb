"""TFLite export (tl_core/share/tflite.py) and the one export dispatcher (tl_core/share/formats.py).

Fast tier: the dispatcher's names and errors, the missing-extra sentence, an unknown ONNX op named. The export
itself (ONNX -> TensorFlow -> TFLite, float32 and int8, run with the LiteRT interpreter) is slow: it needs the
``.[edge]`` extra and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tl_core.errors import ExportError
from tl_core.share.formats import FORMAT_EXTENSIONS, export_model, export_name

HAS_EDGE = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "ai_edge_litert"))


def test_every_format_has_one_exporter_and_a_name():
    from tl_core.config import EXPORT_FORMATS

    assert set(FORMAT_EXTENSIONS) == set(EXPORT_FORMATS)
    assert export_name("r1", "tflite") == "tl-studio-r1.tflite"
    assert export_name("r1", "webpage") == "page"
    with pytest.raises(ExportError, match="Unknown export format 'coreml'.*tflite"):
        export_model("nowhere", "coreml", "out")


def test_missing_extra_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(ExportError) as e:
        export_model(tmp_path / "no-run", "tflite", tmp_path / "m.tflite")
    assert "pip install -e '.[edge]'" in str(e.value) and "tensorflow" in str(e.value)
    assert not (tmp_path / "m.tflite").exists()


def test_unknown_onnx_op_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from tl_core.share.tflite import onnx_to_tf

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Erf", ["input"], ["probs"])], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ExportError, match="Erf.*--format onnx"):
        onnx_to_tf(path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EDGE, reason="needs the edge extra: pip install -e '.[edge]'")
def test_tflite_agrees_with_predict_and_int8_is_small(emoji_run_dir, tmp_path):
    """The float32 file, run here with the LiteRT interpreter on the run's held-out images, gives the same top-1
    as ``predict`` on >= 99% of them; the int8 file is a real full-integer model (under a third of the size)
    whose accuracy change is reported."""
    from tl_core.data.images import load_image
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths
    from tl_core.share.tflite import litert_runner

    res = export_model(emoji_run_dir, "tflite", tmp_path)
    path, int8 = Path(res["path"]), Path(res["int8"]["path"])
    assert [Path(p).name for p in res["written"]] == [path.name, int8.name, path.name + ".json"]
    sidecar = json.loads(Path(res["sidecar"]).read_text())
    assert sidecar["input"]["shape"][1:] == [224, 224, 3] and sidecar["classes"]
    v = res["verification"]
    assert v["passed"] and v["image_source"].startswith("run validation")

    tm = load_model(emoji_run_dir)
    held_out = tm.files.predictions().get("val").paths[:20]
    rows, skipped = predict_paths(tm, held_out)
    assert not skipped
    x = np.stack([tm.pre.eval_from_pil(load_image(p)).numpy() for p in held_out])
    got = litert_runner(path.read_bytes())(x)
    labels = [tm.classes[k] for k in got.argmax(1)]
    agree = sum(a == r["label"] for a, r in zip(labels, rows))
    assert agree >= 0.99 * len(rows), (agree, len(rows))

    q = res["int8"]
    assert int8.stat().st_size < path.stat().st_size / 3
    assert q["agreement"] >= 0.9 and isinstance(q["accuracy_change_points"], float)
    assert q["calibration"]["source"] == "training images"
    got_q = litert_runner(int8.read_bytes())(x)
    assert 0 < np.abs(got_q - got).max() < 0.5  # quantised (not the float model again), still close


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EDGE, reason="needs the edge extra: pip install -e '.[edge]'")
def test_multi_depth_features_convert_exactly(tmp_path):
    """A head on pooled features of two depths joined by a concat (as the multi-depth feature variants are), with
    a stride-2 padded conv and a depthwise conv: the TensorFlow function gives PyTorch's outputs."""
    import torch
    from torch import nn

    from tl_core.share.export import _export_onnx_file
    from tl_core.share.tflite import onnx_to_tf

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.clamp(self.a(x), 0, 6)
            g = torch.clamp(self.b(h), 0, 6)
            f = torch.cat([g.mean((2, 3)), h.mean((2, 3)) * 0.5], 1)
            z = self.fc(f)
            return torch.softmax(z, 1), z

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 3, 16, 16)
    path = tmp_path / "m.onnx"
    _export_onnx_file(net, x[:2], path, "dynamo")
    got = onnx_to_tf(path)(np.transpose(x.numpy(), (0, 2, 3, 1)))
    with torch.no_grad():
        probs, logits = net(x)
    np.testing.assert_allclose(got["logits"].numpy(), logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["probs"].numpy(), probs.numpy(), atol=1e-6)

"""The frozen backbone's engine (tl_core.models.engines): ONNX Runtime gives PyTorch's features within 1e-4 on
real sample images; its file is exported once, reused, and rebuilt when damaged; PyTorch takes over, with the
same result, whenever ONNX Runtime cannot run or verify."""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EMOJI, FASHION
from tl_core.cache import DecodedImageCache
from tl_core.data.intake import open_dataset
from tl_core.errors import ConfigError
from tl_core.models import engines
from tl_core.models.backbones import build_model
from tl_core.models.feature_variants import extractor
from tl_core.models.features import extract_features
from tl_core.models.preprocess import Preprocess, data_config_for

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _fresh_engines(monkeypatch):
    """No session verified by an earlier test, and the engine setting unset."""
    engines._sessions.clear()
    engines._failed.clear()
    monkeypatch.delenv("TL_ENGINE", raising=False)
    monkeypatch.delenv("TL_ONNX_MIN_IMAGES", raising=False)
    yield
    engines._sessions.clear()
    engines._failed.clear()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Lite0 (packaged weights), 48 real images (emoji and Fashion-MNIST), PyTorch's features of both variants,
    and a module-wide cache folder (each variant is exported once for the module)."""
    model, _ = build_model("efficientnet_lite0", 5)
    model.eval()
    pre = Preprocess.from_data_config(data_config_for(model))
    items = open_dataset(EMOJI).items[::5] + open_dataset(FASHION / "train").items[::25][:16]
    cache = tmp_path_factory.mktemp("engine_cache")
    dec = DecodedImageCache(cache / "decoded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_ENGINE", "torch")
        # the batches _extract uses: PyTorch's bits depend on the batch (oneDNN picks its kernels by shape and
        # thread count), and the fallback tests below compare bit for bit
        ref = {v: extract_features(extractor(model, v), items, pre, dec, batch_size=16) for v in ("last", "depths")}
    return model, pre, items, cache, ref


def _extract(setup, variant: str, cache_dir: Path | None = None) -> np.ndarray:
    model, pre, items, cache, _ = setup
    return extract_features(extractor(model, variant), items, pre, DecodedImageCache((cache_dir or cache) / "decoded"),
                            batch_size=16)


def _onnx_files(cache: Path) -> list[Path]:
    return sorted((cache / "engines").glob("*.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["last", "depths"])
def test_onnx_features_equal_pytorch_within_1e4(setup, variant, monkeypatch, caplog):
    model, pre, items, cache, ref = setup
    monkeypatch.setenv("TL_ENGINE", "onnx")
    with caplog.at_level(logging.INFO, logger="tl_core.models.engines"):
        got = _extract(setup, variant)
    assert "verified on the first batch" in caplog.text  # it really ran on ONNX Runtime
    assert got.shape == ref[variant].shape == (len(items), 1280 if variant == "last" else 1792)
    diff = float(np.abs(got - ref[variant]).max())
    assert diff <= 1e-4, diff
    # the features tell the images apart (not a constant output that would match anything)
    assert float(np.abs(ref[variant] - ref[variant].mean(0)).max()) > 1.0
    eng = engines.feature_engine(extractor(model, variant), pre, cache_dir=cache)
    assert eng.name == "onnx"  # the exported file is now in the cache


@pytest.mark.slow
def test_cached_file_is_reused_and_a_damaged_one_rebuilt(setup, monkeypatch):
    model, pre, items, cache, ref = setup
    monkeypatch.setenv("TL_ENGINE", "onnx")
    _extract(setup, "last")  # exported by the test above, or now
    engines._sessions.clear()
    exports = []
    real_export = engines._export
    monkeypatch.setattr(engines, "_export", lambda *a: (exports.append(a[1]), real_export(*a)))
    torch_batches = []
    real_torch = engines.FeatureEngine._torch
    monkeypatch.setattr(engines.FeatureEngine, "_torch", lambda self, x: (torch_batches.append(len(x)), real_torch(self, x))[1])
    # a second extractor (a new process would do the same) builds nothing: it loads the cached file, whose bytes
    # were verified before (the record beside it), so PyTorch does not run at all
    got = _extract(setup, "last")
    assert exports == [] and np.abs(got - ref["last"]).max() <= 1e-4 and torch_batches == []
    key = engines.engine_key(extractor(model, "last"), pre)
    path = cache / "engines" / f"{key}.onnx"
    assert path.exists() and path.with_suffix(".verified").read_text().startswith(
        hashlib.sha256(path.read_bytes()).hexdigest())

    # The rebuilds below need to prove that the engine calls the export again and verifies (and uses) what it
    # wrote, not the exporter itself (the parity tests above export both graphs for real): they write the good
    # bytes exported before, which saves three ~10 s exports of the same graph.
    good = path.read_bytes()

    def rewrite(module, out, pre):
        exports.append(out)
        assert engines.engine_key(module, pre) == key  # asked to rebuild this graph, not another
        tmp = out.with_suffix(".rewrite")
        tmp.write_bytes(good)
        tmp.replace(out)

    # a file that does not load is rebuilt, not trusted
    engines._sessions.clear()
    monkeypatch.setattr(engines, "_export", rewrite)
    torch_batches.clear()
    path.write_bytes(b"not an onnx file")
    got = _extract(setup, "last")
    assert exports == [path] and np.abs(got - ref["last"]).max() <= 1e-4
    assert path.read_bytes() == good and torch_batches == [engines.VERIFY_IMAGES]  # the rebuilt file verified

    # a file that loads but computes something else (another model's graph) is rebuilt too
    engines._sessions.clear()
    exports.clear()
    other = cache / "engines" / f"{engines.engine_key(extractor(model, 'depths'), pre)}.onnx"
    if not other.exists():  # exported by the depths test above unless this test runs alone
        real_export(extractor(model, "depths"), other, pre)
    exports.clear()
    torch_batches.clear()
    shutil.copy(other, path)  # a verification record of the right file stays beside it: it does not vouch for this one
    got = _extract(setup, "last")
    assert exports == [path] and got.shape == ref["last"].shape and np.abs(got - ref["last"]).max() <= 1e-4
    assert torch_batches == [engines.VERIFY_IMAGES] * 2  # the copied graph checked (and refused), the rebuilt one too

    # ... and so is one that loads but cannot run on this input (the float "input" of the earlier format): no crash
    engines._sessions.clear()
    exports.clear()
    _tiny_onnx(path, pre, old_format=True)
    got = _extract(setup, "last")
    assert exports == [path] and np.abs(got - ref["last"]).max() <= 1e-4


def _tiny_onnx(path: Path, pre: Preprocess, old_format: bool = False) -> None:
    """A valid ONNX file that computes something else: the mean colour of each image, (B, 3), from the engine's
    input (NHWC uint8 ``pixels``), or with ``old_format`` from the float NCHW ``input`` of features-v1."""
    import warnings

    import torch

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.float().mean((2, 3) if old_format else (1, 2))

    name, s = ("input", (2, 3, pre.input_size, pre.input_size)) if old_format else ("pixels", (2, pre.input_size, pre.input_size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MeanColour(), (torch.zeros(s, dtype=torch.float32 if old_format else torch.uint8),), str(path),
                          dynamo=False, input_names=[name], output_names=["features"],
                          dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}})


def test_without_onnxruntime_pytorch_gives_the_same_features(setup, monkeypatch, tmp_path, caplog):
    model, pre, items, cache, ref = setup
    monkeypatch.setenv("TL_ENGINE", "onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with caplog.at_level(logging.WARNING, logger="tl_core.models.engines"):
        got = _extract(setup, "last", cache_dir=tmp_path)
    assert "onnxruntime is unavailable" in caplog.text
    assert np.array_equal(got, ref["last"])
    assert not (tmp_path / "engines").exists()


def test_a_failed_export_or_verification_falls_back_to_pytorch(setup, monkeypatch, tmp_path, caplog):
    model, pre, items, cache, ref = setup
    monkeypatch.setenv("TL_ENGINE", "onnx")

    def broken(module, path, pre):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(engines, "_export", broken)
    with caplog.at_level(logging.WARNING, logger="tl_core.models.engines"):
        got = _extract(setup, "last", cache_dir=tmp_path)
    assert "export or load failed" in caplog.text and np.array_equal(got, ref["last"])

    # an export whose graph disagrees with PyTorch (here: a wrong graph) is rejected on the first batch
    def wrong(module, path, pre):
        _tiny_onnx(path, pre)

    monkeypatch.setattr(engines, "_export", wrong)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tl_core.models.engines"):
        got = _extract(setup, "last", cache_dir=tmp_path)
    assert "differ from PyTorch" in caplog.text and np.array_equal(got, ref["last"])
    # remembered: auto does not export it again (not in this process, nor, by the marker file, in another)
    key = engines.engine_key(extractor(model, "last"), pre)
    assert (tmp_path / "engines" / f"{key}.failed").exists() and not (tmp_path / "engines" / f"{key}.onnx").exists()
    engines._failed.clear()
    monkeypatch.setenv("TL_ENGINE", "auto")
    monkeypatch.setenv("TL_ONNX_MIN_IMAGES", "1")
    assert engines.feature_engine(extractor(model, "last"), pre, cache_dir=tmp_path, n_images=10**6).name == "torch"


def test_engine_setting_and_the_auto_rule(setup, monkeypatch, tmp_path):
    model, pre, items, cache, ref = setup
    exports = []
    monkeypatch.setattr(engines, "_export", lambda *a: exports.append(a))
    # auto: a small job with no ONNX file yet stays on PyTorch (an export costs more than it saves)
    eng = engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=48)
    assert eng.name == "torch" and "too few" in eng.reason and exports == []
    # the images run on PyTorch add up across jobs (rent, then buy): once they reach the break-even, it exports
    need = engines.EXPORT_MIN_IMAGES
    assert engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=need - 100).name == "torch"
    assert exports == [] and f"{need - 32} so far" in engines.feature_engine(
        model, pre, cache_dir=tmp_path, n_images=20).reason
    engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=60)
    assert len(exports) == 1  # (the stub wrote no file: loading it fails, and PyTorch stays in charge)
    # a several-depths extractor's export gains less: its break-even is higher
    assert engines._export_min_images(extractor(model, "depths")) == engines.EXPORT_MIN_IMAGES_DEPTHS > need
    exports.clear()
    for f in (tmp_path / "engines").glob("*"):
        f.unlink()
    # ... and a tiny job stays on PyTorch even with the file there (loading and verifying it costs more) ...
    key = engines.engine_key(model, pre)
    (tmp_path / "engines").mkdir(exist_ok=True)
    (tmp_path / "engines" / f"{key}.onnx").write_bytes(b"not loaded")
    eng = engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=engines.SESSION_MIN_IMAGES - 1)
    assert eng.name == "torch" and "loading and verifying" in eng.reason
    # ... unless a session for this model was verified earlier in the process
    engines._sessions[key] = object()
    try:
        eng = engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=1)
        assert eng.name == "onnx" and eng.verified
    finally:
        engines._sessions.pop(key, None)
    monkeypatch.setenv("TL_ENGINE", "torch")
    eng = engines.feature_engine(model, pre, cache_dir=tmp_path, n_images=10**6)
    assert eng.name == "torch" and exports == []
    assert np.array_equal(_extract(setup, "last", cache_dir=tmp_path), ref["last"])
    monkeypatch.setenv("TL_ENGINE", "fastest")
    with pytest.raises(ConfigError, match="TL_ENGINE"):
        engines.feature_engine(model, pre, cache_dir=tmp_path)


def test_the_key_ignores_the_classifier_but_not_the_weights(setup):
    model, pre, *_ = setup
    other, _ = build_model("efficientnet_lite0", 7)  # the same backbone weights, another (random) head
    assert engines.engine_key(other.eval(), pre) == engines.engine_key(model, pre)
    assert engines.engine_key(model, pre) != engines.engine_key(model, replace(pre, input_size=pre.input_size + 32))
    # the graph normalises the pixels: another mean or std is another file
    assert engines.engine_key(model, pre) != engines.engine_key(model, replace(pre, mean=(0.485, 0.456, 0.406)))
    assert engines.engine_key(extractor(model, "depths"), pre) != engines.engine_key(model, pre)
    import torch

    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert engines.engine_key(other, pre) != engines.engine_key(model, pre)


def test_the_pytorch_engine_leaves_the_model_trainable(setup, monkeypatch):
    """Fine-tuning starts from the model whose features the probe head was fitted on: extraction (in inference
    mode) must not turn its weights into inference tensors (a `full` run in a fresh workspace failed with
    "Setting requires_grad=True on inference tensor outside InferenceMode")."""
    _, pre, items, _, _ = setup
    model, _ = build_model("efficientnet_lite0", 5)
    monkeypatch.setenv("TL_ENGINE", "torch")
    # the engine converting the network itself (a batch-norm-folded copy leaves it untouched: test_folding.py)
    monkeypatch.setenv("TL_FOLD_BN", "off")
    extract_features(model, items[:4], pre, DecodedImageCache(None))
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)  # it did convert
    assert not [n for n, p in model.named_parameters() if p.is_inference()]
    for p in model.parameters():
        p.requires_grad_(True)

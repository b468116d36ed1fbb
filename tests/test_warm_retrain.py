"""A warm re-train (issue 24, "Speed as a new user meets it"): what depends only on the cached features and the
backbone is read back, what the seed changes is fitted again, and the run written is the same to the last bit.

- the probe's L-BFGS (models.probe) is torch's, without the Optimizer machinery that imports torch._dynamo, and
  evaluates each point once;
- a linear run whose every vector is cached reads its backbone's tensors from the record the first run left
  (models.backbones.record_backbone) instead of building the network with timm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import EMOJI
from tl_core.config import TrainConfig
from tl_core.models import probe
from tl_core.runs import training
from tl_core.runs.training import run_training
from tl_core.storage.files import RunFiles


class _TorchLBFGS:
    """torch.optim.LBFGS as probe._LBFGS is called (its state where the probe reads it)."""

    def __init__(self, params, **kw):
        self.opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **kw)
        self.state = self.opt.state[params[0]]

    def step(self, closure):
        return self.opt.step(closure)


def _problem(seed: int = 0, n: int = 90, d: int = 40, k: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y = np.arange(n) % k
    x = (centres[y] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    return x[:70], y[:70], x[70:], y[70:], k


def test_the_probe_fit_equals_torch_lbfgs_bit_for_bit_and_evaluates_each_point_once(monkeypatch):
    x, y, xv, yv, k = _problem()
    cfg = TrainConfig(strategy="linear").resolved()
    ours, info = probe.fit_linear_head(x, y, xv, yv, k, cfg)
    monkeypatch.setattr(probe, "_LBFGS", _TorchLBFGS)
    ref, ref_info = probe.fit_linear_head(x, y, xv, yv, k, cfg)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert info["iterations"] == ref_info["iterations"] > 10 and info["converged"]
    # each round evaluates the point its line search accepted and reports on it: one evaluation, read back twice
    assert info["evaluations"] <= info["iterations"] + 5, info


def _same_files(a, b) -> None:
    for name in ("model.safetensors", "val_head.safetensors", "ood_bank.safetensors", "meta.json",
                 "predictions.json", "ood.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_a_warm_retrain_reads_the_backbone_back_and_writes_the_same_run(workspace, monkeypatch):
    cfg = TrainConfig(strategy="linear", seed=3, max_per_class=10)
    built = []
    real_build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda *a, **k: built.append(a) or real_build(*a, **k))
    first = run_training(workspace, EMOJI, cfg)  # extracts (or finds the session's cache) and records the backbone
    assert first.status == "done"
    # (the same seed: max_per_class draws other images with another seed, which would need extracting)
    recorded = len(built)  # 1: this run built the network and recorded it; 0: the session's cache had the record
    again = run_training(workspace, EMOJI, cfg)
    assert len(built) == recorded, "a re-train on cached features must not build the network"
    # every solver round is in the store (they go there together, at most twice a second)
    assert [e["epoch"] for e in workspace.store().epochs(again.run_id)] == list(range(1, again.epochs_run + 1))
    assert workspace.store().get(again.run_id)["summary"]["refit"]["reused"]  # the refit on train + val: read back
    # the same seed with the network built (no record) writes the same bytes
    monkeypatch.setattr(training, "recorded_backbone", lambda *a, **k: None)
    rebuilt = run_training(workspace, EMOJI, cfg)
    assert len(built) == recorded + 1
    _same_files(workspace.run_dir(again.run_id), workspace.run_dir(rebuilt.run_id))
    assert RunFiles(workspace.run_dir(again.run_id)).metrics().val == \
        RunFiles(workspace.run_dir(rebuilt.run_id)).metrics().val


def test_the_refit_on_every_labelled_image_is_fitted_once_whatever_the_split(tmp_path, monkeypatch):
    """The head refitted on train + validation sees the same images whatever the seed: it is fitted once (in the
    canonical order, on the features scaled on every labelled image) and read back by a re-train with another
    seed, whose own block scales (its training images') give the same logits."""
    from types import SimpleNamespace

    from tl_core.models.feature_variants import FeatureChoice, apply_variant, block_scales

    rng = np.random.default_rng(1)
    k, last_dim, blocks = 3, 6, [4, 5]
    y = np.arange(60) % k
    raw = (rng.normal(size=(k, last_dim + sum(blocks)))[y] + rng.normal(size=(60, last_dim + sum(blocks)))
           ).astype(np.float32) * np.r_[np.ones(last_dim), 3 * np.ones(4), 0.2 * np.ones(5)].astype(np.float32)
    items = [SimpleNamespace(sha256=f"{i * 7919 % 61:04d}", path=f"/d/{i}.png", label=str(c)) for i, c in enumerate(y)]
    cidx = {str(c): c for c in range(k)}
    cfg = TrainConfig(strategy="linear").resolved()
    fits = []
    real = training.fit_linear_head
    monkeypatch.setattr(training, "fit_linear_head", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    heads = []
    for seed in (1, 2):  # two splits: another order of the labelled images, other training images' scales
        order = np.random.default_rng(seed).permutation(60)
        s_all = block_scales(raw[sorted(range(60), key=lambda i: items[i].sha256)], last_dim, blocks)
        s_run = block_scales(raw[order[:45]], last_dim, blocks)
        choice = FeatureChoice("depths", 1.0, [float(v) for v in s_run], blocks, "cross-validation")
        head, info = training._refit_once(tmp_path, apply_variant(raw[order], "depths", last_dim, blocks, s_all),
                                          s_all, choice, [items[i] for i in order], cidx, cfg, None)
        assert info["reused"] == (seed == 2)
        with torch.no_grad():
            heads.append(head(torch.from_numpy(apply_variant(raw, "depths", last_dim, blocks, s_run))).numpy())
    assert fits == [1]  # fitted by the first run only
    assert np.allclose(heads[0], heads[1], atol=1e-4) and (heads[0].argmax(1) == y).mean() > 0.8


def test_the_probes_rounds_go_to_the_store_together_and_all_of_them(tmp_path):
    """``RunStore.add_epochs``: the rounds a linear probe reports in one transaction, all or none."""
    from tl_core.storage.store import RunStore

    store = RunStore(tmp_path / "r.sqlite")
    rid = store.create_run("data/x", {"strategy": "linear"})
    store.add_epochs(rid, [(e, {"val_loss": 1.0 / e}) for e in range(1, 6)])
    store.add_epochs(rid, [(5, {"val_loss": 0.1}), (6, {"val_loss": 0.05})])
    assert [e["val_loss"] for e in store.epochs(rid)] == [1.0, 0.5, 1 / 3, 0.25, 0.1, 0.05]
    with pytest.raises(TypeError):  # a round that cannot be written: none of the batch is
        store.add_epochs(rid, [(7, {"val_loss": 0.01}), (8, {"val_loss": object()})])
    assert len(store.epochs(rid)) == 6
    store.add_epoch(rid, 7, {"val_loss": 0.01})  # the connection is usable again
    assert len(store.epochs(rid)) == 7

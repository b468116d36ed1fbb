"""The probe fits of a cold ``linear`` run side by side, a core each (issue 24: ``auto``'s 15 cross-validation fits
and the k folds of the out-of-fold estimate were one core's work while the other idled), with the same results to
the bit; and the one helper that records a result measured on cached features (JSON or an array), counted and
evicted as a recorded choice wherever it lies. Fast tier: small synthetic problems, no network."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from tl_core.cache import cache_summary, enforce_cache_limit, recorded
from tl_core.config import TrainConfig
from tl_core.errors import CancelledError
from tl_core.models import crossfit, feature_variants, probe
from tl_core.models.devices import single_threaded


def _problem(seed: int = 0, n: int = 60, last: int = 12, blocks=(4, 6), k: int = 3):
    rng = np.random.default_rng(seed)
    d = last + sum(blocks)
    y = np.arange(n) % k
    x = (rng.normal(size=(k, d))[y] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    return x, y, k, last, list(blocks)


def _one_by_one(jobs, should_cancel=None):
    return [job(lambda: False) for job in jobs]


@pytest.fixture
def two_cores(monkeypatch):
    """At least two fit threads whatever the machine (the results must not depend on the count)."""
    monkeypatch.setattr(probe, "cpu_count", lambda: 2)


def test_fits_side_by_side_equal_fits_one_by_one_to_the_bit(two_cores, monkeypatch):
    x, y, k, _, _ = _problem()
    cfg = TrainConfig(strategy="linear").resolved()
    threads = set()

    def fit(seed):
        def job(cancel):
            threads.add(threading.current_thread().name)
            rows = np.random.default_rng(seed).permutation(len(x))[:45]
            head, info = probe.fit_linear_head(x[rows], y[rows], x[:0], y[:0], k, cfg, should_cancel=cancel)
            return head.weight.detach().clone(), head.bias.detach().clone(), info["iterations"]
        return job

    jobs = [fit(s) for s in range(6)]
    with single_threaded():
        side = probe.fit_side_by_side(jobs)
        alone = _one_by_one(jobs)
    assert len({t for t in threads if t.startswith("probe-fit")}) == 2  # two worker threads did the fits
    for (w, b, n), (w1, b1, n1) in zip(side, alone):  # in the jobs' order, the same bits
        assert torch.equal(w, w1) and torch.equal(b, b1) and n == n1 > 5


def test_autos_choice_and_the_cross_validated_estimate_do_not_depend_on_the_threads(two_cores, monkeypatch):
    x, y, k, last, blocks = _problem(1)
    cfg = TrainConfig(strategy="linear", features="auto").resolved()
    with single_threaded():
        side = feature_variants.choose_features(x, y, k, cfg, last, blocks, probe.fit_linear_head)
        cv = crossfit.cross_validated_accuracy(x, y, k, cfg)
        oof = crossfit.out_of_fold_probs(x, np.eye(k, dtype=np.int64)[y], cfg)
        monkeypatch.setattr(feature_variants, "fit_side_by_side", _one_by_one)
        monkeypatch.setattr(crossfit, "fit_side_by_side", _one_by_one)
        alone = feature_variants.choose_features(x, y, k, cfg, last, blocks, probe.fit_linear_head)
        cv1 = crossfit.cross_validated_accuracy(x, y, k, cfg)
        oof1 = crossfit.out_of_fold_probs(x, np.eye(k, dtype=np.int64)[y], cfg)
    assert side.cv == alone.cv and len(side.cv) == len(feature_variants.CANDIDATES)
    assert (side.variant, side.linear_c, side.scales) == (alone.variant, alone.linear_c, alone.scales)
    assert {a: b for a, b in cv.items() if a != "seconds"} == {a: b for a, b in cv1.items() if a != "seconds"}
    assert np.array_equal(oof, oof1)


def test_a_failed_or_cancelled_fit_stops_the_others(two_cores):
    started = []

    def job(i):
        def run(cancel):
            started.append(i)
            if i == 1:
                raise ValueError("bad fold")
            while not cancel():  # a long fit that polls its cancel check
                threading.Event().wait(0.01)
            raise CancelledError("stopped")
        return run

    with pytest.raises(ValueError, match="bad fold"):  # the failure itself, not the others' cancellation
        probe.fit_side_by_side([job(i) for i in range(6)])
    assert len(started) < 6  # the pending ones never started
    calls = []
    with pytest.raises(CancelledError):
        probe.fit_side_by_side([job(0), job(2)], should_cancel=lambda: calls.append(1) or len(calls) > 1)


def test_a_recorded_result_is_json_or_an_array_read_back_and_checked(tmp_path, caplog):
    calls = []
    head = tmp_path / "features" / "somewhere" / "0123abcd.npy"
    wb = np.arange(6, dtype=np.float32).reshape(2, 3)
    out, reused = recorded(head, lambda: calls.append(1) or wb)
    again, reused2 = recorded(head, lambda: calls.append(1) or wb + 1)
    assert (reused, reused2, calls) == (False, True, [1]) and np.array_equal(again, wb)

    def wants_3x3(a):
        if a.shape != (3, 3):
            raise ValueError(f"shape {a.shape}")

    with caplog.at_level(logging.WARNING):
        fixed, reused3 = recorded(head, lambda: np.zeros((3, 3), np.float32), wants_3x3)
    assert not reused3 and fixed.shape == (3, 3) and "unusable" in caplog.text
    assert recorded(head, lambda: None, wants_3x3)[1]  # what was measured again is recorded
    choice = tmp_path / "features" / "k" / "choices" / "c.json"
    assert recorded(choice, lambda: {"v": 1}) == ({"v": 1}, False)
    assert recorded(choice, lambda: {"v": 2}) == ({"v": 1}, True)
    # counted and evicted as recorded choices wherever they lie; a cached vector (sharded by its hash) is features
    vec = tmp_path / "features" / "k" / "ab" / ("ab" + "0" * 62 + ".npy")
    vec.parent.mkdir(parents=True)
    np.save(vec, np.zeros(4, np.float32))
    summary = cache_summary(tmp_path)
    assert summary["choices"]["entries"] == 2 and summary["features"]["entries"] == 1
    enforce_cache_limit(tmp_path, max_bytes=0)
    assert not head.exists() and not choice.exists() and not vec.exists()

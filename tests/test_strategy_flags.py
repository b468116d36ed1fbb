"""The probe flags of the strategy registry (``Strategy.probe_is_model``, ``choose_features``, ``open_set_style``)
fit together and agree with what feature extraction does for each strategy: ``_linear_probe`` reads them instead
of asking "is this the linear strategy?" (a saved run is the same to the byte either way: checked before and
after the change with seeded linear, partial and multi-label runs)."""

from tl_core.models.feature_variants import extraction_variant
from tl_core.runs.training import STRATEGY_REGISTRY


def test_a_probe_that_only_starts_a_fine_tune_sees_the_last_layer_and_records_no_style():
    for name, s in STRATEGY_REGISTRY.items():
        if s.choose_features or s.open_set_style:
            # both are about the probe as the run's model: its features, its open-set bank
            assert s.probe_is_model, name
        if s.probe_is_model:
            assert s.fit is not None and not s.probe_first and s.frozen_backbone, name
        for features in ("auto", "last", "depths", "flip"):
            variant = extraction_variant(features, s.choose_features)
            if s.fit is not None and not s.choose_features:  # the network's own head sees the last layer
                assert variant == "last", (name, features)
    assert STRATEGY_REGISTRY["linear"].probe_is_model and STRATEGY_REGISTRY["linear"].choose_features
    assert not any(STRATEGY_REGISTRY[n].probe_is_model for n in ("partial", "full", "scratch"))

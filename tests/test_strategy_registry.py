"""The strategy registry (``tl_core.runs.training.STRATEGY_REGISTRY``) and the configuration's ``STRATEGIES`` name the
same strategies: every strategy the Train form and ``tl-core train --strategy`` offer has a way to be trained, and
every registered one is offered."""

from tl_core.config import STRATEGIES
from tl_core.runs.training import STRATEGY_REGISTRY


def test_every_offered_strategy_is_registered_and_every_registered_one_offered():
    assert sorted(STRATEGY_REGISTRY) == sorted(STRATEGIES)
    for name, strategy in STRATEGY_REGISTRY.items():
        assert strategy.name == name
        # exactly one way to run it: its own fit, or a composition of other strategies' runs
        assert (strategy.fit is None) != (strategy.compose is None), name

"""TrainConfig and the choice tables."""

import dataclasses
import json

import pytest

from tl_core.config import AUGMENT_PRESETS, CLASS_BALANCE, STRATEGIES, TrainConfig, field_help
from tl_core.errors import ConfigError


def test_every_field_has_a_default_and_a_help_string():
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert len(field_help(f.name)) > 15, f.name


def test_choice_tables_have_help():
    assert set(STRATEGIES) == {"linear", "partial", "full", "auto", "scratch"}
    assert set(AUGMENT_PRESETS) == {"none", "light", "strong"}
    for table in (STRATEGIES, AUGMENT_PRESETS, CLASS_BALANCE):
        for c in table.values():
            assert c.label and len(c.help) > 20


def test_resolved_fills_strategy_defaults_and_round_trips():
    cfg = TrainConfig(strategy="full").resolved()
    assert cfg.epochs == STRATEGIES["full"].defaults["epochs"]
    assert cfg.lr == STRATEGIES["full"].defaults["lr"]
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, words", [
    ({"strategy": "magic"}, ["Unknown strategy", "linear"]),
    ({"augment": "wild"}, ["Unknown augmentation", "light"]),
    ({"epochs": 0}, ["Epochs must be between 1 and 1000", "got 0"]),
    ({"lr": -1.0}, ["Learning rate", "got -1.0"]),
    ({"val_split": 0.95}, ["Validation split", "0.9"]),
    ({"batch_size": 0}, ["Batch size"]),
])
def test_bad_values_say_what_is_wrong(kwargs, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs).resolved()
    for w in words:
        assert w in str(e.value)


def test_unknown_keys_in_saved_config_are_ignored():
    assert TrainConfig.from_dict({"strategy": "full", "from_the_future": 1}).strategy == "full"

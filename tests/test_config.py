"""The configs the repository ships load and pass validation (a renamed field fails here, not on a cluster)."""

from pathlib import Path

import pytest

from raysys.config import Config
from raysys.tune.reproduce import learned_settings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    config = Config.from_yaml(str(path), [])
    assert config.name and Config.from_dict(config.to_dict()) == config


def test_recipe_config_bundles_its_levers():
    recipe = Config.from_yaml(str(CONFIGS[0].with_name("recipe.yaml")), [])
    local = Config.from_yaml(str(CONFIGS[0].with_name("local.yaml")), [])
    assert recipe.train.interpolate_rule == "keep_mono_ci" and recipe.data.hard_negatives == "paragraph"
    assert recipe.train.hard_negatives_per_pair == 3 and recipe.train.cross_lingual_negatives == "query"
    assert 0.0 in recipe.train.interpolate_weights and 1.0 in recipe.train.interpolate_weights
    # The default job's budget and schedule: the recipe differs from it only by its levers.
    learned, local_learned = learned_settings(recipe.to_dict()), learned_settings(local.to_dict())
    levers = ("hard_negatives_per_pair", "cross_lingual_negatives", "temperature", "length_groups")
    assert {k: v for k, v in learned["train"].items() if k not in levers} == \
        {k: v for k, v in local_learned["train"].items() if k not in levers}
    assert {k: v for k, v in learned["data"].items() if k != "hard_negatives"} == \
        {k: v for k, v in local_learned["data"].items() if k != "hard_negatives"}


def test_unknown_cross_lingual_negatives_is_refused_naming_the_key():
    from raysys.errors import ConfigError

    assert Config.from_yaml(None, ["train.cross_lingual_negatives=mixed"]).train.cross_lingual_negatives == "mixed"
    with pytest.raises(ConfigError) as err:
        Config.from_yaml(None, ["train.cross_lingual_negatives=target"])
    assert err.value.field == "train.cross_lingual_negatives" and "passage, query, mixed" in str(err.value)

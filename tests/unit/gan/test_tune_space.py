"""Tune and in-training-score config: search-space validation names the key, conditional specs, flattening."""

import pytest

from gan.config import ConfigError
from gan.config_loader import config_hash, flatten, from_dict, load_config, to_dict
from gan.tune_space import applies


def test_a_yaml_space_parses_numbers_and_turns_the_search_on(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(
        "data: {source: digits, resolution: 28}\n"
        "tune:\n"
        "  scheduler: pbt\n"
        "  space:\n"
        "    optim.lr_g: {loguniform: [1e-4, 1e-3]}\n"
        "    optim.beta1: {uniform: [0, 0.9]}\n"
        "    loss.n_critic: {randint: [1, 3]}\n"
        "    model.hidden: {choice: [[64], [64, 128]]}\n"
        "    model.g_width: {choice: [16, 32], when: {model.family: dcgan}}\n"
        "    model.family: {choice: [mlp, dcgan]}\n")
    cfg = load_config(path)
    assert cfg.tune.enabled and not load_config(None).tune.enabled
    space = cfg.tune.space
    assert space["optim.lr_g"] == {"loguniform": [1e-4, 1e-3]}
    assert isinstance(space["optim.lr_g"]["loguniform"][0], float)
    assert space["optim.beta1"] == {"uniform": [0.0, 0.9]}
    assert space["model.g_width"] == {"choice": [16, 32], "when": {"model.family": ["dcgan"]}}
    flat = flatten(cfg)
    assert flat["tune.scheduler"] == "pbt" and flat["tune.space"].startswith('{"loss.n_critic"')
    assert from_dict(to_dict(cfg)) == cfg
    assert config_hash(cfg) != config_hash(load_config(path, ["tune.seed=1"]))
    assert hash(cfg) == hash(load_config(path))
    values = flatten(cfg)
    assert not applies(space["model.g_width"], values)
    assert applies(space["model.g_width"], {**values, "model.family": "dcgan"})


def space(entries: dict) -> dict:
    return {"tune": {"space": entries}}


@pytest.mark.parametrize(("values", "message"), [
    (space({"optim.lr_x": {"loguniform": [1e-4, 1e-3]}}), "tune.space.optim.lr_x: optim.lr_x is not a config key"),
    (space({"scale.num_workers": {"choice": [1, 2]}}), "tune.space.scale.num_workers: scale.num_workers cannot be"),
    (space({"data.source": {"choice": ["digits"]}}), "cannot be searched"),
    (space({"optim.lr_g": 0.001}), "tune.space.optim.lr_g must be a mapping"),
    (space({"optim.lr_g": {"normal": [0, 1]}}), "must have exactly one of loguniform"),
    (space({"optim.lr_g": {"loguniform": [0, 1e-3]}}), "tune.space.optim.lr_g.loguniform must have low > 0"),
    (space({"optim.lr_g": {"uniform": [1e-3, 1e-4]}}), "must have low < high"),
    (space({"optim.lr_g": {"uniform": [1e-3]}}), r"must be \[low, high\]"),
    (space({"loss.n_critic": {"uniform": [1, 5]}}), "uniform needs a float key, but loss.n_critic is int"),
    (space({"loss.kind": {"choice": []}}), "tune.space.loss.kind.choice must be a non-empty list"),
    (space({"loss.n_critic": {"choice": ["two"]}}), r"tune.space.loss.n_critic.choice\[0\] must be of type int"),
    (space({"loss.kind": {"choice": ["bce", "wasserstein"]}}),
     "tune.space.loss.kind: choice value 'wasserstein' gives an invalid config: loss.kind must be one of"),
    (space({"model.family": {"choice": ["mlp", "dcgan"]}}), "choice value 'dcgan' gives an invalid config: "
                                                            "model.family dcgan needs image data"),
    (space({"model.g_width": {"choice": [0, 8], "when": {"model.family": "dcgan"}}}),
     "model.g_width: choice value 0 with {'model.family': 'dcgan'} gives an invalid config"),
    (space({"model.g_width": {"choice": [8], "when": {"model.famly": "dcgan"}}}), "when: model.famly is not a config"),
    ({"tune": {"scheduler": "hyperband"}}, "tune.scheduler must be one of asha, pbt, fifo"),
    ({"tune": {"scheduler": "pbt", **space({"loss.n_critic": {"choice": [1, 2]}})["tune"]}},
     "pbt explores optim.lr_g and optim.lr_d"),
    ({"tune": {"cpus_per_trial": 0}}, "tune.cpus_per_trial must be > 0"),
    ({"tune": {"space": [1]}}, "tune.space must be a mapping"),
    ({"train": {"fid_every_kimg": 1.5, "checkpoint_every_kimg": 1}}, "train.fid_every_kimg must be a whole multiple"),
    ({"train": {"fid_every_kimg": 1, "checkpoint_every_kimg": 1, "fid_samples": 500}},
     "train.fid_samples must be >= 2000"),
])
def test_bad_searches_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        from_dict(values)


def test_conditional_choices_are_checked_with_their_condition_applied():
    # dcgan on 28 px digits is valid; its width choices are checked with model.family=dcgan set.
    cfg = from_dict({"data": {"source": "digits", "resolution": 28}, **space({
        "model.family": {"choice": ["mlp", "dcgan"]},
        "model.g_width": {"choice": [8, 16], "when": {"model.family": ["dcgan"]}}})})
    assert cfg.model.family == "mlp" and cfg.tune.space["model.family"] == {"choice": ["mlp", "dcgan"]}


def test_in_training_score_is_off_by_default_and_validated():
    cfg = from_dict({"train": {"fid_every_kimg": 2, "checkpoint_every_kimg": 0.5}})
    assert cfg.train.scores and cfg.train.fid_samples == 2000
    assert not from_dict({}).train.scores


def test_a_flattened_search_round_trips_through_its_params():
    cfg = from_dict(space({"optim.lr_d": {"loguniform": [1e-4, 1e-3]}}))
    assert load_config(None, flatten(cfg)) == cfg

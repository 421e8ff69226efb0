"""Config: YAML + dotted overrides, unknown keys and bad values rejected with the key named, flattening."""

import pytest

from gan.config import Config, ConfigError
from gan.config_loader import config_hash, flatten, from_dict, load_config, to_dict


def test_yaml_and_overrides_build_a_typed_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\ndata: {source: digits, resolution: 16}\noptim: {lr_g: 0.001}\n"
                    "model: {hidden: [8, 16]}\n")
    cfg = load_config(path, ["optim.lr_g=1e-4", "train.batch_size=32", "scale.num_workers=2"])
    assert cfg.optim.lr_g == 1e-4 and isinstance(cfg.optim.lr_g, float)
    assert cfg.data.source == "digits" and cfg.data.resolution == 16
    assert cfg.model.hidden == (8, 16)
    assert cfg.train.batch_size == 32 and cfg.scale.num_workers == 2


def test_int_is_accepted_for_float_and_lists_become_tuples():
    cfg = from_dict({"optim": {"lr_d": 1}, "model": {"hidden": [4]}})
    assert cfg.optim.lr_d == 1.0 and isinstance(cfg.optim.lr_d, float)
    assert cfg.model.hidden == (4,)


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr_g=-1"], "optim.lr_g must be > 0, got -1"),
    (["optim.lr_gg=1"], "unknown key 'optim.lr_gg'"),
    (["nope.x=1"], "unknown key 'nope'"),
    (["data.source=imagenet"], "data.source must be one of"),
    (["loss.kind=wasserstein"], "loss.kind must be one of"),
    (["model.family=vit"], "model.family must be one of"),
    (["train.batch_size=10", "scale.num_workers=3"],
     "train.batch_size must be divisible by scale.num_workers=3"),
    (["train.batch_size=ten"], "train.batch_size must be of type int"),
    (["optim.ema=3"], "optim.ema must be true or false"),
    (["model.family=dcgan"], "model.family dcgan needs image data"),
    (["model.family=dcgan", "data.source=digits", "data.resolution=16"], "data.resolution must be one of"),
    (["data.source=idx"], "data.root must name a folder for source idx"),
    (["loss.n_critic=0"], "loss.n_critic must be >= 1, got 0"),
    (["optim.lr_decay_from=1.5"], r"optim.lr_decay_from must be in \[0, 1\], got 1.5"),
    (["model.d_convs_per_stage=0"], "model.d_convs_per_stage must be >= 1, got 0"),
    (["model.latent_codes=1"], "model.latent_codes must be 0 (off) or >= 2, got 1"),
    (["model.latent_codes=4", "model.z_dim=1"], "model.z_dim must be >= 2 with model.latent_codes"),
    (["optim.lr_g"], "must look like key=value"),
    (["optim.lr_g=inf"], "optim.lr_g must be a finite number, got inf"),
    (["optim.lr_d=.nan"], "optim.lr_d must be a finite number, got nan"),
    (["register.max_fid=-.inf"], "register.max_fid must be a finite number, got -inf"),
    (["data.out_dir=/abs/data"], "data.out_dir must be a relative folder"),
    (["data.out_dir=../up"], "data.out_dir must be a relative folder"),
    (["data.out_dir=s3://b/p"], "data.out_dir must be a relative folder"),
    (["scale.worker_resources={CPU: 1}"], "scale.worker_resources.CPU must be a custom resource"),
    (["scale.worker_resources={trainer: 0}"], "scale.worker_resources.trainer must be a finite number > 0"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_worker_resources_are_a_hashable_mapping_that_round_trips():
    cfg = load_config(None, ["scale.worker_resources={trainer: 1}"])
    assert cfg.scale.worker_resources == {"trainer": 1}
    assert from_dict(to_dict(cfg)) == cfg
    assert hash(cfg) == hash(load_config(None, ["scale.worker_resources={trainer: 1}"]))
    assert hash(cfg) != hash(load_config(None))


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_flatten_uses_dotted_keys_and_round_trips():
    cfg = load_config(None, ["optim.lr_g=3e-4", "model.hidden=[32, 64]"])
    flat = flatten(cfg)
    assert flat["optim.lr_g"] == 3e-4
    assert flat["model.hidden"] == [32, 64]
    assert from_dict(to_dict(cfg)) == cfg
    rebuilt = load_config(None, {k: v for k, v in flat.items()})
    assert rebuilt == cfg


def test_config_hash_is_stable_and_sensitive():
    a, b = Config(), load_config(None, ["optim.lr_g=1e-3"])
    assert config_hash(a) == config_hash(Config())
    assert config_hash(a) != config_hash(b)
    assert config_hash(a.data) == config_hash(b.data)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.optim.lr_g = 1.0  # type: ignore[misc]

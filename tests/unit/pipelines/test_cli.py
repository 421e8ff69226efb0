"""The command line rejects bad configs with exit code 2 and a message naming the key, before Ray starts."""

import pytest

from gan.config import ConfigError
from gan.config_loader import load_config
from pipelines import cli
from pipelines.cli import main
from pipelines.ray_train import check_resources


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr_g=-1"], "optim.lr_g must be > 0, got -1"),
    (["data.source=imagenet"], "data.source must be one of"),
    (["scale.num_workers=2", "train.batch_size=63"], "train.batch_size must be divisible by scale.num_workers=2"),
    (["loss.kind=nope"], "loss.kind must be one of"),
    (["model.family=transformer"], "model.family must be one of"),
    (["optim.lr_d=0"], "optim.lr_d must be > 0, got 0.0"),
    (["eval.num_samples=100"], "eval.num_samples must be >= the feature dimension 128"),
    (["data.rezolution=28"], "unknown key 'data.rezolution'"),
])
def test_bad_config_exits_2_naming_the_key(overrides, message, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(cli, "_init_ray", lambda: started.append(True))
    args = ["run", "--config", "configs/quickstart.yaml"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not started, "Ray must not start for a bad config"


def test_bad_yaml_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_size: [\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_workers_must_leave_a_cpu_for_ray_data():
    cfg = load_config(None, ["scale.num_workers=2", "scale.cpus_per_worker=0.75"])
    with pytest.raises(ConfigError, match="leaves less than 1 for Ray Data"):
        check_resources(cfg, available_cpus=2)
    check_resources(load_config(None, ["scale.num_workers=2", "scale.cpus_per_worker=0.5"]), available_cpus=2)


def test_missing_inception_weights_exit_2_before_any_download(tmp_path, capsys):
    missing = tmp_path / "inception.pt"
    assert main(["run", "--config", "configs/quickstart.yaml", "--set", f"eval.inception_weights={missing}"]) == 2
    err = capsys.readouterr().err
    assert "eval.inception_weights" in err and str(missing) in err

"""`submit`'s pure parts: options, Ray's token lookup order, messages, entrypoint and runtime_env; no cluster."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import submit
from pipelines.cli import _parser

REPO = Path(__file__).resolve().parents[3]


def parse(*argv: str):
    return _parser().parse_args(["submit", *argv])


def test_options_and_the_pipeline_command_after_double_dash():
    args = parse("--address", "http://h:8265", "--env", "A=1", "--env", "B=x=y", "--no-wait", "--timeout", "90",
                 "--", "run", "--config", "configs/ring8.yaml", "--set", "train.kimg=20")
    assert args.address == "http://h:8265" and args.no_wait and args.timeout == 90
    assert args.env == ["A=1", "B=x=y"]
    assert submit.pipeline_command(args.pipeline_args, REPO) == [
        "run", "--config", "configs/ring8.yaml", "--set", "train.kimg=20"]
    # The pipeline's own --address-like options are not taken by submit.
    args = parse("--", "run", "--config", "c.yaml", "--workdir", "/x")
    assert args.address is None and args.pipeline_args == ["--", "run", "--config", "c.yaml", "--workdir", "/x"]


def test_address_comes_from_the_option_then_ray_api_server_address_then_ray_address():
    assert submit.resolve_address("http://a:8265/", {"RAY_ADDRESS": "http://b:8265"}) == "http://a:8265"
    env = {"RAY_API_SERVER_ADDRESS": "http://c:8265", "RAY_ADDRESS": "http://b:8265"}
    assert submit.resolve_address(None, env) == "http://c:8265"
    assert submit.resolve_address(None, {"RAY_ADDRESS": "http://b:8265"}) == "http://b:8265"
    with pytest.raises(submit.SubmitError, match="pass --address http://HOST:8265 .* or set RAY_ADDRESS"):
        submit.resolve_address(None, {})


def test_env_pairs_and_the_forwarded_tracking_uri():
    env = submit.parse_env(["A=1", "B=x=y", "EMPTY="], {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "OTHER": "no"})
    assert env == {"PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                   "A": "1", "B": "x=y", "EMPTY": ""}
    assert submit.parse_env(["MLFLOW_TRACKING_URI=sqlite:///j.db"], {"MLFLOW_TRACKING_URI": "http://m:5000"})[
        "MLFLOW_TRACKING_URI"] == "sqlite:///j.db"
    assert "MLFLOW_TRACKING_URI" not in submit.parse_env([], {})
    for bad in ["NOEQUALS", "=1", "1A=2", "A-B=1"]:
        with pytest.raises(submit.SubmitError, match=f"--env expects KEY=VALUE .*got '{bad}'"):
            submit.parse_env([bad], {})


def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "token"
    path_file.write_text("  from-path  \nsecond line ignored\n")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path_file), "RAY_AUTH_TOKEN": " from-env\n"}
    assert submit.find_token(env) == submit.Token("from-env", "RAY_AUTH_TOKEN")
    env["RAY_AUTH_TOKEN"] = ""  # empty counts as unset, as in Ray
    assert submit.find_token(env) == submit.Token("from-path", f"RAY_AUTH_TOKEN_PATH={path_file}")
    del env["RAY_AUTH_TOKEN_PATH"]
    assert submit.find_token(env) == submit.Token("from-home", str(home / ".ray" / "auth_token"))
    assert submit.find_token({"HOME": str(tmp_path / "nobody")}) is None


def test_a_token_path_that_cannot_be_read_is_an_error_not_a_fallback(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home")
    (tmp_path / "empty").write_text("\n")
    for path in [tmp_path / "missing", tmp_path / "empty"]:
        with pytest.raises(submit.SubmitError, match=f"RAY_AUTH_TOKEN_PATH is set but {path} cannot be read"):
            submit.find_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(path)})


def test_the_token_is_sent_unless_auth_is_disabled():
    token = submit.Token("abc", "RAY_AUTH_TOKEN")
    assert submit.auth_headers(token, {}) == {"Authorization": "Bearer abc"}
    assert submit.auth_headers(token, {"RAY_AUTH_MODE": "token"}) == {"Authorization": "Bearer abc"}
    assert submit.auth_headers(token, {"RAY_AUTH_MODE": "disabled"}) == {}
    assert submit.auth_headers(None, {}) == {}


def test_missing_token_message_names_what_to_set():
    message = submit.missing_token_message("http://h:8265", {"HOME": "/home/me"})
    for needed in ["http://h:8265", "ray get-auth-token", "RAY_AUTH_TOKEN=", "RAY_AUTH_TOKEN_PATH=",
                   "/home/me/.ray/auth_token"]:
        assert needed in message
    assert "RAY_AUTH_MODE" not in message
    disabled = submit.missing_token_message("http://h:8265", {"RAY_AUTH_MODE": "disabled"})
    assert "Unset RAY_AUTH_MODE=disabled" in disabled
    rejected = submit.rejected_token_message("http://h:8265", submit.Token("secret-value", "RAY_AUTH_TOKEN_PATH=/t"))
    assert "RAY_AUTH_TOKEN_PATH=/t" in rejected and "secret-value" not in rejected


def test_entrypoint_quotes_the_arguments_for_the_shell():
    argv = ["run", "--config", "configs/my preset.yaml", "--set", "name=a;b"]
    command = submit.entrypoint(argv)
    assert command.startswith("python -m pipelines run ")
    assert shlex.split(command) == ["python", "-m", "pipelines", *argv]


def test_runtime_env_uploads_the_code_but_not_venv_data_or_runs(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes  # how Ray applies `excludes` to the working dir

    env = submit.runtime_env(tmp_path, {"A": "1"})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"A": "1"}
    excluded = _get_excludes(tmp_path, env["excludes"])
    for dropped in [".venv", ".venv/lib/x.py", ".git", "data", "data/ring8-abc/part-0.parquet", "runs",
                    "runs/mlflow.db", "gan/__pycache__/x.pyc", "raygan.egg-info", ".pytest_cache"]:
        assert excluded(tmp_path / dropped), dropped
    for kept in ["gan/data/__init__.py", "gan/data/sources.py", "pipelines/cli.py", "configs/ring8.yaml",
                 "pyproject.toml", "pipelines/runs.py", ".gitignore"]:
        assert not excluded(tmp_path / kept), kept


def test_the_project_root_holds_pyproject():
    assert (submit.project_root() / "pyproject.toml").is_file()
    assert (submit.project_root() / "pipelines" / "submit.py").is_file()


@pytest.mark.parametrize(("pipeline", "message"), [
    ([], "no pipeline command: add it after `--`"),
    (["--"], "no pipeline command"),
    (["submit", "--", "run"], "`submit` cannot submit itself"),
    (["run", "--config", "configs/ring8.yaml", "--set", "optim.lr_g=-1"], "config error: optim.lr_g must be > 0"),
    (["run", "--config", "configs/ring8.yaml", "--set", "train.nosuchkey=1"], "config error: "),
    (["run", "--config", "configs/nope.yaml"], "config error: "),
    (["run"], "invalid pipeline command: run"),
    (["train"], "invalid pipeline command: train"),
])
def test_a_bad_pipeline_command_exits_2_before_contacting_any_cluster(pipeline, message, capsys):
    # An address nothing listens on: reaching it would be a connection error (exit 1), not 2.
    args = parse("--address", "http://127.0.0.1:9", *(["--"] if pipeline[:1] != ["--"] else []), *pipeline)
    assert submit.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_relative_config_is_read_from_the_working_dir(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("name: mine\ntrain: {kimg: -5}\n")
    args = parse("--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path), "--",
                 "run", "--config", "configs/mine.yaml")
    assert submit.main(args) == 2
    assert "train.kimg" in capsys.readouterr().err


def test_an_address_with_nothing_listening_is_a_clear_error(tmp_path):
    # A real client against a closed port (no cluster): exit 1 with a message, no traceback.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipelines", "submit", "--address", "http://127.0.0.1:9", "--",
                           "run", "--config", "configs/ring8.yaml"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_address_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.main(parse("--", "run", "--config", "configs/ring8.yaml")) == 2
    assert "no Ray cluster address" in capsys.readouterr().err


def test_auth_mode_token_without_a_token_exits_2_instead_of_crashing(monkeypatch, tmp_path, capsys):
    for var in ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_K8S_TOKEN_AUTH"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert submit.main(parse("--address", "http://127.0.0.1:9", "--", "run", "--config", "configs/ring8.yaml")) == 2
    err = capsys.readouterr().err
    assert "requires an authentication token" in err and f"{tmp_path}/.ray/auth_token" in err

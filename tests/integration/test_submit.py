"""`submit` against a real token-auth `ray start --head`: refused without the token, ring8 SUCCEEDED, Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path) -> dict[str, str]:
    """This shell's environment without Ray or MLflow settings, with a private HOME (so never the real ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _dashboard_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def ray_head():
    """A head on 127.0.0.1 in its own temp dir, HOME and process group; token auth on, as a default head has it
    once a token exists in ~/.ray/auth_token. Yields (dashboard URL, head HOME, token)."""
    # Ray's socket paths have a length limit: a short folder under /tmp, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="rgs-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    env = _clean_env(home)
    ray = str(VENV_BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    url = f"http://127.0.0.1:{(dashboard_port := _free_port())}"
    log = (root / "head.log").open("w")
    # --block keeps `ray start` in the foreground: ending its process group stops this head and nothing else
    # (`ray stop` would kill every Ray process of this user).
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         "--num-cpus=2", f"--temp-dir={root / 'ray'}", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _dashboard_status(url) is None:
            assert head.poll() is None, f"ray start exited {head.returncode}: {(root / 'head.log').read_text()}"
            assert time.monotonic() < deadline, f"dashboard not up after 120 s: {(root / 'head.log').read_text()}"
            time.sleep(1)
        yield url, home, token
    finally:
        for sig, wait in [(signal.SIGTERM, 30), (signal.SIGKILL, 10)]:
            if _group_alive(head.pid):
                os.killpg(head.pid, sig)
            deadline = time.monotonic() + wait
            while _group_alive(head.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
        head.wait(timeout=10)
        log.close()
        left = _group_alive(head.pid)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, "the Ray head left processes behind"


def _submit(home: Path, *args: str, extra_env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**_clean_env(home), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "pipelines", "submit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_submit_without_the_token_fails_fast_naming_what_to_set(ray_head, tmp_path):
    url, _, token = ray_head
    assert _dashboard_status(url) == 401, "the head must demand a token"
    pipeline = ["--", "run", "--config", "configs/ring8.yaml"]
    start = time.monotonic()
    missing = _submit(tmp_path, "--address", url, *pipeline)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "requires an authentication token" in missing.stderr
    assert "RAY_AUTH_TOKEN=" in missing.stderr and f"{tmp_path}/.ray/auth_token" in missing.stderr
    assert "Traceback" not in missing.stderr and "submitted" not in missing.stdout
    assert time.monotonic() - start < 45, "no token must fail fast, not after a timeout"

    wrong = _submit(tmp_path, "--address", url, *pipeline, extra_env={"RAY_AUTH_TOKEN": "not-" + token})
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "rejected the authentication token from RAY_AUTH_TOKEN" in wrong.stderr
    assert token not in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.timeout(420)
def test_submit_runs_ring8_to_succeeded_and_registers_the_model(ray_head, tmp_path):
    import mlflow

    url, home, _ = ray_head
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # HOME of the head: the token is found in ~/.ray/auth_token, the default place.
    proc = _submit(home, "--address", url, "--env", f"MLFLOW_TRACKING_URI={store}", "--timeout", "330",
                   "--", "run", "--config", "configs/ring8.yaml", "--set", "train.kimg=30",
                   "--set", "train.log_every_kimg=10", "--set", "train.checkpoint_every_kimg=30",
                   "--workdir", str(tmp_path / "runs"), timeout=390)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}\n{proc.stderr[-3000:]}"
    assert "[submit] job " in out and out.rstrip().endswith("SUCCEEDED")
    for line in ["[pipeline]", "[prepare]", "[train]", "[evaluate]"]:
        assert line in out, f"{line} missing from the streamed logs:\n{out[-4000:]}"

    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("ring8")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
    assert {"train", "evaluate"} <= {r.data.tags["stage"] for r in stages}
    assert all(r.info.status == "FINISHED" for r in stages)
    versions = client.search_model_versions("name='gan-ring8'")
    assert len(versions) == 1, f"expected one version of gan-ring8, got {[v.version for v in versions]}"


@pytest.mark.timeout(300)
def test_ctrl_c_leaves_the_job_running_and_says_how_to_stop_it(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url, home, token = ray_head
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "submit", "--address", url,
         "--env", f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'}",
         "--", "run", "--config", "configs/ring8.yaml", "--workdir", str(tmp_path / "runs")],
        cwd=REPO, env=_clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "[submit] job raysubmit_" in first, first + proc.stderr.read()
        job_id = first.split()[2]
        time.sleep(3)  # streaming the logs by now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert f"job {job_id} keeps running on the cluster" in err and "Traceback" not in err
    assert f"stop it with `RAY_AUTH_MODE=token ray job stop {job_id} --address {url}`" in err

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    assert client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING)
    client.stop_job(job_id)
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id) != JobStatus.STOPPED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.STOPPED

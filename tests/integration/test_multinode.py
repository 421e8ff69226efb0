"""A Ray cluster of several nodes with no shared disk: the pipeline on an S3-compatible bucket end to end, a lost
node survived, and a node without credentials named. The runs happen once, in their own process
(multinode_scenario.py); these tests check what they handed over and left in the bucket. Nodes on one machine
share one disk, so a leaked local path would still work here: the tests assert the locations themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]  # the scenario runs once, in the first test
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("multinode")
    out = work / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.multinode_scenario", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1400)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    result = json.loads(out.read_text()) if out.exists() else {}
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return result


def _locations(outputs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every stage output that names a place (folders, checkpoints), by `stage.key`."""
    return {f"{stage}.{k}": v for stage, out in outputs.items() for k, v in out.items()
            if isinstance(v, str) and (k.endswith("_dir") or "checkpoint" in k)}


def test_every_stage_hands_over_uris_under_the_storage_root(scenario):
    root = scenario["storage"].split("?")[0]
    places = _locations(scenario["search"]["outputs"])
    assert {"prepare.dataset_dir", "evaluator.evaluator_dir", "train.checkpoint_dir",
            "evaluate.checkpoint"} <= set(places), places
    outside = {k: v for k, v in places.items() if not v.startswith(f"{root}/")}
    assert not outside, f"stage outputs outside {root}: {outside}"
    assert all(v.endswith(f"?endpoint_override={scenario['endpoint']}") for v in places.values()), places


def test_the_bucket_holds_data_evaluator_checkpoints_tune_state_and_the_model(scenario):
    keys = scenario["search"]["keys"]

    def has(pattern: str) -> bool:
        return any(re.fullmatch(pattern, k) for k in keys)

    assert has(r"mn/data/digits-[0-9a-f]{16}/manifest\.json") and has(r"mn/data/digits-.*/train/part-00000\.parquet")
    assert has(r"mn/evaluators/digits-.*/evaluator\.json") and has(r"mn/evaluators/digits-.*/evaluator\.pt")
    assert has(r"mn/ray/mn-search-[0-9a-f]{16}/experiment_state-.*\.json"), "Tune's experiment state"
    assert has(r"mn/ray/mn-search-[0-9a-f]{16}/[0-9a-f]{5}_\d{5}/checkpoint_\d+/state\.pt"), "Tune's trial checkpoints"
    # Its single-worker trials train inside their Tune trial processes: no Train run, no Train checkpoint (the
    # lost-node run's Train checkpoints in the bucket are checked below).
    assert not has(r"mn/ray/mn-search-[0-9a-f]{16}-train/.*"), [k for k in keys if "-train/" in k]
    assert any(k.endswith("/MLmodel") for k in scenario["search"]["mlflow_keys"]), "the model in MLflow's artifacts"
    registered = scenario["search"]["registered"]
    assert registered["is_champion"] and registered["champion_uri"] == "models:/gan-digits-16px@champion"


def test_a_search_whose_driver_was_killed_resumes_from_tunes_state_in_the_bucket(scenario):
    search = scenario["search"]
    assert search["killed"]["trial_checkpoints"], "the driver was killed before any trial checkpointed"
    assert search["train_statuses"] == ["FINISHED", "KILLED"]
    # A fresh search would have made new trial ids (and trial runs); the restored one keeps its two.
    assert len(search["trial_runs"]) == 2, search["trial_runs"]
    assert any(max(steps) >= 30_000 for steps in search["trial_runs"].values()), search["trial_runs"]
    # A trial whose checkpoint Tune's last snapshot lists goes on from it in the bucket, not from its first images
    # (one killed a moment after its first checkpoint starts over: the snapshot had not listed it yet).
    restarts = [steps[i] for steps in search["trial_runs"].values() for i in range(1, len(steps))
                if steps[i] <= steps[i - 1]]
    assert restarts and max(restarts) > 1024, search["trial_runs"]
    assert search["registered"]["version"] == "1", "exactly one version registered"


def test_a_lost_node_is_survived_and_training_continues_from_the_bucket_checkpoint(scenario):
    lost = scenario["lost_node"]
    assert "error" not in lost, lost
    steps = lost["steps"]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])  # reports repeat after the loss
    print(f"image counter: {steps[restart - 1]} before the loss, {steps[restart]} at the first report after it "
          f"(checkpoints in the bucket then: {lost['checkpoints_at_removal']})")
    assert steps[restart] > lost["first_checkpoint_images"], "restarted from 0 instead of the bucket's checkpoint"
    assert max(steps) >= 40_000 and lost["registered"]["version"]
    assert lost["removed_node"] not in lost["worker_nodes_after"]
    assert lost["added_node"] in lost["worker_nodes_after"] and lost["rank0_node"] in lost["worker_nodes_after"]
    assert lost["checkpoint"].startswith(scenario["storage"].split("?")[0] + "/ray/mn-lost-")


def test_a_node_without_credentials_is_named_and_still_loads_the_champion_through_mlflow(scenario):
    case = scenario["no_credentials"]
    assert case["probe_error"] is not None, "the probe passed on a node with wrong credentials"
    assert f"node {case['node'][:12]}" in case["probe_error"] and "AWS_ACCESS_KEY_ID" in case["probe_error"]
    assert len(re.findall(r"node [0-9a-f]{12} \(", case["probe_error"])) == 1, "only that node fails"
    assert case["champion_shape"][0] == 2

"""The multi-node runs of test_multinode.py, in a process of their own (a Ray cluster of several raylets must not
meet the suite's shared `ray.init`): an S3-compatible server, an `mlflow server` whose artifacts go to the same
bucket, and a `ray.cluster_utils.Cluster` of a head and two worker nodes on this machine. It runs

1. the digits pipeline with a small ASHA search, everything under `--storage s3://...`: first through the CLI,
   killed once a trial has checkpointed, then run again, resuming the search from Tune's state in the bucket;
2. a 2-worker training pipeline whose rank-1 node is removed once its first checkpoint is in the bucket (a node
   is added back);
3. a node without bucket credentials: the storage probe must name it, and it must still load the champion from
   MLflow (artifacts are served through the tracking server),

and writes what it saw to a JSON file for the tests to check: `python -m tests.integration.multinode_scenario OUT`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ["RAY_AUTH_MODE"] = "disabled"  # a throw-away cluster on 127.0.0.1 in a process of its own
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Artifacts download through the tracking server: moto's IAM auth refuses the presigned URLs that MLflow 3 would
# otherwise hand out for an S3 artifact store (a real bucket accepts them; both need no credentials on the node).
os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] = "false"
# Tune snapshots its experiment state every second (default: every ~10 s), so that the killed search's state in the
# bucket already lists a trial checkpoint to resume from.
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from gan import storage  # noqa: E402
from gan.config_loader import load_config  # noqa: E402
from pipelines.storage_probe import check_storage  # noqa: E402
from pipelines.tracking import Tracker  # noqa: E402
from pipelines.workflow import run_pipeline  # noqa: E402
from tests.s3 import S3, s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PREFIX = "mn"
WORKER_NODE = {"num_cpus": 1, "resources": {"trainer": 1}}
SEARCH = ["name=mn-search", "data.resolution=16", "model.family=mlp", "model.hidden=[32]", "model.z_dim=16",
          "train.kimg=30", "train.log_every_kimg=1", "train.checkpoint_every_kimg=1", "train.fid_every_kimg=1",
          "tune.num_samples=2", "tune.grace_kimg=1", "scale.num_workers=1", "scale.cpus_per_worker=0.4",
          "eval.num_samples=300", "eval.evaluator_epochs=2"]
LOST_NODE = ["name=mn-lost", "data.num_samples=4000", "model.hidden=[64, 64]", "train.kimg=40",
             "train.log_every_kimg=4", "train.checkpoint_every_kimg=8", "scale.num_workers=2",
             "scale.cpus_per_worker=0.5", "scale.worker_resources={trainer: 1}"]
CHECKPOINT = re.compile(r"/checkpoint-(\d{12})/state\.pt$")
TRIAL_CHECKPOINT = re.compile(r"/[0-9a-f]{5}_\d{5}/checkpoint_\d+/state\.pt$")


def log(line: str) -> None:
    print(f"[scenario {time.strftime('%H:%M:%S')}] {line}", flush=True)


def start_mlflow(s3: S3, root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server`: SQLite backend, artifacts in the bucket, served through the server."""
    from tests.s3 import _free_port

    port = _free_port()
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         f"s3://{s3.bucket}/mlflow"], env=env, stdout=open(root / "mlflow.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not start: {(root / 'mlflow.log').read_text()[-2000:]}")


def stage_outputs(tracker: Tracker, experiment: str) -> dict[str, dict[str, Any]]:
    """The `outputs` tag (the stage cache) of every FINISHED stage run of an experiment, by stage."""
    runs = tracker.find_runs(experiment, {}, status="FINISHED")
    return {r.data.tags["stage"]: {**json.loads(r.data.tags["outputs"]),
                                   **{k: v for k, v in r.data.tags.items() if k in ("checkpoint", "best_checkpoint")}}
            for r in runs if "outputs" in r.data.tags}


def kill_search_mid_trial(cluster: Cluster, s3: S3, root: str, work: Path) -> dict[str, Any]:
    """`python -m pipelines run --storage ...` against the cluster, killed (the whole process group, as a lost
    driver) once a trial's first checkpoint is in the bucket; what Tune had stored by then."""
    cmd = [sys.executable, "-m", "pipelines", "run", "--config", "configs/quickstart.yaml", "--storage", root,
           "--workdir", str(work / "search"), *[a for o in SEARCH for a in ("--set", o)]]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    with open(work / "killed-search.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            found = [k for k in s3.keys(f"{PREFIX}/ray/mn-search-") if TRIAL_CHECKPOINT.search(k)]
            if found:
                break
            time.sleep(0.5)
        time.sleep(2)
        alive = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    log(f"killed the search's driver with {len(found)} trial checkpoint object(s) in the bucket")
    if not alive:
        raise RuntimeError(f"the search ended before it was killed: {(work / 'killed-search.log').read_text()[-3000:]}")
    # Ray ends a dead driver's tasks and actors; until it has, they could still write to the search's folder.
    keys, deadline = s3.keys(f"{PREFIX}/ray/"), time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(5)
        keys, before = s3.keys(f"{PREFIX}/ray/"), keys
        if keys == before:
            break
    return {"trial_checkpoints": found}


def search_runs(tracker: Tracker) -> dict[str, Any]:
    """The search's train stage runs (killed, then finished) and its trial runs (one per trial, reused on resume)."""
    trains = tracker.find_runs("mn-search", {"stage": "train"})
    trials = tracker.find_runs("mn-search", {"stage": "trial"})
    return {"train_statuses": sorted(r.info.status for r in trains),
            "trial_runs": {r.data.tags["trial_id"]: [m.step for m in tracker.metric_history(r.info.run_id,
                                                                                            "progress/kimg")]
                           for r in trials}}


def remove_rank_one_node(cluster: Cluster, s3: S3, tracker: Tracker, seen: dict[str, Any]) -> None:
    """Once the lost-node run's first checkpoint is in the bucket (and Train has had its 2 s poll to register it),
    removes the node that runs rank 1 and adds a fresh one."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = [int(m.group(1)) for k in s3.keys(f"{PREFIX}/ray/mn-lost-") if (m := CHECKPOINT.search(k))]
        if found:
            break
        time.sleep(0.5)
    else:
        seen["error"] = "no checkpoint appeared in the bucket"
        return
    time.sleep(5)
    train = tracker.find_runs("mn-lost", {"stage": "train"}, status="RUNNING")[0]
    nodes = json.loads(train.data.tags["ray.worker_nodes"])
    victim = next(n for n in cluster.worker_nodes if n.node_id == nodes[1])
    checkpoints = sorted(int(m.group(1)) for k in s3.keys(f"{PREFIX}/ray/mn-lost-") if (m := CHECKPOINT.search(k)))
    steps = [m.step for m in tracker.metric_history(train.info.run_id, "progress/kimg")]
    seen.update(first_checkpoint_images=checkpoints[0], checkpoints_at_removal=checkpoints, removed_node=nodes[1],
                rank0_node=nodes[0], train_run_id=train.info.run_id, images_before_removal=max(steps))
    log(f"removing rank 1's node {nodes[1][:12]} with checkpoints {checkpoints} in the bucket, at {max(steps)} images")
    cluster.remove_node(victim, allow_graceful=False)
    seen["added_node"] = cluster.add_node(env_vars=s3.env, **WORKER_NODE).node_id


@ray.remote(num_cpus=0)
def load_champion(tracking_uri: str, model_uri: str) -> list[int]:
    """On one node: the champion from MLflow (artifacts through the tracking server), and one sample's shape."""
    import torch

    served, shapes, _ = Tracker(tracking_uri).load_generator(model_uri)
    return list(served(torch.zeros(2, shapes[0][1])).shape)


def node_without_credentials(cluster: Cluster, root: str, mlflow_url: str, model_uri: str) -> dict[str, Any]:
    wrong = {"AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY00000", "AWS_SECRET_ACCESS_KEY": "wrong",
             "AWS_EC2_METADATA_DISABLED": "true"}
    node = cluster.add_node(num_cpus=1, env_vars=wrong)
    cluster.wait_for_nodes()
    out: dict[str, Any] = {"node": node.node_id}
    try:
        check_storage(root, log=log)
        out["probe_error"] = None
    except storage.StorageError as err:
        out["probe_error"] = str(err)
    strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    out["champion_shape"] = ray.get(load_champion.options(scheduling_strategy=strategy).remote(mlflow_url,
                                                                                               model_uri))
    cluster.remove_node(node)
    return out


def main(out_file: Path) -> None:
    work = out_file.parent
    result: dict[str, Any] = {}
    with s3_server(work) as s3:
        os.environ.update(s3.env)
        mlflow_proc, mlflow_url = start_mlflow(s3, work)
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_url
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": s3.env})
        try:
            for _ in range(2):
                cluster.add_node(env_vars=s3.env, **WORKER_NODE)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            root = s3.uri(PREFIX)
            tracker = Tracker(mlflow_url)
            result.update(storage=root, bucket=s3.bucket, endpoint=s3.endpoint, mlflow=mlflow_url)

            start = time.perf_counter()
            killed = kill_search_mid_trial(cluster, s3, root, work)
            search = run_pipeline(load_config(REPO / "configs/quickstart.yaml", SEARCH), work / "search",
                                  storage_root=root, log=log)
            result["search"] = {"seconds": time.perf_counter() - start, "registered": search["registered"],
                                "outputs": stage_outputs(tracker, "mn-search"), "keys": s3.keys(f"{PREFIX}/"),
                                "mlflow_keys": s3.keys("mlflow/"), "killed": killed, **search_runs(tracker)}

            # The pipeline runs beside this thread, which removes and adds nodes (Cluster needs the main thread).
            seen: dict[str, Any] = {}
            box: dict[str, Any] = {}
            lost_cfg = load_config(REPO / "configs/ring8.yaml", LOST_NODE)
            pipeline = threading.Thread(target=lambda: box.update(out=run_pipeline(
                lost_cfg, work / "lost", storage_root=root, log=log)), daemon=True)
            start = time.perf_counter()
            pipeline.start()
            remove_rank_one_node(cluster, s3, tracker, seen)
            pipeline.join(timeout=900)
            lost = box["out"]
            run_id = seen.get("train_run_id") or lost["trained"]["run_id"]
            result["lost_node"] = {
                **seen, "seconds": time.perf_counter() - start, "registered": lost["registered"],
                "steps": [m.step for m in tracker.metric_history(run_id, "progress/kimg")],
                "worker_nodes_after": json.loads(tracker.run(run_id).data.tags["ray.worker_nodes"]),
                "checkpoint": lost["trained"]["checkpoint_dir"]}
            result["no_credentials"] = node_without_credentials(cluster, root, mlflow_url,
                                                                search["registered"]["champion_uri"])
        finally:
            out_file.write_text(json.dumps(result, indent=2, default=str))
            ray.shutdown()
            cluster.shutdown()
            mlflow_proc.terminate()
            mlflow_proc.wait(timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

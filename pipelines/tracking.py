"""MLflow access for the whole project (the only module importing mlflow): runs, metrics, artifacts, retries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
RETRYABLE = ("database is locked", "database table is locked", "connection reset", "connection refused",
             "temporarily unavailable", "too many requests")


def default_tracking_uri(workdir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the work folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def with_retries(fn: Callable[[], T], *, attempts: int = 8, base_delay: float = 0.05,
                 also: tuple[str, ...] = ()) -> T:
    """Runs `fn`, retrying SQLite lock and transient HTTP errors (and errors containing any of `also`) with
    jittered exponential backoff.

    MLflow's REST client retries refused connections, resets before the response headers and 408/429/5xx itself
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR). It retries neither SQLite's locks, nor a
    reset while the response body is read, nor a database store (postgresql://...) refusing connections after
    start-up, so those stay here. An error saying MLflow's own retries ran out ("max retries exceeded") is final.
    """
    retryable = RETRYABLE + also
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps SQLAlchemy and requests errors in several types
            message = str(err).lower()
            if (attempt == attempts - 1 or not any(s in message for s in retryable)
                    or "max retries exceeded" in message):
                raise
            time.sleep(base_delay * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
"""Marks the experiment as model training for MLflow's APIs and UIs that read the kind (3.17's bundled UI picks its
GenAI or training view from a switch kept in the browser instead: `run_url` links select the training view)."""
SYSTEM_METRICS_INTERVAL_S = 5.0
"""How often a train run samples system/* metrics (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)."""
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetRef:
    """A prepared dataset as MLflow shows it: a run's input (its Datasets), and what evaluation metrics were
    measured against (the dataset beside each metric of a logged model)."""

    name: str
    """The dataset id (`digits-28-...`)."""
    digest: str
    """The prepared dataset's content hash (the manifest's `dataset_hash`)."""
    source: str
    """Where the shards are: a local folder or a URI (s3://...)."""
    profile: dict[str, Any] | None = None
    """Shown as the dataset's profile: counts per split, shape."""

    @property
    def mlflow_digest(self) -> str:
        """The hash as MLflow stores it (it refuses digests longer than 36 characters)."""
        return self.digest[:36]

    def entity(self) -> Dataset:
        scheme = self.source.split("://")[0] if "://" in self.source else "local"
        return Dataset(self.name, self.mlflow_digest, "local" if scheme == "file" else scheme,
                       json.dumps({"uri": self.source}), profile=json.dumps(self.profile) if self.profile else None)


class Tracker:
    """A handle on one MLflow store. Workers get (tracking_uri, run_id) and build their own."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created on first use (artifacts beside a SQLite store, not in ./mlruns)."""
        found = with_retries(lambda: self.client.get_experiment_by_name(name))
        if found is not None:
            # Experiments made before the kind tag, or left to the UI's guess, get it; a kind someone chose stays.
            kind = found.tags.get(EXPERIMENT_KIND, "")
            if not kind or kind.endswith("_inferred"):
                with_retries(lambda: self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND,
                                                                    EXPERIMENT_TAGS[EXPERIMENT_KIND]))
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
        try:
            return with_retries(lambda: self.client.create_experiment(name, artifact_location=location,
                                                                      tags=EXPERIMENT_TAGS))
        except Exception:
            # Another process created it between our lookup and create.
            found = with_retries(lambda: self.client.get_experiment_by_name(name))
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, experiment: str, run_name: str, *, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        exp_id = self.experiment_id(experiment)
        run = with_retries(lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags))
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            with_retries(lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, *, model_id: str | None = None,
                    dataset: DatasetRef | None = None) -> None:
        """Metrics of the run; with `model_id` also of that logged model (its columns on the experiment's Models
        tab), measured on `dataset` when given."""
        now = int(time.time() * 1000)
        linked = {"model_id": model_id, "dataset_name": dataset and dataset.name,
                  "dataset_digest": dataset and dataset.mlflow_digest}
        items = [Metric(k, float(v), now, step, **linked) for k, v in metrics.items()]
        with_retries(lambda: self.client.log_batch(run_id, metrics=items))

    def log_dataset(self, run_id: str, dataset: DatasetRef, context: str = "train") -> None:
        """The dataset as the run's input (the run's Datasets in the UI)."""
        item = DatasetInput(dataset.entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        with_retries(lambda: self.client.log_inputs(run_id, datasets=[item]))

    def set_note(self, run_id: str, markdown: str) -> None:
        """The run's description in the UI (markdown)."""
        self.set_tags(run_id, {MLFLOW_RUN_NOTE: markdown})

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        """MLflow's own monitor (the one `start_run(log_system_metrics=True)` starts) logging `system/*` metrics into
        `run_id` every `interval_s` while the block runs: CPU, memory, disk, network, and GPU when pynvml finds
        one. Needs psutil; without it the block runs unmonitored, with a warning. A resumed run continues the
        steps. The monitor also stops by itself once the run is no longer RUNNING."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                           tracking_uri=self.tracking_uri)
        except ImportError as err:
            logger.warning("no system metrics for run %s: %s", run_id, err)
            yield
            return
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries(lambda: self.client.log_batch(run_id, tags=items))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None,
                     name: str | None = None) -> None:
        """Uploads a file, optionally under another file name."""
        path = Path(path)
        if name is None or name == path.name:
            with_retries(lambda: self.client.log_artifact(run_id, str(path), artifact_path))
            return
        with tempfile.TemporaryDirectory() as tmp:
            renamed = Path(tmp) / name
            shutil.copyfile(path, renamed)
            with_retries(lambda: self.client.log_artifact(run_id, str(renamed), artifact_path))

    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self.set_tags(run_id, {"error": error[:5000]})
        with_retries(lambda: self.client.set_terminated(run_id, status))

    @contextlib.contextmanager
    def ending(self, run_id: str, failed: tuple[type[BaseException], ...] = (BaseException,)) -> Iterator[None]:
        """Ends the run FINISHED when the block completes, FAILED with the error as its `error` tag when the block
        raises one of `failed`; any other exception leaves it as it is."""
        try:
            yield
        except failed as err:
            self.end_run(run_id, "FAILED", error=f"{type(err).__name__}: {err}")
            raise
        self.end_run(run_id, "FINISHED")

    def run(self, run_id: str) -> Any:
        return with_retries(lambda: self.client.get_run(run_id))

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        return with_retries(lambda: self.client.get_metric_history(run_id, key))

    def artifact_paths(self, run_id: str, path: str | None = None) -> list[str]:
        return [a.path for a in with_retries(lambda: self.client.list_artifacts(run_id, path))]

    def download_artifact(self, run_id: str, path: str, dst_dir: str | Path) -> Path:
        return Path(with_retries(lambda: self.client.download_artifacts(run_id, path, str(dst_dir))))

    def find_runs(self, experiment: str, tags: dict[str, str], status: str | None = None) -> list[Any]:
        """Runs of `experiment` carrying all `tags` (and in `status` when given), newest first."""
        found = with_retries(lambda: self.client.get_experiment_by_name(experiment))
        if found is None:
            return []
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        return with_retries(lambda: self.client.search_runs(
            [found.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=50))

    # Registry: a trained network (a generator, an autoencoder's encoder and decoder, a classifier) as an MLflow
    # model, its versions and the champion alias.

    def log_model(self, run_id: str, module: Any, example_inputs: tuple[Any, ...], name: str = "generator",
                  metadata: dict[str, Any] | None = None, *, metrics: dict[str, float] | None = None,
                  dataset: DatasetRef | None = None, files: Sequence[str | Path] = (),
                  tags: dict[str, Any] | None = None, input_names: Sequence[str] = ("z", "y"),
                  output_name: str = "sample") -> str:
        """Logs a torch module with `mlflow.pytorch.log_model` (pt2, with a tensor signature taken from the example
        inputs, named `input_names`, and the module's output on them, named `output_name`) into `run_id`; returns the
        model URI (`models:/<model id>`). The defaults name a generator's inputs and output.

        `metrics` (measured on `dataset`) go to the run and to the logged model, `files` (a sample grid) among the
        model's artifacts, `tags` on the logged model: the experiment's Models tab lists and sorts by them."""
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        with torch.no_grad():
            output = module(*(torch.from_numpy(x) for x in example_inputs)).numpy()
        signature = ModelSignature(
            inputs=Schema([TensorSpec(x.dtype, (-1, *x.shape[1:]), n) for n, x in zip(input_names, example_inputs)]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *output.shape[1:]), output_name)]))
        # The fluent API logs into the active run; resuming ours ends it FINISHED on exit, and the stage sets the
        # final status afterwards anyway.
        with self._fluent_store(), mlflow.start_run(run_id=run_id):
            info = with_retries(lambda: mlflow.pytorch.log_model(
                module, name=name, signature=signature, input_example=example_inputs,
                serialization_format="pt2", pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata=metadata, tags={k: str(v) for k, v in (tags or {}).items()} or None))
        if metrics:
            self.log_metrics(run_id, metrics, step=0, model_id=info.model_id, dataset=dataset)
        for path in files:
            with_retries(lambda path=path: self.client.log_model_artifact(info.model_id, str(path)))
        return info.model_uri

    log_generator = log_model

    def load_model(self, model_uri: str) -> tuple[Any, list[tuple[int, ...]], dict[str, Any]]:
        """A logged or registered model (`models:/gan-mnist-28px@champion`, `models:/gan-mnist-28px/3`,
        `models:/<model id>`, `runs:/...`): the module, its input shapes from the signature, and its metadata."""
        import mlflow
        import mlflow.pytorch

        with self._fluent_store():
            info = with_retries(lambda: mlflow.models.get_model_info(model_uri))
            module = with_retries(lambda: mlflow.pytorch.load_model(model_uri))
        shapes = [tuple(spec.shape) for spec in info.signature.inputs.inputs]
        return module, shapes, dict(info.metadata or {})

    load_generator = load_model

    def register_model(self, model_uri: str, name: str, tags: dict[str, Any]) -> str:
        """A new version of registered model `name` (created on first use) with `tags`; returns the version."""
        import mlflow

        str_tags = {k: str(v) for k, v in tags.items()}
        with self._fluent_store():
            version = with_retries(lambda: mlflow.register_model(model_uri, name, tags=str_tags))
        return str(version.version)

    @contextlib.contextmanager
    def _fluent_store(self) -> Iterator[None]:
        """This store as the global one of MLflow's fluent API for the block. set_tracking_uri also exports
        MLFLOW_TRACKING_URI, which would send every later default_tracking_uri() of this process (and the Ray
        workers it starts) to this store: both are put back."""
        import mlflow

        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)

    def model_versions(self, name: str) -> list[Any]:
        return with_retries(lambda: self.client.search_model_versions(f"name='{name}'"))

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` points at, or None."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None  # no such model, or no such alias
            raise

    def set_alias(self, name: str, alias: str, version: str) -> None:
        # The store replaces an alias by delete + insert: two writers at once collide on its unique key.
        with_retries(lambda: self.client.set_registered_model_alias(name, alias, version),
                     also=("unique constraint", "duplicate entry"))

    def set_version_description(self, name: str, version: str, markdown: str) -> None:
        with_retries(lambda: self.client.update_model_version(name, version, description=markdown))

    def set_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            with_retries(lambda k=k, v=v: self.client.set_model_version_tag(name, version, k, str(v)))

    def run_url(self, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
        """The run's page in the model training view (MLflow 3.17's UI otherwise opens on the GenAI view it keeps in
        the browser, whatever the experiment's kind tag says)."""
        info = self.run(run_id).info
        base = self.tracking_uri if self.tracking_uri.startswith("http") else ui
        return f"{base.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{run_id}?workflowType=machine_learning"

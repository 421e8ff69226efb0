"""A search trial's training when it needs one worker: inside its Tune trial process, with no TorchTrainer, worker
group or Ray Data pipeline of its own (Tune starts nothing else and reuses the process for the next trial); and
where any trial's time goes (TrialClock)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import pipelines
from gan.config import Config
from gan.data import Manifest, keep_labels, load_manifest
from gan.data.batches import epoch_seed, shuffled
from gan.data.labelled import LabelledPool
from gan.device import prepare_process
from gan.loop import DataSpec, fit
from pipelines import ray_train_worker

Send = Callable[[dict[str, Any], "str | None"], None]
"""(metrics, checkpoint folder or None) -> None: hands a report to Tune (raises SystemExit when Tune stops the
trial); the folder is deleted once it returns."""

PHASES = ("startup", "train", "checkpoint", "score", "report", "teardown")
"""A trial's lifetime, in order: start-up (from the trial's start, or its process's when it is the first trial there,
to its first step), training steps (data included), saving checkpoints and sample grids, in-training scoring,
reporting (MLflow, Tune, copying checkpoints to storage, waiting on Ray Train), and teardown (after its last report)."""

_trials_in_process = 0


def trial_start() -> float:
    """When the calling trial started: now, or for a process's first trial, when the process loaded this package."""
    global _trials_in_process
    _trials_in_process += 1
    return pipelines.LOADED_AT if _trials_in_process == 1 else time.time()


class TrialClock:
    """Splits a trial's lifetime into PHASES from the cumulative `time/*` seconds its reports carry (the loop's
    steps, checkpoint and report times, the scorer's time/score_s) and the moments reports arrive and return."""

    def __init__(self, started: float):
        self.started = started
        self.first_step: float | None = None
        self.last: dict[str, Any] = {}
        self.last_done: float | None = None

    def report_arrived(self, metrics: dict[str, Any]) -> None:
        """A report came in (before anything this side does with it)."""
        if self.first_step is None:
            before = sum(float(metrics.get(f"time/{k}_s", 0.0)) for k in ("steps", "checkpoint", "score"))
            self.first_step = time.time() - before

    def report_done(self, metrics: dict[str, Any]) -> None:
        """That report was handled; `metrics` are its final values (with the current score's time)."""
        self.last, self.last_done = metrics, time.time()

    def summary(self) -> dict[str, float]:
        """trial_time/<phase>_s for every phase and trial_time/total_s, the lifetime they add up to, as of now
        (named apart from the cumulative time/*_s of the reports, which the same MLflow run holds)."""
        now = time.time()
        life = now - self.started
        spent = dict.fromkeys(PHASES, 0.0)
        if self.first_step is None or self.last_done is None:
            spent["startup"] = life
        else:
            spent.update({"startup": self.first_step - self.started, "teardown": now - self.last_done,
                          "train": float(self.last.get("time/steps_s", 0.0)),
                          "checkpoint": float(self.last.get("time/checkpoint_s", 0.0)),
                          "score": float(self.last.get("time/score_s", 0.0))})
            spent["report"] = max(0.0, life - sum(spent.values()))
        return {"trial_time/total_s": life, **{f"trial_time/{p}_s": spent[p] for p in PHASES}}


def trains_in_trial(cfg: Config, manifest: Manifest) -> bool:
    """Whether a search's trials train inside their Tune trial processes: one worker each, and a training split
    that fits in `data.cache_mb` (it is handed to every trial through the object store). Otherwise each trial
    runs a TorchTrainer, whose workers stream the split with Ray Data."""
    return cfg.scale.num_workers == 1 and manifest.count("train") * manifest.row_bytes <= cfg.data.cache_mb * 2**20


def train_in_trial(cfg: Config, split: tuple[np.ndarray, np.ndarray | None], *, dataset_dir: str,
                   evaluator_dir: str | None, tracking: ray_train_worker.Tracking, resume: Any, send: Send,
                   clock: TrialClock) -> None:
    """Trains one trial's config on `split` (the training split's x and y) in this process, on its GPU when
    scale.use_gpu, scoring, logging and checkpointing like a Ray Train worker of rank 0; `resume` is Tune's
    checkpoint (the trial's own, or after a PBT exploit a better trial's) or None."""
    manifest = load_manifest(dataset_dir)
    device = torch.device("cuda" if cfg.scale.use_gpu else "cpu")
    autocast_dtype = prepare_process(cfg, device)
    x, y = split
    labelled = None
    if cfg.model.semi_supervised:
        labelled = LabelledPool.from_split(x, y, labels=cfg.model.labels, seed=cfg.train.seed, scale=manifest.scale)
        y = keep_labels(y, cfg.model.labels, cfg.train.seed)
    scores = None
    if cfg.train.scores:
        scores = ray_train_worker.InTrainingScores(cfg, 0, 1, dataset_dir, evaluator_dir, device=device)
    report = ray_train_worker.WorkerReport(0, tracking, scores, send=send, progress=False)

    def timed_report(metrics: dict[str, float], checkpoint_dir: str | None) -> bool:
        clock.report_arrived(metrics)
        try:
            return report(metrics, checkpoint_dir)
        finally:
            clock.report_done(report.last)

    batches = ray_train_worker.model_batches(
        lambda e: shuffled(x, y, cfg.train.batch_size, epoch_seed(cfg.train.seed, e, 0)), manifest.scale)
    resume_dir = ray_train_worker.local_resume(resume, cfg) if resume is not None else None
    try:
        with report.monitoring():
            fit(cfg, batches, spec=DataSpec.from_manifest(manifest), report=timed_report, resume=resume_dir,
                wrap=ray_train_worker.model_wrapper(cfg, device, data_parallel=False), device=device,
                autocast_dtype=autocast_dtype, labelled=labelled)
        report.finish()
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)

"""Pipelines registering at the same moment against a real `mlflow server` end with one champion: the best."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from gan.export import served_generator
from pipelines.model_registry import CHALLENGER, CHAMPION, elect_champion, version_tags
from pipelines.tracking import Tracker

pytestmark = pytest.mark.integration
FIDS = [40.0, 25.0, 31.0, 12.0, 18.0, 50.0]


class _Points(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def forward(self, z, y=None):
        return self.net(z)


def _register(uri: str, model_uri: str, name: str, fid: float, barrier) -> None:
    tracker = Tracker(uri)
    barrier.wait(timeout=60)
    version = tracker.register_model(model_uri, name, version_tags({"eval/fid_2k": fid}, evaluator_id="ev"))
    elect_champion(tracker, name, version)


def test_concurrent_registrations_converge_on_the_best_champion(mlflow_server):
    tracker = Tracker(mlflow_server)
    served = served_generator(_Points(), z_dim=4, points=True, scale=1.0, conditional=False, num_classes=0)
    model_uri = tracker.log_generator(tracker.start_run("registry-race", "log"), served, served.example_inputs())
    name = "gan-race"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(FIDS))
    procs = [ctx.Process(target=_register, args=(mlflow_server, model_uri, name, fid, barrier)) for fid in FIDS]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * len(FIDS)

    versions = {str(v.version): v.tags for v in tracker.model_versions(name)}
    assert len(versions) == len(FIDS)
    champion = tracker.alias_version(name, CHAMPION)
    assert float(versions[champion]["score"]) == min(FIDS)
    assert CHALLENGER not in versions[champion]

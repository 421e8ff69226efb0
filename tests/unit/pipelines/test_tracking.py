"""Tracker.ending: how a run ends is decided in one place, against a real SQLite MLflow store; and retries."""

import os
import socket
import struct
import threading

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipelines.tracking import Tracker, default_tracking_uri, with_retries


def test_a_run_ends_finished_failed_with_its_error_or_stays_running(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ok, bad, stopped = (tracker.start_run("t", name) for name in ("ok", "bad", "stopped"))
    with tracker.ending(ok):
        pass
    with pytest.raises(ValueError), tracker.ending(bad):
        raise ValueError("lr too high")
    with pytest.raises(SystemExit), tracker.ending(stopped, failed=(Exception,)):
        raise SystemExit(0)  # what tune.report raises in a trial Tune stops
    assert tracker.run(ok).info.status == "FINISHED"
    assert tracker.run(bad).info.status == "FAILED" and tracker.run(bad).data.tags["error"] == "ValueError: lr too high"
    assert tracker.run(stopped).info.status == "RUNNING"


def test_with_retries_covers_a_reset_mid_response_that_mlflow_does_not_retry(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        """Resets the first two connections after the headers; then answers "no such experiment"."""
        while len(connections) < 3:
            conn, _ = server.accept()
            connections.append(conn)
            conn.recv(65536)
            if len(connections) < 3:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = MlflowClient(f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        with pytest.raises(Exception, match="Connection reset"):
            client.get_experiment_by_name("x")
        assert len(connections) == 1  # MLflow's own HTTP retry let it through
        assert with_retries(lambda: client.get_experiment_by_name("x"), base_delay=0.001) is None
        assert len(connections) == 3
    finally:
        server.close()
        thread.join(5)


def test_with_retries_does_not_repeat_retries_mlflow_has_run_out_of():
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded with url: "
                              "/api/2.0/mlflow/runs/get (Caused by NewConnectionError: Connection refused)")

    with pytest.raises(ConnectionError, match="Max retries exceeded"):
        with_retries(refused, base_delay=0)
    assert len(calls) == 1


def test_logging_a_generator_leaves_the_process_default_store_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    module = torch.nn.Linear(4, 2)
    tracker.log_generator(tracker.start_run("default-store", "register"), module, (np.zeros((1, 4), np.float32),))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert default_tracking_uri(tmp_path / "other") == f"sqlite:///{(tmp_path / 'other').resolve() / 'mlflow.db'}"

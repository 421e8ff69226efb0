"""Screenshots of the MLflow UI over a store (the quickstart's by default): `mlflow ui` on 127.0.0.1 and headless
Chromium, one PNG per page a user chooses a generator on (the experiment's runs, its pipeline run, its Models tab,
the registered model and its champion version), written under docs/.

Chromium's --screenshot flag cannot click or scroll, and MLflow 3.17's UI opens with its assistant panel over a
quarter of the page and the Models tab's metric columns scrolled out of view; so the browser is driven through its
DevTools protocol (a websocket, with aiohttp, which Ray already installs)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from pipelines.model_registry import CHAMPION
from pipelines.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TRAINING_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI picks GenAI or model training from a switch it keeps in the browser (GenAI first), not from the
experiment's `mlflow.experimentKind` tag; this query parameter selects the training view."""
CLOSE_ASSISTANT = """document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]')?.click()"""
EXPAND_PIPELINE_RUN = """document.querySelector('[data-component-id*="runnamecellrenderer"]')?.click()"""
SCROLL_TO_FID = """(async () => {
  // The grid renders only the columns in view: scroll right until the FID column exists, then bring it to the left.
  const viewport = document.querySelector('.ag-body-horizontal-scroll-viewport');
  const fid = () => document.querySelector(`.ag-header-cell[col-id*='"metricKey":"eval/fid_']`);
  while (viewport && !fid() && viewport.scrollLeft + viewport.clientWidth < viewport.scrollWidth) {
    viewport.scrollLeft += viewport.clientWidth / 2;
    await new Promise(r => setTimeout(r, 200));
  }
  if (viewport && fid()) viewport.scrollLeft = parseInt(fid().style.left);
  return Boolean(fid());
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` over the store, once its /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", tracking_uri], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow ui did not answer /health in 90 s")


def pages(tracker: Tracker, experiment: str, model: str | None) -> list[tuple[str, str, str, str]]:
    """(file name, the UI's route, a text the page shows once loaded, a script to run then), for the newest pipeline
    run and the current champion of `model` (default: the model that pipeline registered)."""
    found = tracker.client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracker.tracking_uri}: run `make run` first")
    exp_id = found.experiment_id
    runs = tracker.find_runs(experiment, {"stage": "pipeline"}, status="FINISHED")
    if not runs:
        raise SystemExit(f"no finished pipeline run in experiment {experiment!r}")
    run = runs[0]
    if model is None:
        model = tracker.run(run.data.tags["stage.register"]).data.tags["model_name"]
    champion = tracker.alias_version(model, CHAMPION)
    if champion is None:
        raise SystemExit(f"registered model {model!r} has no {CHAMPION} alias")
    name = run.info.run_name
    experiment_page = f"/#/experiments/{exp_id}"
    return [("ui-experiment.png", f"{experiment_page}/runs?{TRAINING_VIEW}", name, EXPAND_PIPELINE_RUN),
            ("ui-pipeline-run.png", f"{experiment_page}/runs/{run.info.run_id}?{TRAINING_VIEW}", "at registration", ""),
            ("ui-models.png", f"{experiment_page}/models?{TRAINING_VIEW}", "Registered models", SCROLL_TO_FID),
            ("ui-registered-model.png", f"/#/models/{model}?{TRAINING_VIEW}", f"Version {champion}", ""),
            ("ui-champion-version.png", f"/#/models/{model}/versions/{champion}?{TRAINING_VIEW}", "at registration",
             "")]


class Browser:
    """Headless Chromium driven over its DevTools protocol: navigate, wait for a text, run a script, capture."""

    def __init__(self, executable: str, width: int, height: int):
        self.profile = tempfile.TemporaryDirectory(prefix="ui-screenshots-")
        self.proc = subprocess.Popen([executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError(f"{executable} did not start its DevTools endpoint")
        self.size = (width, height)
        self.ids = 0

    async def __aenter__(self) -> Browser:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.profile.cleanup()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.ids:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, script: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{script[:80]}...: {result['result'].get('description')}")
        return result["result"].get("value")

    async def capture(self, url: str, text: str, script: str, out: Path, timeout_s: float = 45) -> None:
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(f"document.body !== null && document.body.innerText.includes({text!r})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not show {text!r} in {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
        await self.evaluate(CLOSE_ASSISTANT)
        await asyncio.sleep(1.0)  # the panel's animation, late requests
        if script:
            if await self.evaluate(script) is False:
                raise RuntimeError(f"{url}: the page is not as expected (the script returned false)")
            await asyncio.sleep(1.0)
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


async def capture_all(browser: str, base: str, routes: list[tuple[str, str, str, str]], out: Path,
                      size: tuple[int, int]) -> None:
    async with Browser(browser, *size) as b:
        for name, route, text, script in routes:
            start = time.perf_counter()
            await b.capture(base + route, text, script, out / name)
            print(f"{out / name}: {route} ({time.perf_counter() - start:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'runs' / 'mlflow.db'}",
                   help="the store to show (default: the quickstart's, runs/mlflow.db)")
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--model", help="the registered model (default: the one the newest pipeline run registered)")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--size", default="1600,1000", help="the page's width,height in pixels")
    args = p.parse_args(argv)

    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install -y chromium")
    routes = pages(Tracker(args.tracking_uri), args.experiment, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ui = start_ui(args.tracking_uri, port, Path(tmp) / "mlflow-ui.log")
        try:
            width, height = (int(v) for v in args.size.split(","))
            asyncio.run(capture_all(browser, f"http://127.0.0.1:{port}", routes, args.out, (width, height)))
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

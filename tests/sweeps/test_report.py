"""The sweep report: verdict first, the baseline never best, rendered HTML, importances only
from enough trials; and the report and optuna-dashboard opened in a real headless chromium."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from PIL import Image

from sweeps.confirm import confirm_name
from sweeps.objective import artifact_store
from sweeps.report import best_trials, importances, write_report
from sweeps.storage import default_url, open_storage
from sweeps.study import BASELINE, ROLE

ROOT = Path(__file__).resolve().parents[2]
DIST = {"ppc.tau": FloatDistribution(0.01, 1.0, log=True)}


def _overlays(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4 * 16, 2 * 16), (shade, 0, 0)).save(path)
    return path


def _add(study: optuna.Study, store, value: float, attrs: dict, png: Path,
         params: dict | None = None) -> None:
    """A finished trial with its overlays as an Optuna artifact (uploaded while running)."""
    if params:
        study.enqueue_trial(params)
    trial = study.ask(DIST if params else None)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if params:
        trial.report(value / 2, 2)
        trial.report(value, 4)
    optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(png),
                                     study_or_trial=trial)
    study.tell(trial, value)


def _study(tmp_path: Path, n: int = 3) -> optuna.Study:
    """A stored study: a baseline that scores highest, n search trials, a confirm study."""
    url = default_url(tmp_path, "r")
    study = optuna.create_study(storage=open_storage(url, None), study_name="r",
                                direction="maximize")
    study.set_metric_names(["final CAM mIoU"])
    store = artifact_store(tmp_path, "r")
    base_dir = tmp_path / "r/baseline/seed_0"
    _add(study, store, 0.9, {
        ROLE: BASELINE, "best_run_dir": str(base_dir), "cam_miou_per_seed": [0.88, 0.92],
        "pseudo_miou_per_seed": [0.5, 0.5], "wandb_runs": ["ppc/base1", "ppc/base2"]},
        _overlays(base_dir / "overlays.png", 200))
    for i in range(n):
        run_dir = tmp_path / f"r/trial_{i + 1}/seed_0"
        value = 0.3 + 0.05 * (i % 4) + 0.001 * i
        _add(study, store, value, {
            "best_run_dir": str(run_dir), "cam_miou_per_seed": [value, value],
            "pseudo_miou_per_seed": [0.4, 0.4], "wandb_runs": [f"ppc/run{i}"]},
            _overlays(run_dir / "overlays.png", 40 + i), {"ppc.tau": 0.02 + 0.05 * i})
    confirm = optuna.create_study(storage=study._storage, study_name=confirm_name("r"),
                                  direction="maximize")
    confirm.set_user_attr("splits", {"selected_on": "val", "confirmed_on": "test"})
    for seed, (b, a) in enumerate([(0.30, 0.33), (0.31, 0.35), (0.29, 0.31)], start=2):
        for arm, v in ((BASELINE, b), ("trial-4", a)):
            confirm.add_trial(create_trial(value=v, user_attrs={
                ROLE: "confirm", "arm": arm, "seed": seed, "eval_split": "test",
                "cam_miou_per_seed": [v],
                "pseudo_miou_per_seed": [v / 2]}))
    return study


def test_report_leads_with_the_verdict_and_renders_html(tmp_path: Path) -> None:
    study = _study(tmp_path)
    assert best_trials(study)[0].number == 3  # the highest search trial, never the baseline
    report = write_report(study, tmp_path / "report")
    text = report.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## Verdict") and sections[1].startswith("## Baseline vs best")
    # d = 0.03, 0.04, 0.02: mean 0.03, sd 0.01, t(0.975, 2) 4.3027 -> +-0.0248
    assert "| trial-4 | 3 | 0.3300 ± 0.0200 | +0.0300 [+0.0052, +0.0548] | **better** |" in text
    assert "Selected on split `val`, confirmed on split `test`" in text
    assert "| baseline (CAM only) | 0 | 0.9000 ± 0.0283 | 2 |" in text
    assert "ppc/base1 ppc/base2" in text  # W&B runs of each arm
    assert "need at least 10 complete trials" in text and "PED-ANOVA" in text
    page = (tmp_path / "report/index.html").read_text()
    assert "<pre>" not in page and page.count("<table>") >= 3 and "<img" in page
    assert "|---" not in page and "![" not in page and "## " not in page
    for png in ("history", "slice", "best_overlays", "baseline_overlays"):
        assert f'src="{png}.png"' in page and (tmp_path / f"report/{png}.png").stat().st_size


def test_importances_only_from_ten_complete_trials(tmp_path: Path) -> None:
    study = _study(tmp_path / "a", n=9)
    imps, why = importances(study)
    assert imps == {} and "this study has 9" in why
    study = _study(tmp_path / "b", n=10)
    imps, why = importances(study)
    assert why == "" and set(imps) == {"ppc.tau"}


# ---------------------------------------------------------------------------- real browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,1600"]


class Chromium:
    """Headless chromium driven over the DevTools protocol (one page)."""

    def __init__(self, binary: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        url = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
        self.ws = websocket.create_connection(url, timeout=60)
        self.calls = 0

    def call(self, method: str, **params):
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.calls:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str, until: str, timeout: float = 90) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.eval(f"document.readyState === 'complete' && ({until})"):
            assert time.monotonic() < deadline, f"{url}: timed out waiting for {until}"
            time.sleep(0.25)

    def images(self) -> list[list]:
        return self.eval("Array.from(document.images).map(i => [i.getAttribute('src'), "
                         "i.complete && i.naturalWidth > 0])")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def chromium(tmp_path: Path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium: `make chromium-bin` installs Debian's (as root)")
    pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives chromium")
    browser = Chromium(binary, Path(tempfile.mkdtemp(dir=tmp_path)))
    yield browser
    browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_report_and_dashboard_in_a_real_browser(tmp_path: Path, chromium: Chromium) -> None:
    study = _study(tmp_path)
    write_report(study, tmp_path / "report")
    chromium.open((tmp_path / "report/index.html").as_uri(), "document.images.length > 0")
    images = chromium.images()
    assert len(images) >= 6 and all(ok for _, ok in images), images
    text = chromium.eval("document.body.innerText")
    for source in ("|---", "![", "## ", "**"):
        assert source not in text, f"markdown source {source!r} visible"
    assert "better" in text and chromium.eval("document.querySelectorAll('pre').length") == 0
    chromium.screenshot(tmp_path / "report.png")

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "dashboard", "--study", "r", "--root",
         str(tmp_path), "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no dashboard"
                time.sleep(0.25)
        # the study page names the metric, not "Objective Value"
        chromium.open(base, "document.body.innerText.includes('final CAM mIoU')")
        chromium.screenshot(tmp_path / "dashboard.png")
        # the trial list shows the selected trial's overlay artifact as an image
        chromium.open(f"{base}/trials", "document.images.length > 0")
        time.sleep(1)
        images = chromium.images()
        assert images and all(ok for _, ok in images), images
        chromium.screenshot(tmp_path / "dashboard_trials.png")
    finally:
        server.terminate()
        server.wait(20)

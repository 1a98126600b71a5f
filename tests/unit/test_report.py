"""The model report (`mlapi report`, infra/ops/report.py) from a real service's data: its training data as
`python -m app reference` prints it and its prediction log as `python -m app predictions --format jsonl` exports it,
rendered by Evidently in its own venv (.venv-report), then opened in headless Chromium: the charts are drawn and the
console has no error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.export import reference_lines
from tests.support.service import admin_headers, ingest_headers, record
from tests.support.shims import installed_tool

ROOT = Path(__file__).resolve().parents[2]
REPORT_PYTHON = ROOT / ".venv-report" / "bin" / "python"
EXAMPLES = ROOT / "examples"


def report_python() -> str:
    if not REPORT_PYTHON.exists():
        pytest.fail("the report's venv is missing: `make .venv-report` (make test and make check build it)")
    return str(REPORT_PYTHON)


def spool(client: TestClient, directory: Path) -> tuple[Path, Path]:
    """What `mlapi report` spools from a replica: the reference and the prediction log."""
    dataset = client.app.state.service.dataset
    reference = directory / "reference.jsonl"
    reference.write_text("".join(reference_lines(dataset.name, dataset.schema, dataset.X, dataset.y)))
    client.app.state.service.prediction_log.flush()
    exported = client.get("/admin/predictions?format=jsonl&since=0", headers=admin_headers())
    assert exported.status_code == 200, exported.text
    predictions = directory / "predictions.jsonl"
    predictions.write_text(exported.text)
    return reference, predictions


def render(reference: Path, predictions: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [report_python(), "-m", "infra.ops.report", str(reference), str(predictions), str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def opened_in_chromium(page: Path, directory: Path, screenshot: bool = True) -> tuple[str, str]:
    """The page's DOM after its scripts ran, and Chromium's log (console messages included); with ``screenshot``, a
    screenshot beside (report.png), which must not be blank."""
    chromium = installed_tool("chromium", "chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--window-size=1400,5000",
             f"--user-data-dir={directory / 'profile'}"]  # fmt: skip
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    (directory / "report.dom.html").write_text(dom.stdout)  # what a failure message cannot show
    log = dom.stderr
    if screenshot:
        shot = subprocess.run(
            [chromium, *flags, f"--screenshot={directory / 'report.png'}", page.as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert (directory / "report.png").stat().st_size > 50_000, "the screenshot is (nearly) blank"
        log += shot.stderr
    return dom.stdout, log


def visible_text(dom: str) -> str:
    """What the page shows: the DOM's text without scripts and styles (the report's data is also inside a script)."""
    shown = re.sub(r"<(script|style).*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", shown))


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and re.search(r"error|Uncaught", line, re.I)]


def test_a_regression_report_shows_drift_quality_and_coverage_in_chromium(client: TestClient, tmp_path: Path) -> None:
    dataset = client.app.state.service.dataset
    rows = np.random.default_rng(7).choice(len(dataset), 160, replace=False)
    answers = []
    for i, row in enumerate(rows):  # training rows, the last 80 with bmi far beyond them: the drift to show
        features = dict(zip(dataset.feature_names, map(float, dataset.X[row]), strict=True))
        answers.append(client.post("/predict", json={"features": features | ({"bmi": 0.2} if i >= 80 else {})}).json())
    observations = [{"prediction_id": a["prediction_id"], "target": a["prediction"] + 5.0} for a in answers[:40]]
    assert (
        client.post("/observations", headers=ingest_headers(), json={"observations": observations}).status_code == 201
    )
    reference, predictions = spool(client, tmp_path)
    output = tmp_path / "report.html"
    rendered = render(reference, predictions, output)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    found = json.loads(rendered.stdout)
    assert found["model"] == "diabetes" and found["predictions"] == 160 and found["with_ground_truth"] == 40
    assert found["training_rows"] == len(client.app.state.service.dataset)
    assert "bmi" in found["drifted"] and "age" not in found["drifted"]
    covered = [a["interval"]["lower"] <= a["prediction"] + 5.0 <= a["interval"]["upper"] for a in answers[:40]]
    assert found["coverage"] == pytest.approx(sum(covered) / 40, abs=1e-3)
    dom, log = opened_in_chromium(output, tmp_path)
    shown = visible_text(dom)
    assert "Drift: recent predictions against the training data" in shown and "Drifted Columns" in shown
    assert "Quality on the 40 predictions whose ground truth arrived" in shown and "MAE" in shown
    assert "Mean value of 'within_interval'" in shown  # the conformal interval's coverage
    assert dom.count("main-svg") >= 5, "the charts (Plotly's SVGs) were not drawn"
    assert console_errors(log) == []


def test_a_classification_report_of_a_project_with_categories_and_gaps(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    penguins = make_client(model_project=EXAMPLES / "penguins")
    birds = [
        {"island": "Biscoe", "bill_length_mm": 47.5, "bill_depth_mm": 15.0, "flipper_length_mm": 215,
         "body_mass_g": None, "sex": None, "year": 2009},
        {"island": "Dream", "bill_length_mm": 39.0, "bill_depth_mm": 18.5, "flipper_length_mm": 190,
         "body_mass_g": 3700, "sex": "female", "year": 2008},
    ]  # fmt: skip
    answers = [penguins.post("/predict", json={"features": birds[i % 2]}).json() for i in range(30)]
    truth = [
        {"prediction_id": a["prediction_id"], "target": ("Gentoo", "Adelie")[i % 2]} for i, a in enumerate(answers)
    ]
    assert penguins.post("/observations", headers=ingest_headers(), json={"observations": truth}).status_code == 201
    reference, predictions = spool(penguins, tmp_path)
    output = tmp_path / "report.html"
    rendered = render(reference, predictions, output)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    found = json.loads(rendered.stdout)
    assert found["model"] == "penguins" and found["with_ground_truth"] == 30 and found["coverage"] is None
    dom, log = opened_in_chromium(output, tmp_path, screenshot=False)
    shown = visible_text(dom)
    assert "Quality on the 30 predictions whose ground truth arrived" in shown and "Accuracy" in shown
    assert "island" in shown and dom.count("main-svg") >= 3
    assert console_errors(log) == []


def test_predictions_of_another_project_are_refused_naming_the_window(client: TestClient, tmp_path: Path) -> None:
    client.post("/predict", json={"features": record()})
    reference, predictions = spool(client, tmp_path)
    other = tmp_path / "other.jsonl"
    lines = reference.read_text().splitlines()
    head = json.loads(lines[0]) | {"features": {"island": "category"}}
    other.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    refused = render(other, predictions, tmp_path / "report.html")
    assert refused.returncode == 1 and "another model project; narrow --since" in refused.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused = render(reference, empty, tmp_path / "report.html")
    assert refused.returncode == 1 and "no prediction was logged in that window" in refused.stderr
    assert sys.executable != report_python()  # the report runs in its own venv, never the service's

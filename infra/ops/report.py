"""`mlapi report`: the model report, an HTML page rendered with Evidently on the operator's machine, from what a
replica hands over: the served project's training data (`python -m app reference`) and the recent prediction log with
the ground truth that arrived (`python -m app predictions --format jsonl`).

Two Evidently reports on one page:
- **drift**: each feature, recent predictions against the training data, and ``answer``: the distribution of the
  recent answers beside the training target's (a regression's predictions are narrower than its targets, so its
  drift flag says less than the two histograms);
- **quality** on the predictions whose ground truth arrived: a regression's errors and how often the observation fell
  inside the conformal interval (``within_interval``: its mean is the coverage), a classification's accuracy,
  precision and recall.

Evidently needs pandas < 3 and the service pins 3, so this module runs in a venv of its own (`make .venv-report`):
``python -m infra.ops.report REFERENCE PREDICTIONS OUTPUT``. It imports nothing else from this repository; Evidently
stays off the VM and out of the model image.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ANSWER = "answer"  # the prediction (regression) or the label (classification); the target in the training data
OBSERVED = "observed"
COVERED = "within_interval"  # 1 when the observation fell inside the conformal interval, 0 when not (regression)
CATEGORICAL = {"category", "boolean"}


class ReportError(ValueError):
    """The inputs cannot make a report; the message says which file and why."""


@dataclass(frozen=True)
class ReportData:
    model: str
    task: str
    numeric: list[str]
    categorical: list[str]
    reference: pd.DataFrame  # the training rows: features and ANSWER (the target)
    current: pd.DataFrame  # the logged predictions: features, ANSWER, OBSERVED, time (and lower, upper)

    @property
    def observed(self) -> pd.DataFrame:
        return self.current[self.current[OBSERVED].notna()]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def report_data(reference: Path, predictions: Path) -> ReportData:
    """The two files as data frames with the same feature columns; ReportError naming what is wrong."""
    lines = read_json_lines(reference)
    if not lines or "features" not in lines[0] or "task" not in lines[0]:
        raise ReportError(f"{reference}: not the output of `python -m app reference` (no schema on its first line)")
    head, training = lines[0], lines[1:]
    types: dict[str, str] = head["features"]
    logged = read_json_lines(predictions)
    if not logged:
        raise ReportError("no prediction was logged in that window: widen --since, or send some predictions first")
    if set(logged[-1]["features"]) != set(types):
        raise ReportError(
            f"the logged predictions have features {sorted(logged[-1]['features'])}, the served model's training "
            f"data {sorted(types)}: the window holds predictions of another model project; narrow --since"
        )
    names = list(types)
    answer_key = "label" if head["task"] == "classification" else "prediction"
    reference_frame = pd.DataFrame(
        [{**row["features"], ANSWER: row["target"]} for row in training], columns=[*names, ANSWER]
    )
    current_frame = pd.DataFrame(
        [
            {**row["features"], ANSWER: row[answer_key], OBSERVED: row["observed"], "time": row["time"],
             "lower": row.get("lower"), "upper": row.get("upper")}
            for row in logged
        ]
    )  # fmt: skip
    current_frame["time"] = pd.to_datetime(current_frame["time"])
    numeric = [name for name in names if types[name] not in CATEGORICAL]
    categorical = [name for name in names if types[name] in CATEGORICAL]
    for frame in (reference_frame, current_frame):
        for name in categorical:  # one spelling per category across both frames (True and "True" are one)
            frame[name] = frame[name].map(lambda value: None if value is None else str(value))
    if head["task"] == "regression":
        observed = current_frame[OBSERVED].astype(float)
        inside = (current_frame["lower"].astype(float) <= observed) & (observed <= current_frame["upper"].astype(float))
        current_frame[COVERED] = inside.astype(float).where(observed.notna())
    return ReportData(head["model"], head["task"], numeric, categorical, reference_frame, current_frame)


def render(data: ReportData, output: Path) -> dict[str, Any]:
    """Write the HTML report; what it found, for the command line (rows, drifted columns)."""
    from evidently import BinaryClassification, DataDefinition, Dataset, MulticlassClassification, Regression, Report
    from evidently.core.metric_types import render_widgets
    from evidently.legacy.renderers.html_widgets import group_widget
    from evidently.metrics import MeanValue
    from evidently.presets import ClassificationPreset, DataDriftPreset, RegressionPreset

    regression = data.task == "regression"
    answer_numeric = [ANSWER] if regression else []
    drift_definition = DataDefinition(
        numerical_columns=[*data.numeric, *answer_numeric],
        categorical_columns=[*data.categorical, *([] if regression else [ANSWER])],
    )
    columns = [*data.numeric, *data.categorical, ANSWER]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Evidently's and scikit-learn's notes on small samples
        drift = Report([DataDriftPreset()]).run(
            Dataset.from_pandas(data.current[columns], data_definition=drift_definition),
            Dataset.from_pandas(data.reference[columns], data_definition=drift_definition),
        )
        groups = [group_widget(title="Drift: recent predictions against the training data", widgets=drift._widgets)]
        observed = data.observed
        if len(observed) >= 2:
            if regression:
                definition = DataDefinition(
                    numerical_columns=[*data.numeric, ANSWER, OBSERVED, COVERED],
                    categorical_columns=data.categorical,
                    regression=[Regression(target=OBSERVED, prediction=ANSWER)],
                )
                metrics = [RegressionPreset(), MeanValue(column=COVERED)]
            else:
                # Evidently treats the labels present as the task: two of them need its binary form.
                present = sorted(set(observed[ANSWER].astype(str)) | set(observed[OBSERVED].astype(str)))
                task = (
                    BinaryClassification(target=OBSERVED, prediction_labels=ANSWER, pos_label=present[-1])
                    if len(present) == 2
                    else MulticlassClassification(target=OBSERVED, prediction_labels=ANSWER)
                )
                definition = DataDefinition(
                    numerical_columns=data.numeric,
                    categorical_columns=[*data.categorical, ANSWER, OBSERVED],
                    classification=[task],
                )
                metrics = [ClassificationPreset()]
            frame = observed.drop(columns=["time", "lower", "upper"])
            quality = Report(metrics).run(Dataset.from_pandas(frame, data_definition=definition), None)
            title = f"Quality on the {len(observed)} predictions whose ground truth arrived"
            groups.append(group_widget(title=title, widgets=quality._widgets))
    output.write_text(render_widgets(groups))
    return {
        "model": data.model,
        "predictions": len(data.current),
        "with_ground_truth": len(observed),
        "training_rows": len(data.reference),
        "drifted": drifted_columns(drift.dict()["metrics"]),
        "coverage": round(float(observed[COVERED].mean()), 3) if regression and len(observed) else None,
    }


def drifted_columns(metrics: list[dict[str, Any]]) -> list[str]:
    """The columns Evidently's drift tests flagged: a p-value below the threshold, or a distance at or above it."""
    drifted = []
    for metric in metrics:
        config = metric.get("config", {})
        if not config.get("type", "").endswith(":ValueDrift"):
            continue
        value, threshold = metric["value"], config["threshold"]
        if (value < threshold) if "p_value" in config["method"] else (value >= threshold):
            drifted.append(config["column"])
    return drifted


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m infra.ops.report REFERENCE.jsonl PREDICTIONS.jsonl OUTPUT.html", file=sys.stderr)
        return 2
    reference, predictions, output = (Path(arg) for arg in argv)
    try:
        found = render(report_data(reference, predictions), output)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

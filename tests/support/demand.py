"""A small regression project whose data comes from a URL: daily demand over temperature and weekday, as CSV bytes
to serve (tests of https:// and s3:// data)."""

from __future__ import annotations

import csv
import hashlib
import io

import numpy as np

PROJECT = """[model]
name = "demand"
task = "regression"
target = "demand"
data = "{url}"
{more}
[features]
temperature = "number"
weekday = {{ type = "category", values = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] }}
"""
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def demand_csv(n_rows: int, seed: int = 0, order: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    rows = [
        [
            round(15 + 10 * np.sin(i / 20) + rng.normal(), 3),
            DAYS[i % 7],
            round(200 + 8 * (15 + 10 * np.sin(i / 20)) + rng.normal(0, 5), 3),
        ]
        for i in range(n_rows)
    ]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["temperature", "weekday", "demand"])
    writer.writerows(rows if order is None else [rows[i] for i in order])
    return out.getvalue().encode()


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()

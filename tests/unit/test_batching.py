"""Concurrent single-row predictions share model calls (app/batching.py) without changing any answer."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes

from app.batching import MicroBatcher
from app.main import create_app
from app.settings import Settings
from tests.support.service import FEATURES

REQUESTS = 48
T = TypeVar("T")


def run_in_own_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Like asyncio.run, without leaving the main thread with no current event loop (asyncio.run sets it to None,
    and later code that asks for the current loop, as Pulumi's mocks do, then fails)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def coalesced(metrics_text: str) -> tuple[float, float]:
    """(model calls, rows) of mlapi_predict_coalesced_rows."""
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics_text.splitlines()
        if line.startswith("mlapi_predict_coalesced_rows_")
    }
    return values["mlapi_predict_coalesced_rows_count"], values["mlapi_predict_coalesced_rows_sum"]


def test_concurrent_predictions_share_model_calls_and_equal_the_record_path(tmp_path: Path) -> None:
    rows = load_diabetes().data[:REQUESTS]
    rows[0, 2] = 0.5  # far outside the training range of bmi: this one is flagged out of distribution
    records = [dict(zip(FEATURES, row.tolist(), strict=True)) for row in rows]
    confidences = [0.9 if i % 3 else 0.95 for i in range(REQUESTS)]

    async def run() -> tuple[list[dict], dict[float, dict], tuple[float, float]]:
        app = create_app(Settings(data_dir=tmp_path, holdout_seed=42))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answers = await asyncio.gather(
                    *(
                        client.post("/predict", json={"features": r, "confidence": c})
                        for r, c in zip(records, confidences, strict=True)
                    )
                )
                by_record_path = {
                    c: (await client.post("/predict/batch", json={"records": records, "confidence": c})).json()
                    for c in (0.9, 0.95)
                }
                metrics = (await client.get("/metrics")).text
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        return [a.json() for a in answers], by_record_path, coalesced(metrics)

    singles, batches, (calls, coalesced_rows) = run_in_own_loop(run())
    assert coalesced_rows == REQUESTS
    assert calls <= 4, f"{REQUESTS} concurrent requests took {calls:g} model calls"  # one per confidence, ideally
    assert len({s["prediction_id"] for s in singles}) == REQUESTS
    for i, (single, confidence) in enumerate(zip(singles, confidences, strict=True)):
        expected = batches[confidence]["predictions"][i]
        assert single["model_version"] == batches[confidence]["model_version"]
        assert single["interval"]["confidence"] == confidence
        # The same model on the same row; a matrix product over more rows may sum in another order.
        for got, want in (
            (single["prediction"], expected["prediction"]),
            (single["interval"]["lower"], expected["interval"]["lower"]),
            (single["interval"]["upper"], expected["interval"]["upper"]),
        ):
            assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
        assert single["out_of_distribution"] == expected["out_of_distribution"]
    assert singles[0]["out_of_distribution"]["flag"] and not singles[1]["out_of_distribution"]["flag"]


class Refused(Exception):
    pass


def batcher(calls: list[tuple[list[float], float]], **kwargs) -> MicroBatcher:
    """Rows are one number each; the answer is the number doubled; a negative number fails its call."""

    def predict_rows(X: np.ndarray, confidence: float) -> list[float]:
        calls.append((X[:, 0].tolist(), confidence))
        if (X < 0).any():
            raise ValueError("negative row")
        if np.isnan(X).any():
            raise Refused("not ready")
        return (X[:, 0] * 2).tolist()

    return MicroBatcher(predict_rows, lambda result, n: [result[i] for i in range(n)], **kwargs)


def gather(coalescer: MicroBatcher, values: list[tuple[float, float]]) -> list[object]:
    async def run() -> list[object]:
        return await asyncio.gather(*(coalescer.predict(np.array([[v]]), c) for v, c in values), return_exceptions=True)

    return run_in_own_loop(run())


def test_rows_of_other_confidences_go_into_their_own_calls_in_order() -> None:
    calls: list = []
    answers = gather(batcher(calls), [(1, 0.9), (2, 0.95), (3, 0.9), (4, 0.9)])
    assert answers == [2, 4, 6, 8]
    assert calls == [([1, 3, 4], 0.9), ([2], 0.95)]


def test_a_row_that_fails_the_shared_call_fails_alone() -> None:
    calls: list = []
    answers = gather(batcher(calls), [(1, 0.9), (-1, 0.9), (3, 0.9)])
    assert answers[0] == 2 and answers[2] == 6
    assert isinstance(answers[1], ValueError)
    assert calls[0] == ([1, -1, 3], 0.9) and sorted(calls[1:]) == [([-1], 0.9), ([1], 0.9), ([3], 0.9)]


def test_an_error_every_row_would_meet_is_given_to_all_without_retrying_each() -> None:
    calls: list = []
    answers = gather(batcher(calls, shared_errors=(Refused,)), [(1, 0.9), (float("nan"), 0.9), (3, 0.9)])
    assert all(isinstance(a, Refused) for a in answers)
    assert len(calls) == 1


def test_no_call_holds_more_rows_than_the_limit() -> None:
    calls: list = []
    answers = gather(batcher(calls, max_rows=4), [(v, 0.9) for v in range(10)])
    assert answers == [2 * v for v in range(10)]
    assert [len(rows) for rows, _ in calls] == [4, 4, 2]


def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    calls: list = []
    coalescer = batcher(calls)

    async def run() -> list[object]:
        first = asyncio.ensure_future(coalescer.predict(np.array([[1.0]]), 0.9))
        second = asyncio.ensure_future(coalescer.predict(np.array([[2.0]]), 0.9))
        await asyncio.sleep(0)  # both queued; the call has not run yet
        first.cancel()
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = run_in_own_loop(run())
    assert isinstance(first, asyncio.CancelledError) and second == 4


def test_start_up_freezes_its_long_lived_objects_out_of_the_collector(tmp_path: Path) -> None:
    """A full collection over start-up's objects stalls requests for ~100 ms (docs/benchmarks.md, g)."""
    import gc

    gc.unfreeze()
    app = create_app(Settings(data_dir=tmp_path, holdout_seed=42))

    async def run() -> int:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    frozen = run_in_own_loop(run())
    gc.unfreeze()  # the rest of the test session collects as usual
    assert frozen > 50_000  # scikit-learn, SciPy and the model: about 160k objects


def test_a_flood_goes_back_to_the_loop_between_model_calls() -> None:
    """Ten model calls' worth of rows waiting: a /health-like coroutine scheduled after them runs after the first
    call, not after the tenth (it used to wait for the whole queue: Traefik's 1 s check then dropped the replica)."""
    calls: list[str] = []

    def predict_rows(X: np.ndarray, confidence: float) -> list[float]:
        calls.append("model")
        return [float(x) for x in X[:, 0]]

    async def run() -> None:
        batcher = MicroBatcher(predict_rows, lambda result, n: [[r] for r in result], max_rows=10, max_waiting=100)
        flood = [asyncio.ensure_future(batcher.predict(np.array([[float(i)]]), 0.9)) for i in range(100)]

        async def health() -> None:
            calls.append("health")

        await asyncio.sleep(0)  # the flood is queued and its drain task started
        await asyncio.gather(health(), *flood)

    run_in_own_loop(run())
    assert calls.count("model") == 10
    assert calls.index("health") <= 1, calls


def test_more_rows_waiting_than_allowed_are_refused_at_once() -> None:
    from app.batching import Overloaded

    async def run() -> list[object]:
        batcher = MicroBatcher(lambda X, c: list(X[:, 0]), lambda r, n: [[v] for v in r], max_rows=5, max_waiting=20)
        return await asyncio.gather(
            *(batcher.predict(np.array([[float(i)]]), 0.9) for i in range(30)), return_exceptions=True
        )

    answers = run_in_own_loop(run())
    refused = [a for a in answers if isinstance(a, Overloaded)]
    assert len(refused) == 10 and all(not isinstance(a, Exception) for a in answers[:20])
    assert "20 predictions are waiting (at most 20)" in str(refused[0])


def test_an_overloaded_replica_answers_503_with_retry_after_and_keeps_health(tmp_path: Path) -> None:
    """One row per model call and 8 waiting at most: a burst of 60 gets some 503s with Retry-After at once, every
    other answer is a prediction, and /health answers while it lasts (its latency printed, never asserted)."""
    record = dict(zip(FEATURES, load_diabetes().data[0].tolist(), strict=True))

    async def run() -> tuple[list[httpx.Response], float]:
        app = create_app(Settings(data_dir=tmp_path, holdout_seed=42, max_coalesced_rows=1))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                flood = [asyncio.ensure_future(client.post("/predict", json={"features": record})) for _ in range(60)]
                await asyncio.sleep(0)
                started = asyncio.get_running_loop().time()
                health = await client.get("/health")
                health_ms = (asyncio.get_running_loop().time() - started) * 1000
                assert health.status_code == 200
                return await asyncio.gather(*flood), health_ms

    answers, health_ms = run_in_own_loop(run())
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 503], statuses
    busy = [a for a in answers if a.status_code == 503]
    assert all(a.headers["retry-after"] == "1" and "overloaded" in a.text for a in busy)
    print(f"\n/health under a burst of 60 one-row predictions: {health_ms:.1f} ms; {len(busy)} answered 503")

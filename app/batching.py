"""Single-row predictions that arrive together share one model call.

A scikit-learn ``predict`` on one row costs about as much as on eight: input validation, not arithmetic, dominates a
small call (docs/benchmarks.md). Under concurrent load, the rows waiting while the model runs go into the next call
together. Nothing ever waits for a batch to fill: an idle server calls the model at once with one row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)
R = TypeVar("R")


class Overloaded(RuntimeError):
    """More single-row predictions are waiting than the replica takes: answered 503 with Retry-After, at once,
    instead of queueing without bound while /health waits behind them (Traefik would then drop the replica)."""


@dataclass(frozen=True)
class _Waiting:
    row: np.ndarray
    confidence: float
    answer: asyncio.Future


class MicroBatcher(Generic[R]):
    """Coalesces concurrent ``predict(row, confidence)`` calls into ``predict_rows(X, confidence)`` calls.

    ``predict_rows`` returns one result for all of X; ``split(result, n)`` cuts it into n one-row results in row
    order. Rows with different confidences go into separate calls. If a shared call fails for any other reason than
    one every row would meet (``shared_errors``), each row is tried alone, so one row's failure stays its own.

    The call runs on the event loop, blocking it for one model call of at most ``max_rows`` rows: requests that
    arrive meanwhile wait in the socket buffers and are read together next turn (the next call). Handing each call to
    the thread pool instead cost 20 % of the throughput at 8 connections (docs/benchmarks.md).
    """

    def __init__(
        self,
        predict_rows: Callable[[np.ndarray, float], R],
        split: Callable[[R, int], list[R]],
        max_rows: int = 256,
        shared_errors: tuple[type[Exception], ...] = (),
        on_batch: Callable[[int], None] = lambda rows: None,
        max_waiting: int | None = None,
    ) -> None:
        """``max_waiting``: rows that may wait at once (default 8 calls' worth); one more raises Overloaded."""
        self._predict_rows, self._split = predict_rows, split
        self._max_rows, self._shared_errors, self._on_batch = max_rows, shared_errors, on_batch
        self._max_waiting = max_waiting if max_waiting is not None else 8 * max_rows
        self._waiting: list[_Waiting] = []
        self._draining: asyncio.Task | None = None

    async def predict(self, row: np.ndarray, confidence: float) -> R:
        if len(self._waiting) >= self._max_waiting:
            raise Overloaded(f"{len(self._waiting)} predictions are waiting (at most {self._max_waiting})")
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(row, confidence, answer))
        if self._draining is None:
            # A task, not a call: it first runs after the requests already read in this turn of the loop have
            # queued their rows too.
            self._draining = asyncio.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_rows], self._waiting[self._max_rows :]
                by_confidence: dict[float, list[_Waiting]] = {}
                for waiting in batch:
                    by_confidence.setdefault(waiting.confidence, []).append(waiting)
                for confidence, group in by_confidence.items():
                    await self._answer(group, confidence)
                    # Back to the loop between model calls: /health, the readiness probe and the answers already
                    # computed go out before the next call, however many rows wait.
                    await asyncio.sleep(0)
        finally:
            self._draining = None

    async def _answer(self, group: list[_Waiting], confidence: float) -> None:
        try:
            self._on_batch(len(group))
            X = np.vstack([waiting.row for waiting in group])
            results = self._split(self._predict_rows(X, confidence), len(group))
        except Exception as exc:
            if isinstance(exc, self._shared_errors) or len(group) == 1:
                for waiting in group:
                    _settle(waiting.answer, exception=exc)
                return
            log.warning("a call for %d rows failed; predicting each row alone", len(group), exc_info=True)
            for waiting in group:
                await self._answer([waiting], confidence)
            return
        for waiting, result in zip(group, results, strict=True):
            _settle(waiting.answer, result=result)


def _settle(answer: asyncio.Future, result: object = None, exception: BaseException | None = None) -> None:
    if answer.done():  # the request was cancelled (client gone): nobody reads this answer
        return
    if exception is not None:
        answer.set_exception(exception)
    else:
        answer.set_result(result)

"""Predictions: one record (coalesced with concurrent ones), a batch of records, a batch of columns."""

import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.batching import Overloaded
from app.columns import parse_columns
from app.limits import MAX_ERRORS
from app.predlog import PredictionBatch
from app.routes.common import (
    AnswerResponse,
    Service,
    body_errors,
)
from app.schemas import (
    BatchResponse,
    ClassificationBatchResponse,
    ClassificationResponse,
    PredictResponse,
    RequestSchemas,
)
from app.service import ModelService, NotReady, Prediction
from app.settings import Settings

log = logging.getLogger(__name__)


def not_ready(exc: NotReady) -> HTTPException:
    log.warning("prediction refused, model not ready: %s", exc)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "model not ready")


def overloaded(exc: Overloaded) -> HTTPException:
    log.warning("prediction refused: %s", exc)
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, "overloaded: too many predictions waiting", headers={"Retry-After": "1"}
    )


def prediction_ids(count: int, now_ms: int | None = None) -> list[str]:
    """``count`` UUIDs of version 7 (RFC 9562, as hex): the time in milliseconds first, so the log's primary key
    grows at its end (inserting a 10,000-row batch: 33 ms, against 69 ms with random version 4 ids), then the row's
    index in the call, so a call's ids sort in its order; 12 random bits per call and 40 per row. One read of the OS's
    randomness for all of them (uuid.uuid4() per row cost a 10,000-row batch 33 ms)."""
    if count == 0:
        return []
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    raw = np.frombuffer(os.urandom(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, :6] = np.frombuffer(now_ms.to_bytes(6, "big"), dtype=np.uint8)  # unix_ts_ms
    raw[:, 6] = 0x70 | (raw[0, 6] & 0x0F)  # the version, 7, and the call's 12 random bits (rand_a), shared by its rows
    raw[:, 7] = raw[0, 7]
    index = np.arange(count, dtype=">u4").view(np.uint8).reshape(count, 4)
    raw[:, 8] = 0x80 | (index[:, 1] & 0x3F)  # the variant (RFC 9562), then the row's index: 22 bits
    raw[:, 9:11] = index[:, 2:4]
    text = raw.tobytes().hex()
    return [text[i : i + 32] for i in range(0, 32 * count, 32)]


def record_predictions(
    service: ModelService,
    X: np.ndarray,
    result: Prediction,
    confidence: float,
    route: str,
    started: float,
    log_wait_s: float = 0.0,
) -> PredictionBatch:
    """Every answered row logged (under a new prediction id) and counted; what was logged, for the answer. A row
    without a finite answer refuses the whole call: inside the accepted ranges it should not happen, and a null or a
    500 is never an answer. ``log_wait_s``: how long a call off the event loop may wait for the log."""
    finite = np.isfinite(result.points) & np.isfinite(result.lower) & np.isfinite(result.upper)
    if not finite.all():
        bad = np.flatnonzero(~finite)[:MAX_ERRORS].tolist()
        raise RequestValidationError(
            [{"type": "value_error", "loc": ["body", i], "msg": "these inputs give no finite prediction"} for i in bad]
        )
    latency_ms = (time.perf_counter() - started) * 1000 / len(X)
    now = time.time()
    ids = prediction_ids(len(X), int(now * 1000))
    flags = np.fromiter((bool(reasons) for reasons in result.ood), dtype=bool, count=len(X))
    batch = PredictionBatch(
        ids,
        np.full(len(X), now),
        result.version,
        X,
        result.points,
        result.lower,
        result.upper,
        confidence,
        flags,
        latency_ms,
    )
    service.prediction_log.record(batch, log_wait_s)
    service.metrics.predictions.labels(route).inc(len(X))
    flagged = int(flags.sum())
    if flagged:
        service.metrics.ood.inc(flagged)
    return batch


def answer(service: ModelService, result: Prediction, logged: PredictionBatch) -> tuple[str, list[dict[str, Any]]]:
    """The response items for a prediction whose rows ``logged`` holds (record_predictions: ids, confidence)."""
    ids, confidence = logged.ids, logged.confidence
    if result.probabilities is not None and result.sets is not None:
        return result.version, classified(ids, result, confidence, service.dataset.schema.classes)
    points, lower, upper = logged.prediction.tolist(), logged.lower.tolist(), logged.upper.tolist()
    # Plain dicts, not response models: for a 10k-row batch, building and re-validating 10k pydantic
    # objects cost more than the prediction itself (see docs/benchmarks.md). The shape is PredictionResult's.
    items: list[dict[str, Any]] = []
    for i, reasons in enumerate(result.ood):
        flagged = [reason.__dict__ for reason in reasons]
        items.append(
            {
                "prediction_id": ids[i],
                "prediction": points[i],
                "interval": {"lower": lower[i], "upper": upper[i], "confidence": confidence},
                "out_of_distribution": {"flag": bool(flagged), "reasons": flagged},
            }
        )
    return result.version, items


def classified(ids: list[str], result: Prediction, confidence: float, classes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Classification items, in ClassificationResult's shape: label, probabilities per class, the conformal set."""
    assert result.probabilities is not None and result.sets is not None
    probabilities, members = result.probabilities.tolist(), result.sets.tolist()
    labels = result.points.astype(int).tolist()
    items = []
    for i, reasons in enumerate(result.ood):
        flagged = [reason.__dict__ for reason in reasons]
        items.append(
            {
                "prediction_id": ids[i],
                "label": classes[labels[i]],
                "probabilities": dict(zip(classes, probabilities[i], strict=True)),
                "prediction_set": [label for label, member in zip(classes, members[i], strict=True) if member],
                "confidence": confidence,
                "out_of_distribution": {"flag": bool(flagged), "reasons": flagged},
            }
        )
    return items


def batch_answer(service: ModelService, X: np.ndarray, confidence: float, route: str) -> JSONResponse:
    started = time.perf_counter()
    try:
        result = service.predict(X, confidence)
    except NotReady as exc:
        raise not_ready(exc) from exc
    logged = record_predictions(service, X, result, confidence, route, started, service.settings.log_wait_s)
    version, items = answer(service, result, logged)
    # Serialized directly; `response_model=BatchResponse` still documents the shape in OpenAPI.
    return AnswerResponse({"model_version": version, "predictions": items})


def predict_router(settings: Settings, schemas: RequestSchemas, feature_names: tuple[str, ...]) -> APIRouter:
    router = APIRouter()
    classification = schemas.schema.task == "classification"
    one_response = ClassificationResponse if classification else PredictResponse
    batch_response = ClassificationBatchResponse if classification else BatchResponse
    answers = "label, class probabilities, conformal prediction set" if classification else "prediction, interval"

    @router.post(
        "/predict",
        responses=body_errors(settings),
        response_model=one_response,
        tags=["public"],
        summary=f"One record → {answers} at the requested confidence, out-of-distribution flag.",
    )
    async def predict(body: schemas.predict, request: Request, service: Service) -> JSONResponse:  # type: ignore[valid-type]
        # On the event loop: the request's own work is small, and a thread hop per request cost more than it did.
        X, started = schemas.rows([body.features]), time.perf_counter()
        try:
            result = await request.app.state.coalesce.predict(X, body.confidence)
        except NotReady as exc:
            raise not_ready(exc) from exc
        except Overloaded as exc:
            raise overloaded(exc) from exc
        version, items = answer(
            service, result, record_predictions(service, X, result, body.confidence, "predict", started)
        )
        return AnswerResponse({"model_version": version, **items[0]})  # the shape of PredictResponse, unvalidated

    @router.post(
        "/predict/batch",
        responses=body_errors(settings),
        response_model=batch_response,
        tags=["public"],
        summary=f"Many records in one call (at most {settings.max_batch_rows}).",
    )
    def predict_batch(body: schemas.batch, service: Service) -> JSONResponse:  # type: ignore[valid-type]
        return batch_answer(service, schemas.rows(body.records), body.confidence, "predict_batch")

    def columns_answer(body: bytes, service: ModelService) -> JSONResponse:
        X, confidence = parse_columns(body, schemas)
        return batch_answer(service, X, confidence, "predict_columns")

    @router.post(
        "/predict/columns",
        responses={
            **body_errors(settings),
            422: {
                "description": "a value outside its feature's range, columns that do not name each feature once, "
                "rows of the wrong length",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
            },
        },
        response_model=batch_response,
        tags=["public"],
        summary=f"Many rows in columnar form (at most {settings.max_batch_rows}): the cheapest way to send a batch.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schemas.columns.model_json_schema()}},
            }
        },
    )
    async def predict_columns(request: Request, service: Service) -> JSONResponse:
        # The raw body, parsed by pydantic-core from bytes (app/columns.py), off the event loop.
        return await run_in_threadpool(columns_answer, await request.body(), service)

    return router

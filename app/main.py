"""FastAPI application: public prediction routes and the private /admin routes."""

import gc
import hmac
import logging
import math
import socket
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.concurrency import run_in_threadpool

from app.batching import MicroBatcher
from app.columns import parse_columns
from app.data import load_dataset
from app.lifecycle import DRAINING
from app.limits import MAX_ERRORS, BodyLimit, public_errors
from app.metrics import BackupStatus, ServiceMetrics
from app.predlog import PredictionRecord, StorageFull, StoreUnavailable
from app.registry import RegistryError, RetrainBusy
from app.schemas import (
    BatchResponse,
    ObservationsResponse,
    PredictResponse,
    RollbackRequest,
    build_request_schemas,
)
from app.service import ModelService, NotReady, Prediction
from app.settings import Settings, get_settings
from app.stores import load_token

log = logging.getLogger(__name__)
bearer = HTTPBearer(auto_error=False)


def _json_safe(value: Any) -> Any:
    """Echoed input may hold NaN or infinity, which JSON cannot carry: spell those out."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = public_errors(list(exc.errors()))
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": _json_safe(jsonable_encoder(errors, custom_encoder={float: _json_safe}))},
    )


async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    """The log store (PostgreSQL) is away: nothing was stored, and the client may retry. The reason goes to the
    log only: it names hosts."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "the prediction log store is unavailable; nothing was stored: try again"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    dataset = load_dataset(settings.dataset, settings.target_column)
    feature_names = dataset.feature_names
    schemas = build_request_schemas(dataset, settings)
    metrics_registry = CollectorRegistry()
    metrics = ServiceMetrics(metrics_registry)
    metrics_registry.register(BackupStatus(settings.data_dir / "backup-status.json"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = ModelService(settings, metrics)
        service.start()
        # Start-up leaves ~160k long-lived objects (scikit-learn, SciPy, the model). A full collection scans them all
        # (~100 ms on these machines) and stalls whichever requests are in flight: frozen, it scans only newer ones.
        gc.collect()
        gc.freeze()
        app.state.service = service
        app.state.coalesce = MicroBatcher(
            service.predict,
            Prediction.rows,
            max_rows=settings.max_coalesced_rows,
            shared_errors=(NotReady,),
            on_batch=metrics.coalesced_rows.observe,
        )
        app.state.admin_token = load_token(settings, "admin")
        app.state.ingest_token = load_token(settings, "ingest")
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="mlapi",
        description="Regression predictions with conformal prediction intervals and out-of-distribution flags.",
        version="1.0.0",
        lifespan=lifespan,
        exception_handlers={RequestValidationError: validation_error, StoreUnavailable: store_unavailable},
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    Instrumentator(registry=metrics_registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=True
    )

    async def service_of(request: Request) -> ModelService:  # async: no thread hop for a lookup
        return request.app.state.service

    Service = Annotated[ModelService, Depends(service_of)]
    replica = socket.gethostname()

    def bearer_check(kind: str) -> Any:
        def check(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
        ) -> None:
            expected: str = getattr(request.app.state, f"{kind}_token")
            given = credentials.credentials if credentials else ""
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    f"missing or wrong {kind} bearer token in the Authorization header",
                    headers={"WWW-Authenticate": "Bearer"},
                )

        return check

    require_admin = bearer_check("admin")
    # Ground truth decides what the next model learns: only holders of the ingest token may add it.
    require_ingest = bearer_check("ingest")

    def rows_of(records: list[Any]) -> np.ndarray:
        return np.array([[getattr(r, name) for name in feature_names] for r in records], dtype=np.float64)

    def not_ready(exc: NotReady) -> HTTPException:
        log.warning("prediction refused, model not ready: %s", exc)
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "model not ready")

    def answer(
        service: ModelService, X: np.ndarray, result: Prediction, confidence: float, route: str, started: float
    ) -> tuple[str, list[dict[str, Any]]]:
        """The response items for a prediction, with the rows logged and counted."""
        finite = np.isfinite(result.points) & np.isfinite(result.lower) & np.isfinite(result.upper)
        if not finite.all():  # inside the accepted ranges this should not happen; never answer null or 500
            bad = np.flatnonzero(~finite)[:MAX_ERRORS].tolist()
            raise RequestValidationError(
                [
                    {"type": "value_error", "loc": ["body", i], "msg": "these inputs give no finite prediction"}
                    for i in bad
                ]
            )
        latency_ms = (time.perf_counter() - started) * 1000 / len(X)
        now = time.time()
        # Plain dicts, not response models: for a 10k-row batch, building and re-validating 10k pydantic
        # objects cost more than the prediction itself (see docs/benchmarks.md). The shape is PredictionResult's.
        points, lower, upper = result.points.tolist(), result.lower.tolist(), result.upper.tolist()
        rows = X.tolist()
        items: list[dict[str, Any]] = []
        records: list[PredictionRecord] = []
        for i, reasons in enumerate(result.ood):
            prediction_id = uuid.uuid4().hex
            flagged = [reason.__dict__ for reason in reasons]
            items.append(
                {
                    "prediction_id": prediction_id,
                    "prediction": points[i],
                    "interval": {"lower": lower[i], "upper": upper[i], "confidence": confidence},
                    "out_of_distribution": {"flag": bool(flagged), "reasons": flagged},
                }
            )
            records.append(
                PredictionRecord(
                    prediction_id,
                    now,
                    result.version,
                    rows[i],
                    points[i],
                    lower[i],
                    upper[i],
                    confidence,
                    bool(flagged),
                    latency_ms,
                )
            )
        service.prediction_log.record(records)
        service.metrics.predictions.labels(route).inc(len(X))
        flagged = sum(1 for reasons in result.ood if reasons)
        if flagged:
            service.metrics.ood.inc(flagged)
        return result.version, items

    # -- public ----------------------------------------------------------------------------------------------
    def refuse_if_draining() -> None:
        if DRAINING.is_set():  # shutting down: the proxy's health check takes this replica out first
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "draining: this replica is shutting down")

    # Every answer a client can get, documented (the fuzz test holds the service to it).
    unavailable = {503: {"description": "draining, or no model loaded yet: try again (the proxy retries)"}}
    body_errors = {
        400: {"description": "the body is not JSON"},
        413: {"description": f"the body is larger than {settings.max_body_bytes} bytes"},
        **unavailable,
    }

    @app.get(
        "/health",
        tags=["public"],
        summary="The process is alive (503 while it drains before shutdown).",
        responses=unavailable,
    )
    async def health() -> dict[str, str]:
        refuse_if_draining()
        return {"status": "ok"}

    @app.get("/ready", tags=["public"], summary="A model is loaded and answers.", responses=unavailable)
    def ready(service: Service) -> dict[str, str]:
        refuse_if_draining()
        predictor = service.current
        # The reason goes to the log (and `mlapi-app versions`), not to the internet: it may hold paths.
        if predictor is None:
            log.warning("not ready: no model: %s", service.load_error or "loading")
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not ready")
        probe = np.array([[feature.mean for feature in predictor.metadata.features]])
        if not np.isfinite(predictor.point(probe)).all():
            log.warning("not ready: model %s answers with non-finite values", predictor.metadata.version)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not ready")
        return {"status": "ready", "model_version": predictor.metadata.version}

    @app.post(
        "/predict",
        responses=body_errors,
        response_model=PredictResponse,
        tags=["public"],
        summary="One record → prediction, interval at the requested confidence, out-of-distribution flag.",
    )
    async def predict(body: schemas.predict, request: Request, service: Service) -> JSONResponse:  # type: ignore[valid-type]
        # On the event loop: the request's own work is small, and a thread hop per request cost more than it did.
        X, started = rows_of([body.features]), time.perf_counter()
        try:
            result = await request.app.state.coalesce.predict(X, body.confidence)
        except NotReady as exc:
            raise not_ready(exc) from exc
        version, items = answer(service, X, result, body.confidence, "predict", started)
        return JSONResponse({"model_version": version, **items[0]})  # the shape of PredictResponse, unvalidated

    @app.post(
        "/predict/batch",
        responses=body_errors,
        response_model=BatchResponse,
        tags=["public"],
        summary=f"Many records in one call (at most {settings.max_batch_rows}).",
    )
    def predict_batch(body: schemas.batch, service: Service) -> JSONResponse:  # type: ignore[valid-type]
        return batch_answer(service, rows_of(body.records), body.confidence, "predict_batch")

    def batch_answer(service: ModelService, X: np.ndarray, confidence: float, route: str) -> JSONResponse:
        started = time.perf_counter()
        try:
            result = service.predict(X, confidence)
        except NotReady as exc:
            raise not_ready(exc) from exc
        version, items = answer(service, X, result, confidence, route, started)
        # Serialized directly; `response_model=BatchResponse` still documents the shape in OpenAPI.
        return JSONResponse({"model_version": version, "predictions": items})

    def columns_answer(body: bytes, service: ModelService) -> JSONResponse:
        X, confidence = parse_columns(body, schemas.columns, feature_names, schemas.ranges)
        return batch_answer(service, X, confidence, "predict_columns")

    @app.post(
        "/predict/columns",
        responses={
            **body_errors,
            422: {
                "description": "a value outside its feature's range, columns that do not name each feature once, "
                "rows of the wrong length",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
            },
        },
        response_model=BatchResponse,
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

    @app.get(
        "/model",
        tags=["public"],
        summary="The served version: metrics, coverage, data, feature schema.",
        responses=unavailable,
    )
    def model_info(service: Service) -> dict[str, Any]:
        predictor = service.current
        if predictor is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no model: {service.load_error or 'loading'}")
        # Which replica answered: each one follows the registry on its own, so clients can see them converge.
        return {**predictor.metadata.model_dump(exclude={"sha256"}), "served_by": replica}

    @app.post(
        "/observations",
        responses={
            **body_errors,
            401: {"description": "missing or wrong ingest token"},
            507: {"description": "the data volume is below its free-space floor; nothing was stored"},
        },
        response_model=ObservationsResponse,
        status_code=201,
        tags=["public"],
        dependencies=[Depends(require_ingest)],
        summary="Ground truth for past inputs (needs the ingest token); used by the next retrain.",
    )
    def observations(body: schemas.observations, service: Service) -> ObservationsResponse:  # type: ignore[valid-type]
        service.prediction_log.flush(timeout=2)  # so a prediction_id from a moment ago is found
        wanted = [o.prediction_id for o in body.observations if o.prediction_id is not None]
        known = service.prediction_log.prediction_features(wanted)
        rows, errors = [], []
        for index, item in enumerate(body.observations):
            if item.prediction_id is not None:
                if item.prediction_id not in known:
                    errors.append(
                        {
                            "loc": ["body", "observations", index, "prediction_id"],
                            "msg": f"unknown prediction_id {item.prediction_id!r}",
                            "type": "value_error",
                        }
                    )
                    continue
                rows.append((item.prediction_id, known[item.prediction_id], item.target))
            else:
                rows.append((None, rows_of([item.features])[0].tolist(), item.target))
        if errors:
            raise RequestValidationError(errors)
        try:
            stored = service.prediction_log.add_observations(rows)
        except StorageFull as exc:
            raise HTTPException(status.HTTP_507_INSUFFICIENT_STORAGE, str(exc)) from exc
        service.metrics.observations.inc(stored)
        return ObservationsResponse(stored=stored)

    # -- private: never routed by the public proxy, and guarded by a token anyway -------------------------------
    admin = [Depends(require_admin)]

    @app.post("/admin/retrain", tags=["admin"], dependencies=admin, summary="Retrain now; promote only if better.")
    def retrain(service: Service) -> dict[str, Any]:
        try:
            return service.retrain().__dict__
        except RetrainBusy as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc

    @app.get("/admin/versions", tags=["admin"], dependencies=admin, summary="All versions and the current one.")
    def versions(service: Service) -> dict[str, Any]:
        current = service.current.metadata.version if service.current else None
        return {
            "current": current,
            "versions": [
                m.model_dump(
                    include={"version", "parent", "created_at", "data_fingerprint", "metrics", "n_observations"}
                )
                for m in service.registry.list()
            ],
            "history": service.history(),
        }

    @app.post("/admin/rollback", tags=["admin"], dependencies=admin, summary="Serve an earlier version.")
    def rollback(body: RollbackRequest, service: Service) -> dict[str, str]:
        try:
            predictor = service.rollback(body.version)
        except RegistryError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"rollback refused, current model kept: {exc}") from exc
        return {"current": predictor.metadata.version}

    @app.get(
        "/admin/drift",
        tags=["admin"],
        dependencies=admin,
        summary="Population stability index per feature: recent predictions vs training data.",
    )
    def drift(service: Service, window: Annotated[int, Query(ge=10, le=100_000)] = 1000) -> dict[str, Any]:
        try:
            return service.drift(window)
        except NotReady as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc

    return app


app = create_app()

"""The FastAPI application: settings and the model service in, the route modules (app/routes/) included."""

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from app.batching import MicroBatcher
from app.data import load_configured
from app.errors import store_unavailable, validation_error
from app.handover import Handover, Peers, parse_peers
from app.limits import BodyLimit
from app.metrics import BackupStatus, Resources, ServiceMetrics
from app.predlog import StoreUnavailable
from app.routes.admin import admin_router
from app.routes.observations import observations_router
from app.routes.ops import ops_router
from app.routes.predict import predict_router
from app.routes.v2 import V2Error, v2_error, v2_router
from app.schemas import build_request_schemas
from app.service import ModelService, NotReady, Prediction
from app.settings import Settings, get_settings
from app.stores import load_token


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    dataset = load_configured(settings)
    feature_names = dataset.feature_names
    schemas = build_request_schemas(dataset, settings)
    metrics_registry = CollectorRegistry()
    metrics = ServiceMetrics(metrics_registry)
    metrics_registry.register(BackupStatus(settings.data_dir / "backup-status.json"))
    metrics_registry.register(Resources(settings.data_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = ModelService(settings, metrics, dataset)
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
        exception_handlers={
            RequestValidationError: validation_error,
            StoreUnavailable: store_unavailable,
            V2Error: v2_error,
        },
    )
    if settings.peers:  # a replica of a swarm service: its peers may be another generation during a switch
        generation = dataset.store or dataset.name  # the registry: one per project name and schema
        peers = Peers(parse_peers(settings.peers), generation)
        app.add_middleware(Handover, peers=peers, generation=generation, on_offer=metrics.count_handover)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # added last: outermost, before any buffering
    Instrumentator(registry=metrics_registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=True
    )
    for router in (
        ops_router(),
        predict_router(settings, schemas, feature_names),
        observations_router(settings, schemas, feature_names),
        admin_router(),
        v2_router(settings, schemas, feature_names, dataset.name),
    ):
        app.include_router(router)
    return app


app = create_app()

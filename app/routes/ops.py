"""Liveness, readiness and the served model's description."""

import logging
import socket
from typing import Any

from fastapi import APIRouter, HTTPException, status

from app.routes.common import (
    UNAVAILABLE,
    Service,
    refuse_if_draining,
)

log = logging.getLogger(__name__)


def ops_router() -> APIRouter:
    router = APIRouter()
    replica = socket.gethostname()

    @router.get(
        "/health",
        tags=["public"],
        summary="The process is alive (503 while it drains before shutdown).",
        responses=UNAVAILABLE,
    )
    async def health() -> dict[str, str]:
        refuse_if_draining()
        return {"status": "ok"}

    @router.get("/ready", tags=["public"], summary="A model is loaded and answers.", responses=UNAVAILABLE)
    def ready(service: Service) -> dict[str, str]:
        refuse_if_draining()
        predictor = service.current
        # The reason goes to the log (and `mlapi-app versions`), not to the internet: it may hold paths.
        if predictor is None:
            log.warning("not ready: no model: %s", service.load_error or "loading")
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not ready")
        if not predictor.answers():
            log.warning("not ready: model %s answers with non-finite values", predictor.metadata.version)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "not ready")
        return {"status": "ready", "model_version": predictor.metadata.version}

    @router.get(
        "/model",
        tags=["public"],
        summary="The served version: name, metrics, coverage, feature schema (no statistics of the training data).",
        responses=UNAVAILABLE,
    )
    def model_info(service: Service) -> dict[str, Any]:
        predictor = service.current
        if predictor is None:
            # The reason (a path, a registry error) is for the operator's log, not for whoever asks the public route.
            log.warning("GET /model: no model: %s", service.load_error or "loading")
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded")
        # Which replica answered: each one follows the registry on its own, so clients can see them converge.
        return {**predictor.metadata.public(), "served_by": replica}

    return router

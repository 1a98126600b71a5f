"""The private /admin routes: retrain, versions, rollback, drift, the prediction log's export."""

import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import StreamingResponse

from app.export import ExportFormat, export_lines
from app.registry import RegistryError, RetrainBusy
from app.routes.common import (
    Service,
    require_admin,
)
from app.schemas import RollbackRequest
from app.service import ModelService, NotReady

log = logging.getLogger(__name__)


def retrain_phases(service: ModelService) -> Iterator[str]:
    """The retrain in a thread of its own; its phases as they happen, then the outcome (or why none): JSON lines."""
    said: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def run() -> None:
        try:
            said.put(service.retrain(lambda text: said.put({"phase": text})).__dict__)
        except RetrainBusy as exc:
            said.put({"error": str(exc), "status": status.HTTP_409_CONFLICT})
        except Exception as exc:  # the stream has begun: the error is its last line
            log.exception("retrain failed")
            said.put({"error": f"{type(exc).__name__}: {exc}", "status": status.HTTP_500_INTERNAL_SERVER_ERROR})
        finally:
            said.put(None)

    threading.Thread(target=run, name="retrain", daemon=True).start()
    while (line := said.get()) is not None:
        yield json.dumps(line) + "\n"


def admin_router() -> APIRouter:
    """Never routed by the public proxy, and guarded by a token anyway."""
    router = APIRouter()

    admin = [Depends(require_admin)]

    @router.post("/admin/retrain", tags=["admin"], dependencies=admin, summary="Retrain now; promote only if better.")
    def retrain(
        service: Service,
        progress: Annotated[
            bool, Query(description="stream JSON lines: {phase} as each step begins, then {outcome: …}")
        ] = False,
    ) -> Any:
        if progress:
            return StreamingResponse(retrain_phases(service), media_type="application/x-ndjson")
        try:
            return service.retrain().__dict__
        except RetrainBusy as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc

    @router.get("/admin/versions", tags=["admin"], dependencies=admin, summary="All versions and the current one.")
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

    @router.get(
        "/admin/model",
        tags=["admin"],
        dependencies=admin,
        summary="The served version with the training data's profile per feature (the OOD and drift reference).",
    )
    def model_profile(service: Service) -> dict[str, Any]:
        predictor = service.current
        if predictor is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded")
        return predictor.metadata.model_dump(exclude={"sha256"})

    @router.post("/admin/rollback", tags=["admin"], dependencies=admin, summary="Serve an earlier version.")
    def rollback(body: RollbackRequest, service: Service) -> dict[str, str]:
        try:
            predictor = service.rollback(body.version)
        except RegistryError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"rollback refused, current model kept: {exc}") from exc
        return {"current": predictor.metadata.version}

    @router.get(
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

    @router.get(
        "/admin/predictions",
        tags=["admin"],
        dependencies=admin,
        summary="The prediction log from a time on, with the observations that arrived for it (streamed).",
        response_class=StreamingResponse,
    )
    def predictions(
        service: Service,
        since: Annotated[float, Query(ge=0, description="unix time; rows logged at or after it")] = 0.0,
        format: Annotated[ExportFormat, Query()] = "csv",
    ) -> StreamingResponse:
        service.prediction_log.flush(timeout=2)  # what was answered before the call is in the file
        rows = service.prediction_log.export(since)
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(export_lines(rows, service.dataset.schema, format), media_type=media)

    return router

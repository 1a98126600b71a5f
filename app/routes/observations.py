"""Ground truth for past predictions (ingest token): what the next retrain learns from."""

import logging

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.exceptions import RequestValidationError

from app.predlog import StorageFull
from app.routes.common import (
    Service,
    body_errors,
    require_ingest,
)
from app.schemas import ObservationsResponse, RequestSchemas
from app.settings import Settings

log = logging.getLogger(__name__)


def observations_router(settings: Settings, schemas: RequestSchemas, feature_names: tuple[str, ...]) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/observations",
        responses={
            **body_errors(settings),
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
                rows.append((item.prediction_id, known[item.prediction_id], schemas.target(item.target)))
            else:
                rows.append((None, schemas.rows([item.features])[0].tolist(), schemas.target(item.target)))
        if errors:
            raise RequestValidationError(errors)
        try:
            stored = service.prediction_log.add_observations(rows)
        except StorageFull as exc:
            # The cause (free bytes, a database driver's text) is for the operator's log, not the client.
            log.warning("observations refused: %s", exc)
            full = "the data volume is below its free-space floor; nothing was stored"
            raise HTTPException(status.HTTP_507_INSUFFICIENT_STORAGE, full) from exc
        service.metrics.observations.inc(stored)
        return ObservationsResponse(stored=stored)

    return router

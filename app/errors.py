"""Error answers: request validation (422, never quoting the input) and an unavailable log store (503)."""

import logging
import math
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.limits import public_errors
from app.predlog import StoreUnavailable

log = logging.getLogger(__name__)


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

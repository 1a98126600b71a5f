"""The Open Inference Protocol (V2, as KServe, MLServer and Triton speak it): health, metadata and inference, with
JSON tensors and the binary tensor data extension, so tritonclient and KServe's client work unchanged.

Inputs: one FP64 tensor ``[N, F]`` with the features in metadata order (``input-0``), or one tensor per feature
named as the feature (``[N]`` or ``[N, 1]``; request parameter ``content_type: "pd"``). A model project with
categories, booleans or gaps takes the per-feature form only: a category as BYTES (its value; ``""`` is a gap where
the feature is nullable), a boolean as BOOL, a number as any numeric type (NaN is a gap where nullable).

Outputs: ``predict``, ``lower``, ``upper`` (FP64 ``[N]``, at the request parameter ``confidence``) and
``out_of_distribution`` (BOOL ``[N]``): the same numbers /predict gives for the same rows, logged and metered like
them. A classifier answers ``label`` (BYTES ``[N]``), ``probabilities`` (FP64 ``[N, K]``, classes in the metadata's
order) and ``prediction_set`` (BOOL ``[N, K]``) instead of the regression outputs. Errors are V2-shaped
(``{"error": ...}``), naming the input and what is allowed.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic_core import from_json, to_json
from starlette.concurrency import run_in_threadpool

from app.batching import Overloaded
from app.routes.common import Service
from app.routes.predict import record_predictions
from app.schemas import RequestSchemas
from app.service import ModelService, NotReady, Prediction
from app.settings import Settings
from app.tabular import Column

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("predict", "lower", "upper", "out_of_distribution")
SMALL_BODY_BYTES = 16_384  # a few rows: parsed on the event loop (a thread hop costs more than the parse)
MATRIX_INPUT = "input-0"
NUMERIC_TYPES = {
    "FP64": "<f8",
    "FP32": "<f4",
    "FP16": "<f2",
    "INT64": "<i8",
    "INT32": "<i4",
    "INT16": "<i2",
    "INT8": "i1",
    "UINT64": "<u8",
    "UINT32": "<u4",
    "UINT16": "<u2",
    "UINT8": "u1",
}


class V2Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def v2_error(_: Request, exc: V2Error) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip or deflate bodies, never inflated past the body limit (a small bomb stays small)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(400, f"the {encoding} body does not decompress ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise V2Error(413, f"the decompressed body is over {limit} bytes")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it (binary tensor data extension)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise V2Error(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the body")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:  # pydantic-core's parser: 10,000 rows in 3 ms against the standard library's 15; NaN as Python clients send it
        request = from_json(json_part, allow_inf_nan=True)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(400, f"the request is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise V2Error(400, "the request needs 'inputs': a list of tensors")
    return request, binary


def tensor_values(tensor: dict[str, Any], binary: bytes, offset: int, max_rows: int) -> tuple[np.ndarray, int]:
    """One input tensor in its declared shape (float64; BYTES as an object array of str), and the offset of the next
    binary tensor."""
    name = tensor.get("name")
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    where = f"input {name!r}"
    if not isinstance(name, str):
        raise V2Error(400, "every input needs a 'name'")
    if datatype not in NUMERIC_TYPES and datatype not in ("BOOL", "BYTES"):
        raise V2Error(400, f"{where}: datatype {datatype!r}: one of FP64, FP32, INT64, …, BOOL, BYTES")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise V2Error(400, f"{where}: 'shape' must be a list of non-negative integers")
    if shape[0] > max_rows:
        raise V2Error(413, f"{where}: {shape[0]} rows; at most {max_rows} in one request")
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size")
    if datatype == "BYTES":
        return bytes_values(tensor, binary, offset, count, where)
    if size is not None:
        dtype = np.dtype("?" if datatype == "BOOL" else NUMERIC_TYPES[datatype])
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise V2Error(400, f"{where}: binary_data_size {size!r} does not hold {count} {datatype} values")
        values = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).astype(np.float64)
        offset += size
    else:
        data = tensor.get("data")
        if data is None:
            raise V2Error(400, f"{where}: needs 'data' (JSON) or parameters.binary_data_size (binary)")
        try:
            values = np.asarray(data, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise V2Error(400, f"{where}: 'data' must be numbers") from None
        if values.size != count:
            raise V2Error(400, f"{where}: {values.size} values do not fill shape {shape}")
    return values.reshape(shape), offset


def bytes_values(tensor: dict[str, Any], binary: bytes, offset: int, count: int, where: str) -> tuple[np.ndarray, int]:
    """A BYTES tensor as str values: JSON strings, or binary elements (a 4-byte little-endian length, then UTF-8)."""
    shape, size = tensor["shape"], (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or offset + size > len(binary):
            raise V2Error(400, f"{where}: binary_data_size {size!r} is not within the body")
        chunk, values = binary[offset : offset + size], []
        try:
            while chunk:
                length = int.from_bytes(chunk[:4], "little")
                if len(chunk) < 4 + length:
                    raise ValueError("an element runs past binary_data_size")
                values.append(chunk[4 : 4 + length].decode())
                chunk = chunk[4 + length :]
        except (ValueError, UnicodeDecodeError) as exc:
            raise V2Error(400, f"{where}: BYTES elements are a 4-byte length and UTF-8 text ({exc})") from None
        offset += size
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise V2Error(400, f"{where}: needs 'data' (JSON) or parameters.binary_data_size (binary)")
        values = list(np.asarray(data, dtype=object).reshape(-1))
        if not all(isinstance(value, str) for value in values):
            raise V2Error(400, f"{where}: BYTES 'data' must be strings")
    if len(values) != count:
        raise V2Error(400, f"{where}: {len(values)} values do not fill shape {shape}")
    return np.array(values, dtype=object).reshape(shape), offset


def typed_column(column: Column, values: np.ndarray, where: str) -> np.ndarray:
    """One feature's tensor as the service's codes (app/tabular.py), each value checked against the schema."""
    if column.type == "category":
        if values.dtype != object:
            raise V2Error(400, f"{where}: a category takes BYTES (one of {list(column.values)})")
        codes = np.empty(len(values))
        for row, value in enumerate(values):
            if value == "" and column.nullable:
                codes[row] = np.nan
            elif value in column.values:
                codes[row] = column.values.index(value)
            else:
                gap = ', or "" for a gap' if column.nullable else ""
                raise V2Error(400, f"{where} row {row}: {value!r} is not one of {list(column.values)}{gap}")
        return codes
    if values.dtype == object:
        raise V2Error(400, f"{where}: a {column.type} takes a numeric tensor{' or BOOL' * (column.type == 'boolean')}")
    if np.isnan(values).any() and not column.nullable:
        raise V2Error(400, f"{where} row {int(np.flatnonzero(np.isnan(values))[0])}: a gap (NaN), not nullable")
    if column.type == "integer" and not np.all(np.isnan(values) | (values == np.round(values))):
        raise V2Error(400, f"{where}: whole numbers only (an integer feature)")
    if column.type == "boolean" and not np.all(np.isnan(values) | (values == 0) | (values == 1)):
        raise V2Error(400, f"{where}: true/false (BOOL, or 0 and 1) only")
    return values.astype(np.float64)


def feature_matrix(
    request: dict[str, Any], binary: bytes, feature_names: tuple[str, ...], schemas: RequestSchemas, max_rows: int
) -> np.ndarray:
    """[N, F] in feature order from one matrix input or one input per feature; every value finite and accepted."""
    tensors, offset = {}, 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise V2Error(400, "every input must be a tensor object")
        tensors[tensor.get("name")], offset = tensor_values(tensor, binary, offset, max_rows)
    width = len(feature_names)
    schema = schemas.schema
    if len(tensors) == 1 and set(tensors) - set(feature_names):
        ((name, matrix),) = tensors.items()
        if not schema.plain:
            raise V2Error(400, f"input {name!r}: this model's features have types: one tensor per feature, named as in "
                          f"the metadata {list(feature_names)}")  # fmt: skip
        if matrix.dtype == object:
            raise V2Error(400, f"input {name!r}: BYTES; this model takes numbers")
        if matrix.ndim != 2 or matrix.shape[1] != width:
            raise V2Error(400, f"input {name!r}: shape {list(matrix.shape)}; expected [N, {width}] (features in order)")
        X = matrix
    else:
        unknown = sorted(set(tensors) - set(feature_names))
        missing = [name for name in feature_names if name not in tensors]
        if unknown or missing:
            raise V2Error(
                400,
                f"inputs: one [N, {width}] tensor, or one tensor per feature {list(feature_names)}"
                + (f"; unknown {unknown}" if unknown else "")
                + (f"; missing {missing}" if missing else ""),
            )
        columns = []
        for name, declared in zip(feature_names, schema.columns, strict=True):
            column = tensors[name]
            if column.ndim == 2 and column.shape[1] == 1:
                column = column[:, 0]
            if column.ndim != 1:
                raise V2Error(400, f"input {name!r}: shape {list(column.shape)}; expected [N] or [N, 1]")
            columns.append(typed_column(declared, column, f"input {name!r}"))
        if len({len(c) for c in columns}) != 1:
            raise V2Error(400, "inputs: every feature tensor needs the same number of rows")
        X = np.column_stack(columns)
    if len(X) == 0:
        raise V2Error(400, "inputs: at least one row")
    low, high = schemas.ranges.feature_limits()
    gap = np.isnan(X) & schema.nullable_mask
    bad = ~gap & (~np.isfinite(X) | (low > X) | (high < X))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise V2Error(
            400,
            f"feature {feature_names[column]!r} row {row}: {float(X[row, column])!r} is outside the accepted range "
            f"[{low[column]:.6g}, {high[column]:.6g}]",
        )
    return X


def output_tensors(
    result_arrays: dict[str, np.ndarray], request: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The requested outputs (all when none are named), each as JSON data or as binary after the header."""
    wanted = request.get("outputs") or [{"name": name} for name in result_arrays]
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    outputs, chunks = [], []
    for entry in wanted:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in result_arrays:
            raise V2Error(400, f"output {name!r}: this model has {list(result_arrays)}")
        values = result_arrays[name]
        datatype = "BOOL" if values.dtype == np.bool_ else "BYTES" if values.dtype.kind in "UO" else "FP64"
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if bool((entry.get("parameters") or {}).get("binary_data", binary_default)):
            if datatype == "BYTES":  # each element: its length (4 bytes, little-endian), then its UTF-8 bytes
                raw = b"".join(len(b).to_bytes(4, "little") + b for b in (str(v).encode() for v in values.flat))
            else:
                raw = values.astype("?" if datatype == "BOOL" else "<f8").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = values.tolist()
        outputs.append(tensor)
    return outputs, chunks


def v2_router(
    settings: Settings, schemas: RequestSchemas, feature_names: tuple[str, ...], model_name: str
) -> APIRouter:
    error = {
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
            }
        }
    }
    router = APIRouter(
        tags=["public", "open inference protocol (v2)"],
        responses={
            400: {"description": "a tensor, parameter or value the model does not take (named)", **error},
            404: {"description": "no such model or loaded version", **error},
            413: {"description": "more rows, or a larger (decompressed) body, than allowed", **error},
            415: {"description": "a Content-Encoding other than gzip or deflate", **error},
            503: {"description": "no model loaded yet", **error},
        },
    )

    def known(name: str) -> None:
        if name != model_name:
            raise V2Error(404, f"model {name!r} is not served here; this server serves {model_name!r}")

    def served_version(service: ModelService, name: str, version: str | None) -> str:
        known(name)
        predictor = service.current
        if predictor is None:
            raise V2Error(503, "model not ready")
        current = predictor.metadata.version
        if version is not None and version != current:
            raise V2Error(404, f"version {version!r} of {name!r} is not loaded; loaded: [{current!r}]")
        return current

    @router.get("/v2", summary="Server metadata: name, version, extensions.")
    def server_metadata() -> dict[str, Any]:
        return {"name": "mlapi", "version": "1.0.0", "extensions": ["binary_tensor_data"]}

    @router.get("/v2/health/live", summary="The process answers.")
    def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", summary="A model is loaded and answers.")
    def ready(service: Service) -> JSONResponse:
        ok = service.current is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    classes = list(schemas.schema.classes)
    if schemas.schema.task == "classification":
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(classes)]},
            {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, len(classes)]},
        ]
    else:
        outputs = [{"name": n, "datatype": "FP64", "shape": [-1]} for n in OUTPUTS[:3]]
    outputs.append({"name": "out_of_distribution", "datatype": "BOOL", "shape": [-1]})
    if schemas.schema.plain:
        inputs = [{"name": MATRIX_INPUT, "datatype": "FP64", "shape": [-1, len(feature_names)]}]
    else:  # one tensor per feature, typed (content_type "pd", as MLServer's pandas codec names it)
        kinds = {"category": "BYTES", "boolean": "BOOL", "integer": "INT64", "number": "FP64"}
        inputs = [
            {"name": c.name, "datatype": kinds[c.type], "shape": [-1, 1], "parameters": {"content_type": "pd"}}
            for c in schemas.schema.columns
        ]

    def metadata(service: ModelService, name: str, version: str | None) -> dict[str, Any]:
        current = served_version(service, name, version)
        return {
            "name": model_name,
            "versions": [current],
            "platform": "mlapi-sklearn",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "task": schemas.schema.task,
                **({"classes": classes} if classes else {}),
                "features": list(feature_names),
                "confidence_levels": settings.confidence_levels,
                "default_confidence": settings.default_confidence,
            },
        }

    @router.get("/v2/models/{name}", summary="Model metadata: inputs (the features in order) and outputs.")
    def model_metadata(name: str, service: Service) -> dict[str, Any]:
        return metadata(service, name, None)

    @router.get("/v2/models/{name}/versions/{version}", summary="Metadata of a loaded version.")
    def version_metadata(name: str, version: str, service: Service) -> dict[str, Any]:
        return metadata(service, name, version)

    def model_ready(service: ModelService, name: str, version: str | None) -> JSONResponse:
        known(name)
        loaded = service.current is not None and version in (None, service.current.metadata.version)
        return JSONResponse({"name": name, "ready": loaded}, status_code=200 if loaded else 503)

    @router.get("/v2/models/{name}/ready", summary="The model is loaded.")
    def ready_model(name: str, service: Service) -> JSONResponse:
        return model_ready(service, name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready", summary="This version is loaded.")
    def ready_version(name: str, version: str, service: Service) -> JSONResponse:
        return model_ready(service, name, version)

    def parse(
        body: bytes, headers: dict[str, str], service: ModelService, name: str, version: str | None
    ) -> tuple[dict[str, Any], np.ndarray, Any]:
        """The request document, its rows in feature order, and the confidence as sent."""
        served_version(service, name, version)
        body = decompressed(body, headers.get("content-encoding", "").lower(), settings.max_body_bytes)
        request, binary = split_body(body, headers.get(HEADER_LENGTH))
        parameters = request.get("parameters") or {}
        confidence = parameters.get("confidence", settings.default_confidence)
        if confidence not in settings.confidence_levels:
            raise V2Error(400, f"parameters.confidence {confidence!r}: one of {settings.confidence_levels}")
        return request, feature_matrix(request, binary, feature_names, schemas, settings.max_batch_rows), confidence

    def respond(
        service: ModelService,
        request: dict[str, Any],
        X: np.ndarray,
        result: Prediction,
        confidence: Any,
        started: float,
        log_wait_s: float = 0.0,
    ) -> Response:
        try:  # logged and metered
            logged = record_predictions(service, X, result, float(confidence), "v2_infer", started, log_wait_s)
        except RequestValidationError:
            raise V2Error(400, "these inputs give no finite prediction") from None
        if result.probabilities is not None and result.sets is not None:
            labels = np.array(classes, dtype=object)[result.points.astype(np.intp)]
            arrays = {"label": labels, "probabilities": result.probabilities, "prediction_set": result.sets}
        else:
            arrays = {"predict": result.points, "lower": result.lower, "upper": result.upper}
        arrays["out_of_distribution"] = logged.ood
        outputs, chunks = output_tensors(arrays, request)
        document: dict[str, Any] = {
            "model_name": model_name,
            "model_version": result.version,
            "parameters": {"confidence": confidence},
            "outputs": outputs,
        }
        if "id" in request:
            document["id"] = request["id"]
        header = to_json(document)
        if not chunks:
            return Response(header, media_type="application/json")
        return Response(
            header + b"".join(chunks),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )

    def batch(body: bytes, headers: dict[str, str], service: ModelService, name: str, version: str | None) -> Response:
        started = time.perf_counter()
        request, X, confidence = parse(body, headers, service, name, version)
        try:
            result = service.predict(X, float(confidence))
        except NotReady:
            raise V2Error(503, "model not ready") from None
        return respond(service, request, X, result, confidence, started, settings.log_wait_s)  # on a worker thread

    async def infer(http: Request, service: ModelService, name: str, version: str | None) -> Response:
        """A small body (one row, a few) on the event loop, its single row coalesced with concurrent ones as /predict
        does; a large one (a batch) parsed, predicted and serialized off the loop."""
        body, headers = await http.body(), {k.lower(): v for k, v in http.headers.items()}
        if len(body) > SMALL_BODY_BYTES or headers.get("content-encoding"):
            return await run_in_threadpool(batch, body, headers, service, name, version)
        started = time.perf_counter()
        request, X, confidence = parse(body, headers, service, name, version)
        try:
            if len(X) == 1:
                result = await http.app.state.coalesce.predict(X, float(confidence))
            else:
                result = service.predict(X, float(confidence))
        except NotReady:
            raise V2Error(503, "model not ready") from None
        except Overloaded:
            raise V2Error(503, "overloaded: too many predictions waiting; retry in a second") from None
        return respond(service, request, X, result, confidence, started)

    @router.post("/v2/models/{name}/infer", summary="Inference: JSON tensors or the binary tensor data extension.")
    async def infer_model(name: str, request: Request, service: Service) -> Response:
        return await infer(request, service, name, None)

    @router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a loaded version.")
    async def infer_version(name: str, version: str, request: Request, service: Service) -> Response:
        return await infer(request, service, name, version)

    return router

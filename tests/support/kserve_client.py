"""KServe's own V2 client (``kserve.InferenceRESTClient``), driven as a peer's user would drive it. Runs in
.venv-clients (KServe's pins differ from the service's), so it imports nothing of this project.

    .venv-clients/bin/python tests/support/kserve_client.py < request.json > answer.json

The request: ``base_url``, ``model``, ``inputs`` (name, datatype, shape, data), ``parameters``, ``binary`` (send the
tensors with the binary extension), and optionally ``ca`` (a CA file to verify HTTPS with) and ``connect`` (an
address to dial instead of the URL's host, which stays the TLS server name and the Host header).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

NUMPY = {
    "FP64": np.float64,
    "FP32": np.float32,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
    "BYTES": object,
}


class Dial(httpx.AsyncBaseTransport):
    """Connect to ``address`` while the URL keeps the domain: the certificate is verified for the domain (SNI)."""

    def __init__(self, address: str, verify: ssl.SSLContext) -> None:
        self.address, self.inner = address, httpx.AsyncHTTPTransport(verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        domain = request.url.host
        request.url = request.url.copy_with(host=self.address)
        request.extensions = {**request.extensions, "sni_hostname": domain}
        request.headers["Host"] = f"{domain}:{request.url.port}" if request.url.port else domain
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def as_list(values: Any) -> Any:
    array = np.asarray(values)
    if array.dtype == object:
        return [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


async def main(request: dict[str, Any]) -> dict[str, Any]:
    verify: ssl.SSLContext | bool = True
    if request.get("ca"):
        verify = ssl.create_default_context(cafile=request["ca"])
    transport = Dial(request["connect"], verify) if request.get("connect") else None
    client = InferenceRESTClient(RESTConfig(protocol="v2", verify=verify, transport=transport, retries=0))
    base, model = request["base_url"], request["model"]
    inputs = []
    for tensor in request["inputs"]:
        data = np.array(tensor["data"], dtype=NUMPY[tensor["datatype"]]).reshape(tensor["shape"])
        one = InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        one.set_data_from_numpy(data, binary_data=request.get("binary", False))
        inputs.append(one)
    answer = await client.infer(
        base, InferRequest(model, inputs, request_id="kserve-1", parameters=request.get("parameters")), model
    )
    result = {
        "live": await client.is_server_live(base),
        "ready": await client.is_server_ready(base),
        "model_ready": await client.is_model_ready(base, model),
        "id": answer.id,
        "outputs": {
            output.name: {"datatype": output.datatype, "shape": list(output.shape), "data": as_list(output.as_numpy())}
            for output in answer.outputs
        },
    }
    await client.close()
    return result


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)

"""A project switch without refused requests (app/handover.py): two real servers, one of the bundled regression and
one of the penguins classifier, each told the other is a replica of its service, as a swarm's tasks.<service> name
would. A request one refuses is answered by the other; what neither accepts gets the first one's own error."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.handover import FORWARDED, GENERATION, Peers, parse_peers
from app.settings import Settings
from testbed.stack import free_port
from tests.support.projects import EXAMPLES, PENGUIN
from tests.support.service import ADMIN_TOKEN, INGEST_TOKEN, metric_value, record, served_app


@dataclass(frozen=True)
class Replica:
    """A served app (tests.support.service.served_app), called over HTTP as its peers call it."""

    port: int

    def call(
        self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = {"Content-Type": "application/json", **(headers or {})}
            connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=sent)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()


def settings(tmp_path: Path, name: str, peers: str, **values: object) -> Settings:
    return Settings(
        data_dir=tmp_path / name,
        admin_token=ADMIN_TOKEN,
        ingest_token=INGEST_TOKEN,
        holdout_seed=42,
        retrain_isolation=False,
        peers=peers,
        **values,
    )


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replica, Replica]]:
    """A regression replica and a penguins replica, each with both addresses as its peers (itself included, as a
    swarm's DNS name lists every task)."""
    tmp_path = tmp_path_factory.mktemp("handover")
    old_port, new_port = free_port(), free_port()
    peers = f"127.0.0.1:{old_port},localhost:{new_port}"
    with (
        served_app(settings(tmp_path, "old", peers), old_port),
        served_app(settings(tmp_path, "new", peers, model_project=EXAMPLES / "penguins"), new_port),
    ):
        yield Replica(old_port), Replica(new_port)


def test_a_request_of_the_other_schema_is_answered_by_the_other_generation(switch: tuple[Replica, Replica]) -> None:
    old, new = switch
    status, headers, body = old.call("POST", "/predict", {"features": PENGUIN, "confidence": 0.9})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["label"] in answer["probabilities"] and answer["label"] in answer["prediction_set"]
    assert headers["via"].startswith("1.1 mlapi (projects/penguins-"), headers
    assert "x-mlapi-generation" not in headers  # only for the replica that passed the request on
    # ...and the other way round: a regression request at the penguins replica, single and batch.
    status, headers, body = new.call("POST", "/predict", {"features": record()})
    assert (
        status == 200 and isinstance(json.loads(body)["prediction"], float) and headers["via"] == "1.1 mlapi (diabetes)"
    )
    status, _, body = new.call("POST", "/predict/batch", {"records": [record(), record(age=0.02)]})
    assert status == 200 and len(json.loads(body)["predictions"]) == 2


def test_the_v2_protocol_of_the_other_model_name_is_answered_too(switch: tuple[Replica, Replica]) -> None:
    old, _ = switch
    tensors = [  # a category's gap is "" (sex is not known)
        {
            "name": name,
            "datatype": "BYTES" if name in ("island", "sex") else "FP64",
            "shape": [1],
            "data": [value or ""],
        }
        for name, value in PENGUIN.items()
    ]
    status, headers, body = old.call("POST", "/v2/models/penguins/infer", {"inputs": tensors})
    assert status == 200, body
    assert json.loads(body)["model_name"] == "penguins" and "penguins" in headers["via"]
    status, _, body = old.call("GET", "/v2/models/penguins")
    assert status == 200 and json.loads(body)["name"] == "penguins"


def test_what_no_generation_accepts_gets_this_replicas_own_error(switch: tuple[Replica, Replica]) -> None:
    old, _ = switch
    status, headers, body = old.call("POST", "/predict", {"features": {**record(), "bmi": "heavy"}})
    assert status == 422 and "via" not in headers
    assert json.loads(body)["detail"][0]["loc"][-1] == "bmi"  # the regression's own error, not the classifier's
    metrics = old.call("GET", "/metrics")[2].decode()
    assert metric_value(metrics, "mlapi_handover_requests_total", outcome="refused everywhere") >= 1
    assert metric_value(metrics, "mlapi_handover_requests_total", outcome="answered") >= 1


def test_a_request_passed_on_once_is_never_passed_on_again(switch: tuple[Replica, Replica]) -> None:
    old, _ = switch
    headers = {FORWARDED.decode(): "diabetes"}
    status, answer_headers, _ = old.call("POST", "/predict", {"features": PENGUIN}, headers)
    assert status == 422 and "via" not in answer_headers
    assert answer_headers[GENERATION.decode()] == "diabetes"
    status, answer_headers, _ = old.call("POST", "/predict", {"features": record()}, headers)
    assert status == 200 and answer_headers[GENERATION.decode()] == "diabetes"


def test_peers_of_this_generation_are_not_asked_again_until_their_answer_is_stale(
    switch: tuple[Replica, Replica],
) -> None:
    old, new = switch
    resolved: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    peers = Peers([("127.0.0.1", old.port), ("127.0.0.1", new.port)], "diabetes", resolve=resolve)
    body = json.dumps({"features": {"nothing": 1}}).encode()
    headers = [(b"content-type", b"application/json")]
    assert peers.answer("POST", "/predict", headers, body) is None  # both refuse it; each told its generation
    assert peers.candidates() == [("127.0.0.1", new.port)]  # this generation's is skipped from now on
    answer = peers.answer("POST", "/predict", headers, json.dumps({"features": PENGUIN}).encode())
    assert answer is not None and answer.status == 200 and answer.generation.startswith("projects/penguins-")


def test_a_peer_that_is_gone_or_unresolvable_is_skipped() -> None:
    def resolve(host: str, port: int) -> list[str]:
        if host == "tasks.gone":
            raise OSError("Name or service not known")
        return ["127.0.0.1"]

    peers = Peers(parse_peers(f"tasks.gone:8000,tasks.closed:{free_port()}"), "diabetes", resolve=resolve, timeout_s=2)
    assert peers.answer("POST", "/predict", [], b"{}") is None


def test_peers_are_host_and_port_pairs() -> None:
    assert parse_peers("tasks.mlapi-model:8000, [::1]:9000,") == [("tasks.mlapi-model", 8000), ("::1", 9000)]
    with pytest.raises(ValueError, match=r"MLAPI_PEERS: 'tasks.mlapi-model' is not host:port"):
        parse_peers("tasks.mlapi-model")

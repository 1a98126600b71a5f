"""A project switch without refused requests. A rolling update to another project (or another schema) has replicas
of both generations serving side by side for a few seconds, and the edge balances across all of them: a request
valid under the new schema could meet an old replica and get a 422, then a 200, then a 422 again.

Here, a prediction request this replica refuses as invalid (422, or the V2 protocol's 400 and 404) is offered to the
other replicas of the service (``MLAPI_PEERS``, the swarm's ``tasks.<service>`` name), and the first answer of a
replica of *another* generation that is a success is returned instead. So from the moment one replica of the new
generation serves, every request valid under its schema is answered, whichever replica the edge picked; requests
valid under the old schema are answered for as long as an old replica is still there. A request refused by every
generation gets this replica's own error. Outside a switch every replica is of one generation: a refused request is
offered to each other replica once at most, then not again for ``GENERATION_TTL_S``, as their generations are known.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

FORWARDED = b"x-mlapi-forwarded"  # on a request a replica passes on: never passed on again
GENERATION = b"x-mlapi-generation"  # on the answer to such a request: which generation answered
REFUSALS = frozenset({400, 404, 422})  # what a replica of another schema (or another model name) answers
PATHS = ("/predict", "/v2/models/")
GENERATION_TTL_S = 5.0  # a peer's generation is asked again after this: a task's address can be reused
FORWARD_TIMEOUT_S = 10.0
MAX_PEERS = 16
# Hop-by-hop and framing headers, and what the server sets itself: the forwarded request and the returned answer
# each get their own.
NOT_PASSED = frozenset(
    {
        b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer",
        b"date", b"server",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    generation: str


def parse_peers(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port…]`` (a host may be a DNS name of many addresses) as (host, port) pairs."""
    peers = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"MLAPI_PEERS: {item!r} is not host:port (such as tasks.mlapi-model:8000)")
        peers.append((host.strip("[]"), int(port)))
    return peers


class Peers:
    """The other replicas, by address, and what each said its generation was."""

    def __init__(
        self,
        peers: list[tuple[str, int]],
        generation: str,
        resolve: Callable[[str, int], list[str]] | None = None,
        timeout_s: float = FORWARD_TIMEOUT_S,
    ) -> None:
        self.peers, self.generation, self.timeout_s = peers, generation, timeout_s
        self._resolve = resolve or _addresses
        self._known: dict[tuple[str, int], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def candidates(self) -> list[tuple[str, int]]:
        """Every address the peers' names resolve to now, except those known to be of this generation."""
        now = time.monotonic()
        found: list[tuple[str, int]] = []
        for host, port in self.peers:
            try:
                addresses = self._resolve(host, port)
            except OSError as exc:  # no task of the service yet, or the name is not resolvable here
                log.debug("peers %s: %s", host, exc)
                continue
            for address in addresses:
                with self._lock:
                    known = self._known.get((address, port))
                if known and known[1] > now and known[0] == self.generation:
                    continue
                if (address, port) not in found:
                    found.append((address, port))
        return found[:MAX_PEERS]

    def answer(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer | None:
        """The first success of a replica of another generation for this request, or None."""
        sent = [(k, v) for k, v in headers if k.lower() not in NOT_PASSED and k.lower() != FORWARDED]
        sent.append((FORWARDED, self.generation.encode()))
        for address, port in self.candidates():
            try:
                status, reply_headers, reply = self._send(address, port, method, target, sent, body)
            except (OSError, http.client.HTTPException) as exc:
                log.debug("peer %s:%s: %s", address, port, exc)
                continue
            generation = next((v.decode() for k, v in reply_headers if k.lower() == GENERATION), "")
            if generation:
                with self._lock:
                    self._known[(address, port)] = (generation, time.monotonic() + GENERATION_TTL_S)
            if 200 <= status < 300 and generation and generation != self.generation:
                kept = [(k, v) for k, v in reply_headers if k.lower() not in NOT_PASSED and k.lower() != GENERATION]
                return Answer(status, kept, reply, generation)
        return None

    def _send(
        self, address: str, port: int, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        connection = http.client.HTTPConnection(address, port, timeout=self.timeout_s)
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for key, value in headers:
                connection.putheader(key.decode("latin-1"), value.decode("latin-1"))
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            reply = response.read()
            pairs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.getheaders()]
            return response.status, pairs, reply
        finally:
            connection.close()


def _addresses(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Handover:
    """ASGI middleware: a prediction request this replica refuses is offered to the other generation (see above)."""

    def __init__(self, app: ASGIApp, peers: Peers, generation: str, on_offer: Callable[[bool], None]) -> None:
        self.app, self.peers, self.generation, self.on_offer = app, peers, generation, on_offer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PATHS):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        if any(key == FORWARDED for key, _ in headers):
            await self.app(scope, receive, self._tagged(send))  # the replica that passed it on wants to know
            return
        chunks: list[bytes] = []
        held: list[Message] = []

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def holding_send(message: Message) -> None:
            if held or (message["type"] == "http.response.start" and message["status"] in REFUSALS):
                held.append(message)
            else:
                await send(message)

        await self.app(scope, recording_receive, holding_send)
        if not held:
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        answer = await run_in_threadpool(
            self.peers.answer, scope["method"], target.decode("latin-1"), headers, b"".join(chunks)
        )
        self.on_offer(answer is not None)
        if answer is None:
            for message in held:
                await send(message)
            return
        via = f"1.1 mlapi ({answer.generation})".encode()
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [*answer.headers, (b"content-length", str(len(answer.body)).encode()), (b"via", via)],
            }
        )
        await send({"type": "http.response.body", "body": answer.body})

    def _tagged(self, send: Send) -> Send:
        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (GENERATION, self.generation.encode())]}
            await send(message)

        return tagged_send

"""Request size limits that act before a body is read or parsed: a huge body costs neither memory nor event-loop
time (parsing happens on the event loop, so a 20 MB body used to stall every other request, /health included)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a Content-Length over the limit, and for a streamed (chunked) body once it passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        exceeded = refused = False

        async def counted_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge  # the framework turns it into an error response, replaced below
            return message

        async def checked_send(message: Message) -> None:
            nonlocal refused
            if not exceeded:
                await send(message)
            elif not refused:  # whatever the app answers to the cut-off body, the client gets the 413
                refused = True
                await self._refuse(send)

        try:
            await self.app(scope, counted_receive, checked_send)
        except BodyTooLarge:
            if not refused:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


MAX_ERRORS = 20


def public_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without the input they quote (a 20 MB body came back as a 20 MB 422), at most MAX_ERRORS
    of them, and a last entry saying how many more there were."""
    shown = [{key: error[key] for key in ("type", "loc", "msg", "ctx") if key in error} for error in errors]
    already_counted = len(shown) == MAX_ERRORS + 1 and shown[-1]["type"] == "too_many_errors"
    if len(shown) > MAX_ERRORS and not already_counted:
        shown = [*shown[:MAX_ERRORS], too_many_errors(len(shown) - MAX_ERRORS)]
    return shown


def too_many_errors(more: int) -> dict[str, Any]:
    """The last entry of a cut list of errors (a check that finds many need not build them all)."""
    return {"type": "too_many_errors", "loc": [], "msg": f"{more} more errors not shown"}

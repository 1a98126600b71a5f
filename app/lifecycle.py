"""Process lifecycle: drain before shutdown, so a replica leaving the load balancer costs no request.

Traefik learns that a swarm task is going away only at its next poll of the swarm API (a few seconds), and its
active health check needs an interval too. A replica that stopped listening at SIGTERM would get requests in that
window and refuse them. So on the first SIGTERM the replica keeps serving while `/health` and `/ready` answer 503
(Traefik's health check and the swarm provider then drop it), and only after ``drain_seconds`` does uvicorn's own
graceful shutdown begin (stop accepting, finish in-flight requests, run the lifespan's close).
"""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

# Process-wide: set once the first termination signal arrived; the health routes read it.
DRAINING = threading.Event()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if DRAINING.is_set() or self.drain_seconds <= 0:
            super().handle_exit(sig, frame)  # a second signal: stop draining, shut down now (gracefully)
            return
        DRAINING.set()
        log.warning("signal %s: draining for %.1f s before shutting down", sig, self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()

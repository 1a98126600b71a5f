"""Traefik's side of the spec: its static flags (swarm provider, entrypoints, one ACME resolver with a store per CA)
and the model service's labels (routers, retries, health check). Called by infra/spec/stack.py:build_stack.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import yaml

from infra.spec.acme import LETSENCRYPT_PRODUCTION, LETSENCRYPT_STAGING
from infra.spec.docker_api import ENDPOINT as DOCKER_API_ENDPOINT
from infra.spec.durations import go_duration
from infra.spec.monitoring import latency_buckets

if TYPE_CHECKING:
    from infra.spec.inputs import StackInputs

CERT_RESOLVER = "letsencrypt"
ROUTER = "mlapi"
PREDICT_ROUTER = "mlapi-predict"
# A 10,000-row batch is ~2.5 MB. Larger bodies get a 413 from Traefik before they reach a replica (the app has the
# same limit, MLAPI_MAX_BODY_BYTES, for anything that reaches it another way); up to it, predictions are replayable.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Replayed after an answer of 502-504 up to this size (about 1,000 rows); larger bodies still go through, and are still
# retried when a replica cannot be reached at all (nothing was sent). Traefik's status retry costs CPU in proportion
# to this limit on every request: at 4 MiB it was 60 % of Traefik's CPU a prediction, at 256 KiB a few % (make bench).
RETRY_BODY_LIMIT = 256 * 1024
PRIVATE_PREFIXES = ("/admin", "/metrics")  # never routed from the internet: the host and the overlay reach them
DOCS_PREFIXES = ("/docs", "/redoc", "/openapi.json")  # private too with publicDocs=false
ACME_CA_BUNDLE_PATH = "/etc/mlapi/acme-ca.pem"  # inside the Traefik container, only when acme_ca_bundle is set
# The scoped Cloudflare token of the DNS challenge: in Traefik's own directory (0700, its user's), written from stdin
# by the deploy (infra/program/model_stack.py); /acme is that directory inside the container.
DNS_TOKEN_FILE = "cloudflare-dns-token"  # noqa: S105 (a file name)
DNS_TOKEN_PATH = f"/acme/{DNS_TOKEN_FILE}"
# Timing that makes tasks coming and going cost no request (README: "How an update proceeds").
PROVIDER_REFRESH_S = 2  # Traefik polls the swarm API this often (default 15 s)
PROXY_HEALTH_INTERVAL_S = 2  # Traefik's own health check of each task
BACKEND_IDLE_TIMEOUT_S = 30  # Traefik closes idle backend connections before uvicorn's 75 s keep-alive does
HSTS_S = 365 * 24 * 3600
HSTS_PRELOAD_S = 2 * HSTS_S  # hstspreload.org's requirement for submission
# Traefik listens on unprivileged ports (it runs as a plain user with no capability); the host publishes 80/443.
# Not 8080: Traefik's own entrypoint (ping) is there.
WEB_PORT = 8880
METRICS_PORT = 8082  # Traefik's Prometheus metrics: never published, scraped on the overlay
WEBSECURE_PORT = 8443


IPV6_CLIENT_PREFIX = 64  # an IPv6 client is its /64 for the rate and in-flight limits


def acme_storage(ca_server: str) -> str:
    """One certificate store per CA: switching staging → production must not keep serving staging certificates
    (Traefik reuses whatever valid certificate its store holds for the domain)."""
    known = {LETSENCRYPT_PRODUCTION: "letsencrypt", LETSENCRYPT_STAGING: "letsencrypt-staging"}
    name = known.get(ca_server) or "ca-" + hashlib.sha256(ca_server.encode()).hexdigest()[:12]
    return f"/acme/{name}.json"


# Dynamic configuration from a file: TLS options cannot come from labels. The file lives in Traefik's directory on the
# data volume (mounted at /acme), written by the deploy step from tls_options_yaml().
DYNAMIC_DIR = "/acme/dynamic"
TLS_FILE = "tls.yml"
# Mozilla "intermediate": TLS 1.2 and 1.3, ECDHE with AEAD ciphers only (TLS 1.3 suites are not configurable in Go).
TLS12_CIPHERS = (
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
)


def tls_options_yaml() -> str:
    """Traefik's default TLS option: every router uses it; a handshake without the domain's SNI is refused."""
    options = {
        "minVersion": "VersionTLS12",
        "cipherSuites": list(TLS12_CIPHERS),
        "curvePreferences": ["X25519", "CurveP256", "CurveP384"],
        "sniStrict": True,
        # As Mozilla's configurations do: Go keeps ticket keys for 7 days, so a stolen key decrypts a week of
        # recorded sessions (testssl.sh: TLS_session_ticket). Keep-alive connections are unaffected.
        "disableSessionTickets": True,
    }
    # The header keeps the module's old path: cloud-init carries this file, and a changed byte in user-data replaces
    # the server.
    return "# Written by the deploy step (infra/traefik.py); edits are overwritten.\n" + yaml.safe_dump(
        {"tls": {"options": {"default": options}}}, sort_keys=False
    )


def traefik_flags(inputs: StackInputs, network: str) -> tuple[str, ...]:
    """Traefik's static configuration: swarm service labels opt-in, HTTP→HTTPS, one ACME resolver, no dashboard."""
    resolver = f"--certificatesresolvers.{CERT_RESOLVER}.acme"
    flags = [
        "--providers.swarm=true",
        f"--providers.swarm.endpoint={DOCKER_API_ENDPOINT}",  # the read-only proxy, never the socket
        "--providers.swarm.exposedbydefault=false",
        f"--providers.swarm.network={network}",
        f"--providers.swarm.refreshseconds={go_duration(PROVIDER_REFRESH_S)}",
        # A router whose tasks are all unhealthy answers 503, not 404 (the router would vanish without this).
        "--providers.swarm.allowemptyservices=true",
        # A task that is gone refuses connections at once; fail over quickly instead of waiting 30 s.
        f"--serverstransport.forwardingtimeouts.dialtimeout={go_duration(1)}",
        f"--serverstransport.forwardingtimeouts.idleconntimeout={go_duration(BACKEND_IDLE_TIMEOUT_S)}",
        f"--entrypoints.web.address=:{WEB_PORT}",
        # The port clients reach (the host's), not websecure's inside the container (Traefik omits :443 itself).
        f"--entrypoints.web.http.redirections.entrypoint.to=:{inputs.https_port}",
        "--entrypoints.web.http.redirections.entrypoint.scheme=https",
        "--entrypoints.web.http.redirections.entrypoint.permanent=true",
        f"--entrypoints.websecure.address=:{WEBSECURE_PORT}",
        f"--providers.file.directory={DYNAMIC_DIR}",
        "--providers.file.watch=true",
        f"{resolver}.email={inputs.acme_email}",
        f"{resolver}.storage={acme_storage(inputs.ca_server)}",
        *(
            (f"{resolver}.tlschallenge=true",)
            if inputs.acme_challenge == "tls"
            else (
                # DNS-01: a TXT record through Cloudflare's API with the scoped token (lego reads
                # CF_DNS_API_TOKEN_FILE), checked on Cloudflare's resolvers: works behind its proxy and behind an LB.
                f"{resolver}.dnschallenge.provider=cloudflare",
                f"{resolver}.dnschallenge.resolvers=1.1.1.1:53,1.0.0.1:53",
            )
        ),
        f"{resolver}.keytype=EC256",  # smaller and faster handshakes than RSA 4096
        f"{resolver}.caserver={inputs.ca_server}",
        "--ping=true",
        # Prometheus' view of the edge (requests, statuses, latency per router), on a port only the overlay reaches.
        f"--entrypoints.metrics.address=:{METRICS_PORT}",
        "--metrics.prometheus=true",
        "--metrics.prometheus.entrypoint=metrics",
        "--metrics.prometheus.addrouterslabels=true",
        f"--metrics.prometheus.buckets={','.join(f'{b:g}' for b in latency_buckets(inputs.latency_objective_ms))}",
        "--log.level=INFO",
        "--accesslog=true",
        "--global.checknewversion=false",
        "--global.sendanonymoususage=false",
    ]
    if inputs.acme_ca_bundle:
        flags.append(f"{resolver}.cacertificates={ACME_CA_BUNDLE_PATH}")
    if inputs.proxy_protocol_ips:
        # Only these peers (the load balancer) may state a client address; anyone else's header is not read.
        trusted = ",".join(inputs.proxy_protocol_ips)
        flags += [
            f"--entrypoints.{entrypoint}.proxyprotocol.trustedips={trusted}" for entrypoint in ("web", "websecure")
        ]
    return tuple(flags)


def traefik_env(inputs: StackInputs) -> dict[str, str]:
    """Traefik's environment: only the DNS challenge's token file (a file, never the token in the environment)."""
    return {"CF_DNS_API_TOKEN_FILE": DNS_TOKEN_PATH} if inputs.acme_challenge == "dns" else {}


# Go's collector a quarter as often: Traefik spent 14-33 % less CPU a prediction at GOGC 400 than at Go's default 100,
# in two bench_traefik runs (docs/benchmarks.md). GOMEMLIMIT makes it collect harder before the container's limit:
# the limit less the buffering middleware's tmpfs (it counts in the same cgroup) and room for what Go does not manage.
TRAEFIK_GOGC = 400
TRAEFIK_TMPFS_MB = 64
TRAEFIK_UNMANAGED_MB = 32


def go_runtime_env(memory_mb: int) -> dict[str, str]:
    """Traefik's garbage collector settings for a container limited to ``memory_mb``."""
    heap_mb = memory_mb - TRAEFIK_TMPFS_MB - TRAEFIK_UNMANAGED_MB
    if heap_mb < 64:
        raise ValueError(f"Traefik's memory limit {memory_mb} MiB leaves {heap_mb} MiB for its heap; 64 at least")
    return {"GOGC": str(TRAEFIK_GOGC), "GOMEMLIMIT": f"{heap_mb}MiB"}


V2_INFER = "PathRegexp(`^/v2/models/[^/]+(/versions/[^/]+)?/infer$`)"


def model_labels(inputs: StackInputs, network: str, port: int) -> dict[str, str]:
    """Route `Host(domain)` on websecure with the resolver; never the private prefix; HSTS on every answer.

    Traefik balances across the task IPs, checks each on /health itself (a draining task answers 503), and retries:
    every route on connection errors before the request reached a task, and the prediction routes, which are pure
    functions of their input, also when a task died with the request in flight (502/504) or none was ready (503).
    Other POSTs (/observations) are not replayed: storing ground truth twice is worse than an error."""
    router = f"traefik.http.routers.{ROUTER}"
    predict = f"traefik.http.routers.{PREDICT_ROUTER}"
    middleware = "traefik.http.middlewares"
    service = f"traefik.http.services.{ROUTER}.loadbalancer"
    tls = {"entrypoints": "websecure", "tls": "true", "tls.certresolver": CERT_RESOLVER, "service": ROUTER}
    return {
        "traefik.enable": "true",
        "traefik.swarm.network": network,
        "traefik.swarm.lbswarm": "false",
        f"{router}.rule": f"Host(`{inputs.domain}`)"
        + "".join(
            f" && !PathPrefix(`{prefix}`)"
            for prefix in PRIVATE_PREFIXES + (() if inputs.public_docs else DOCS_PREFIXES)
        ),
        f"{router}.priority": "10",
        # The per-client limits first: a client over its budget is refused before its body is buffered.
        f"{router}.middlewares": f"{ROUTER}-ratelimit,{ROUTER}-inflight,{ROUTER}-limit,{ROUTER}-retry,{ROUTER}-headers",
        **{f"{router}.{key}": value for key, value in tls.items()},
        # Predictions, and V2 inference (the same pure function of its input): retried like them.
        f"{predict}.rule": f"Host(`{inputs.domain}`) && (PathPrefix(`/predict`) || {V2_INFER})",
        f"{predict}.priority": "20",
        f"{predict}.middlewares": (
            f"{ROUTER}-ratelimit,{ROUTER}-inflight,{ROUTER}-limit,{PREDICT_ROUTER}-retry,{ROUTER}-headers"
        ),
        **{f"{predict}.{key}": value for key, value in tls.items()},
        f"{middleware}.{ROUTER}-retry.retry.attempts": "5",
        f"{middleware}.{ROUTER}-retry.retry.initialinterval": go_duration(0.1),
        f"{middleware}.{PREDICT_ROUTER}-retry.retry.attempts": "5",
        f"{middleware}.{PREDICT_ROUTER}-retry.retry.initialinterval": go_duration(0.1),
        f"{middleware}.{PREDICT_ROUTER}-retry.retry.status": "502-504",
        f"{middleware}.{PREDICT_ROUTER}-retry.retry.retrynonidempotentmethod": "true",
        f"{middleware}.{PREDICT_ROUTER}-retry.retry.maxrequestbodybytes": str(RETRY_BODY_LIMIT),
        f"{middleware}.{ROUTER}-headers.headers.stsseconds": str(HSTS_PRELOAD_S if inputs.hsts_preload else HSTS_S),
        f"{middleware}.{ROUTER}-headers.headers.stsincludesubdomains": "true",
        **({f"{middleware}.{ROUTER}-headers.headers.stspreload": "true"} if inputs.hsts_preload else {}),
        f"{middleware}.{ROUTER}-headers.headers.contenttypenosniff": "true",
        f"{middleware}.{ROUTER}-headers.headers.framedeny": "true",
        f"{middleware}.{ROUTER}-headers.headers.referrerpolicy": "no-referrer",
        f"{middleware}.{ROUTER}-headers.headers.contentsecuritypolicy": "frame-ancestors 'none'",
        f"{middleware}.{ROUTER}-limit.buffering.maxrequestbodybytes": str(MAX_BODY_BYTES),
        # Per client (the connection's address, depth 0; behind the load balancer, the one its PROXY header states),
        # an IPv6 client by its /64: every VM and most homes get a whole /64, so a /128 would be one of 2^64 budgets.
        f"{middleware}.{ROUTER}-ratelimit.ratelimit.average": str(inputs.rate_limit_per_s),
        f"{middleware}.{ROUTER}-ratelimit.ratelimit.burst": str(inputs.rate_limit_burst),
        f"{middleware}.{ROUTER}-ratelimit.ratelimit.period": go_duration(1),
        f"{middleware}.{ROUTER}-ratelimit.ratelimit.sourcecriterion.ipstrategy.depth": "0",
        f"{middleware}.{ROUTER}-ratelimit.ratelimit.sourcecriterion.ipstrategy.ipv6subnet": str(IPV6_CLIENT_PREFIX),
        f"{middleware}.{ROUTER}-inflight.inflightreq.amount": str(inputs.in_flight_per_client),
        f"{middleware}.{ROUTER}-inflight.inflightreq.sourcecriterion.ipstrategy.depth": "0",
        f"{middleware}.{ROUTER}-inflight.inflightreq.sourcecriterion.ipstrategy.ipv6subnet": str(IPV6_CLIENT_PREFIX),
        f"{service}.server.port": str(port),
        f"{service}.healthcheck.path": "/health",
        f"{service}.healthcheck.interval": go_duration(PROXY_HEALTH_INTERVAL_S),
        f"{service}.healthcheck.timeout": go_duration(1),
        # A task that failed a request is out at once (a killed task's IP swallows connects until the dial timeout),
        # so the retries above go to a live one; the active check brings it back once it answers again.
        f"{service}.passivehealthcheck.maxfailedattempts": "1",
        f"{service}.passivehealthcheck.failurewindow": go_duration(5),
    }

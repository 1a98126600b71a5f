"""The Docker API as Traefik sees it: through a proxy that answers only the read requests its swarm provider makes.

`:ro` on a mounted Docker socket limits nothing (the API is a protocol, not a file), so a Traefik that held the
socket would be root on the host once compromised. Only this proxy holds the socket. It has no network at all: it
listens on a socket of its own in a volume that only Traefik also mounts (the model's tasks do not), and refuses
(403) every method but GET/HEAD and every path but the few listed here. HAProxy: Debian's package locally
(infra/local/images.py), the official image on the VM; the configuration below is the same file for both.
"""

from __future__ import annotations

DOCKER_API_CONTAINER = "mlapi-docker-api"
DOCKER_API_VOLUME = "mlapi-docker-api"  # a named volume holding the proxy's socket (not on the data volume)
PROXY_SOCKET_DIR = "/run/mlapi-docker-api"  # where both containers mount it
PROXY_SOCKET = f"{PROXY_SOCKET_DIR}/docker.sock"
DOCKER_API_IMAGE = "haproxy:3.2"  # the current HAProxy LTS branch (Debian 12's 2.6 locally reads the same config)
# Where the official image's entrypoint looks by default; the spec mounts the rendered file there in both images.
DOCKER_API_CONFIG_PATH = "/usr/local/etc/haproxy/haproxy.cfg"
DOCKER_API_CONFIG_FILE = "docker-api.cfg"  # on the host, beside Traefik's dynamic configuration
SOCKET = "/var/run/docker.sock"
ENDPOINT = f"unix://{PROXY_SOCKET}"

# What Traefik's swarm provider reads (checked against the running stack: tests/stack/test_stack.py):
# version negotiation (_ping, version), the services and their labels, the swarm networks, the tasks (dnsrr:
# Traefik balances across task IPs) and the node of each task. Item paths are allowed (GET /nodes/<id>); nothing
# below them (no /services/<id>/logs, no /tasks/<id>/logs).
READ_ENDPOINTS = ("_ping", "version", "services", "tasks", "networks", "nodes")
READ_METHODS = ("GET", "HEAD")


def allowed_path_regex(endpoints: tuple[str, ...] = READ_ENDPOINTS) -> str:
    """An optional API version prefix, one of the endpoints, at most one item segment."""
    return rf"^(/v[0-9]+\.[0-9]+)?/({'|'.join(endpoints)})(/[^/]+)?/?$"


def docker_api_config() -> str:
    """HAProxy: a plain-HTTP listener on its own socket (anyone who can reach the file may connect: only Traefik
    mounts it), a 403 for anything not read-only and listed, and the engine's socket as the one backend. Every
    request is logged to stdout (`docker logs mlapi-docker-api`)."""
    methods = " ".join(READ_METHODS)
    # The header keeps the module's old path: cloud-init carries this file, and a changed byte in user-data replaces
    # the server.
    return f"""# Written by the deploy step (infra/docker_api.py); edits are overwritten.
global
  log stdout format raw local0 info
  maxconn 64

defaults
  mode http
  log global
  option httplog
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s

frontend docker_api
  bind {PROXY_SOCKET} mode 666
  acl read_only method {methods}
  acl listed path_reg {allowed_path_regex()}
  # The allow-list reads the raw path, the engine's router decodes it: /services/x%2Flogs is one segment here and
  # GET /services/{{id}}/logs there. No Docker id or name needs a percent-escape (Traefik's filters are in the
  # query string), so a path holding any is refused whole: %2F, %5C, %2E in any case, and double encodings.
  acl escaped path_sub %
  http-request deny deny_status 403 if !read_only || !listed || escaped
  default_backend engine

backend engine
  server engine {SOCKET}
"""

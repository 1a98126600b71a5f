"""DNS-01 certificates (acmeChallenge=dns): a Cloudflare API token the program creates, scoped to this zone with
Zone:Read and DNS:Edit only, handed to Traefik as a file that only Traefik's user can read.

The permission group IDs are Cloudflare's fixed, account-independent IDs ("Zone Read", "DNS Write"), as listed by
its permission groups API; fixed here so that a preview needs no API call.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_cloudflare as cloudflare

from infra.host.setup import write_as_owner
from infra.spec.stack import TRAEFIK_UID
from infra.spec.traefik import DNS_TOKEN_FILE

# On the DNS records when certificates use DNS-01: the policy pack (policy/rules.py) then allows them proxied.
DNS01_COMMENT = "certificates by DNS-01"
ZONE_READ = "c8fed203ed3043cba015a93ad1616f1f"
DNS_WRITE = "4755a26eedb94da69e1066d98aa820be"


def zone_resources(zone_id: str) -> str:
    """The policy's resources: this one zone, nothing else in the account."""
    return json.dumps({f"com.cloudflare.api.account.zone.{zone_id}": "*"})


def scoped_token(name: str, zone_id: str, domain: str, opts: pulumi.ResourceOptions) -> cloudflare.ApiToken:
    return cloudflare.ApiToken(
        f"{name}-dns-challenge-token",
        name=f"{name} ACME DNS-01 for {domain}",
        policies=[
            cloudflare.ApiTokenPolicyArgs(
                effect="allow",
                permission_groups=[
                    cloudflare.ApiTokenPolicyPermissionGroupArgs(id=ZONE_READ),
                    cloudflare.ApiTokenPolicyPermissionGroupArgs(id=DNS_WRITE),
                ],
                resources=zone_resources(zone_id),
            )
        ],
        opts=opts,
    )


def install_token_command(data_root: str) -> str:
    """Reads the token from stdin into Traefik's directory, written as Traefik's user (0400): the directory is
    Traefik's, so root writing there could be led by a link to any file on the host."""
    path = f"{data_root.rstrip('/')}/traefik/{DNS_TOKEN_FILE}"
    return (
        "set -eu\n"
        "token=$(cat)\n"
        "[ -n \"$token\" ] || { echo 'the DNS challenge token is empty' >&2; exit 1; }\n"
        f'printf %s "$token" | {write_as_owner(path, TRAEFIK_UID, "0400")}\n'
        "echo dns token installed\n"
    )

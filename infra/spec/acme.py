"""The certificate authorities the stack knows by name: the operator's inputs choose one, Traefik keeps one store per
CA."""

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

"""Alert e-mails for real: Debian's Alertmanager runs the configuration the program renders for alertEmail and
alertSmtpUrl, and delivers an alert and its resolve notice to an SMTP server on 127.0.0.1 (aiosmtpd) that requires
STARTTLS and a login, as a mail provider does. The server's certificate comes from a test CA that Alertmanager trusts
through SSL_CERT_FILE (Go's standard variable): the rendered configuration is production's, unchanged."""

from __future__ import annotations

import datetime
import email
import email.policy
import json
import ssl
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra.spec.monitoring import AlertRoutes, alert_rules, email_route
from tests.support.alerting import running_alertmanager, wait_for
from tests.support.service import free_port

USER, PASSWORD = "alerts@fjord-ml.net", "p@ss:w0rd/with%odd"  # percent-encoded in the URL


def certificate_pair(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A test CA (written as ca.pem) and the server context of a certificate it signed for localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alert test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_file, chain, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key)
    return ca_file, context


@dataclass
class Inbox:
    """What the SMTP server accepted: each message with whether it came over TLS and after a login."""

    messages: list[tuple[email.message.EmailMessage, bool, bool, list[str]]] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd calls it by this name
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((message, session.ssl is not None, session.authenticated, list(envelope.rcpt_tos)))
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[int, Path, Inbox]]:
    ca_file, context = certificate_pair(tmp_path)
    inbox, port = Inbox(), free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,  # a mail provider's submission port: no plain-text session
        authenticator=authenticator,
        auth_require_tls=True,
        auth_required=True,
        # PLAIN, as providers offer it. aiosmtpd's LOGIN prompts ("User Name\0") are not the "Username:" that
        # Alertmanager's LOGIN expects and real servers send.
        auth_exclude_mechanism=["LOGIN"],
    )
    controller.start()
    try:
        yield port, ca_file, inbox
    finally:
        controller.stop()


def post_alert(api: str, labels: dict[str, str], annotations: dict[str, str], ends: bool = False) -> None:
    now = datetime.datetime.now(datetime.UTC)
    alert = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": (now - datetime.timedelta(minutes=1)).isoformat(),
    }
    if ends:
        alert["endsAt"] = now.isoformat()
    request = urllib.request.Request(
        f"{api}/api/v2/alerts", data=json.dumps([alert]).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def body_of(message: email.message.EmailMessage) -> str:
    return "\n".join(part.get_content() for part in message.walk() if part.get_content_maintype() == "text")


def smtp_url(password: str, port: int) -> str:
    quoted = urllib.parse.quote
    return f"smtp://{quoted(USER, safe='')}:{quoted(password, safe='')}@localhost:{port}"


def test_an_alert_and_its_resolve_notice_arrive_by_e_mail_over_starttls_with_a_login(
    tmp_path: Path, smtp_server: tuple[int, Path, Inbox]
) -> None:
    port, ca_file, inbox = smtp_server
    to, sender = "oncall@fjord-ml.net, cto@fjord-ml.net", "mlapi-alerts@api.fjord-ml.net"
    routes = AlertRoutes(email=email_route(smtp_url(PASSWORD, port), to, sender))
    rule = next(r for r in alert_rules(2, backups=True) if r.name == "BackupFailed")
    labels = {"alertname": rule.name, "severity": rule.severity}
    annotations = {"summary": rule.summary, "runbook": rule.runbook}
    with running_alertmanager(tmp_path, routes, ca_file) as (api, log):
        post_alert(api, labels, annotations)
        wait_for(lambda: len(inbox.messages) >= 1, 30, "the alert e-mail", log)
        firing, over_tls, logged_in, recipients = inbox.messages[0]
        assert over_tls and logged_in
        assert sorted(recipients) == ["cto@fjord-ml.net", "oncall@fjord-ml.net"]
        assert firing["From"] == sender
        assert firing["Subject"].startswith("[FIRING:1] BackupFailed"), firing["Subject"]
        assert rule.summary in body_of(firing)
        post_alert(api, labels, annotations, ends=True)
        wait_for(lambda: len(inbox.messages) >= 2, 60, "the resolve e-mail", log)
        resolved = inbox.messages[1][0]
        assert resolved["Subject"].startswith("[RESOLVED] BackupFailed"), resolved["Subject"]


def test_a_wrong_password_delivers_nothing_and_alertmanager_logs_why(
    tmp_path: Path, smtp_server: tuple[int, Path, Inbox]
) -> None:
    port, ca_file, inbox = smtp_server
    routes = AlertRoutes(email=email_route(smtp_url("wrong", port), "o@fjord-ml.net", "a@fjord-ml.net"))
    with running_alertmanager(tmp_path, routes, ca_file) as (api, log):
        post_alert(api, {"alertname": "EdgeErrors", "severity": "page"}, {"summary": "5xx"})
        wait_for(lambda: "535" in log.read_text(), 30, "the server's 535 (authentication failed)", log)
    assert inbox.messages == []

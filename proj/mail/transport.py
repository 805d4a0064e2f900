"""SMTP over smtplib: connections (plain, STARTTLS, TLS, auth), one transaction, reply classification."""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

from proj.errors import ConfigurationError, EmailDeliveryError, EmailRejectedError, ProjError
from proj.mail.mime import to_7bit
from proj.settings import Settings

logger = logging.getLogger(__name__)

# Servers drop idle sessions after a few minutes (RFC 5321 suggests 5); reconnect before that.
MAX_IDLE_SECONDS = 60.0


class StaleConnectionError(EmailDeliveryError):
    """Raised when a reused connection turns out closed before the transaction started."""


class TemporaryReplyError(EmailDeliveryError):
    """Raised when the server answered 4xx: it did not take the message, so trying later is safe."""


def classify(code: int, reply: bytes | str, stage: str) -> ProjError:
    """Map an SMTP reply to a retryable (4xx) or permanent (5xx) error that quotes it."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    message = f"{stage} refused: {code} {text}".strip()
    if 500 <= code < 600:
        return EmailRejectedError(message)
    return TemporaryReplyError(message)


def open_connection(settings: Settings) -> smtplib.SMTP:
    """Connect, secure (STARTTLS or implicit TLS) and log in as configured.

    Raises:
        EmailDeliveryError: refused, reset, timed out or a failed TLS handshake (worth retrying).
        EmailRejectedError / ConfigurationError: bad credentials, or the server lacks what we need.
    """
    context = _tls_context(settings.smtp_ca_file) if settings.smtp_security != "none" else None
    conn: smtplib.SMTP | None = None
    try:
        if settings.smtp_security == "tls":
            conn = smtplib.SMTP_SSL(
                settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout, context=context
            )
        else:
            conn = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
        _secure_and_login(conn, settings, context)
        return conn
    except BaseException as exc:
        if conn is not None:
            _close(conn)
        raise _translate(exc, "connect") from exc


@lru_cache(maxsize=4)
def _tls_context(ca_file: str) -> ssl.SSLContext:
    """One verifying TLS context per CA file: loading the CA bundle costs milliseconds."""
    return ssl.create_default_context(cafile=ca_file or None)


def _secure_and_login(conn: smtplib.SMTP, settings: Settings, context: ssl.SSLContext | None) -> None:
    """STARTTLS when asked for, then AUTH when a username is set."""
    conn.ehlo()
    if settings.smtp_security == "starttls":
        conn.starttls(context=context)
        conn.ehlo()
    if settings.smtp_username:
        conn.login(settings.smtp_username, settings.smtp_password)


def _translate(exc: BaseException, stage: str) -> BaseException:
    """The proj error for an smtplib or socket failure; anything else is returned unchanged."""
    if isinstance(exc, ProjError):
        return exc
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return EmailRejectedError(f"SMTP authentication failed: {exc.smtp_code}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return ConfigurationError(f"SMTP server does not support what SMTP_SECURITY asks: {exc}")
    if isinstance(exc, smtplib.SMTPResponseException):
        return classify(exc.smtp_code, exc.smtp_error, stage)
    if isinstance(exc, smtplib.SMTPServerDisconnected | OSError):  # refused, reset, timeout, TLS
        return EmailDeliveryError(f"SMTP {stage} failed: {type(exc).__name__}: {exc}")
    return exc


def _close(conn: smtplib.SMTP) -> None:
    """Say goodbye politely, or just drop the socket if the server is gone."""
    try:
        conn.quit()
    except (smtplib.SMTPException, OSError):
        conn.close()


def transact(
    conn: smtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    before_data: Callable[[], None],
    *,
    reused: bool = False,
) -> dict[str, str]:
    """Send one message on an open connection; return the refused recipients with their replies.

    `before_data` runs once every recipient was answered and just before DATA, so the ledger can
    record that the server may from now on hold the message.
    """
    data, options = body_for(conn, data)
    try:
        code, reply = conn.mail(sender, options)
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        if reused:
            raise StaleConnectionError(f"reused SMTP connection was closed: {exc}") from exc
        raise _translate(exc, "MAIL FROM") from exc
    try:
        if code != 250:
            raise classify(code, reply, "MAIL FROM")
        refused = _rcpt(conn, recipients)
        before_data()
        code, reply = conn.data(data)
        if code != 250:
            raise classify(code, reply, "DATA")
        return refused
    except ProjError:
        _reset(conn)
        raise
    except (smtplib.SMTPException, OSError) as exc:
        raise _translate(exc, "transaction") from exc


def body_for(conn: smtplib.SMTP, data: bytes) -> tuple[bytes, list[str]]:
    """The message and MAIL FROM options for this server: 8-bit data declared (RFC 6152) or re-encoded.

    Sending 8-bit bytes undeclared, or to a server that did not offer 8BITMIME in its EHLO reply,
    lets it refuse or mangle the message; such a server gets the 8-bit parts base64-encoded instead.
    """
    if data.isascii():
        return data, []
    if conn.has_extn("8bitmime"):
        return data, ["BODY=8BITMIME"]
    logger.debug("SMTP server lacks 8BITMIME; sending the 8-bit parts base64-encoded")
    return to_7bit(data), []


def _rcpt(conn: smtplib.SMTP, recipients: Sequence[str]) -> dict[str, str]:
    """RCPT TO each recipient; fail like the server did when it refused all of them."""
    refused: dict[str, str] = {}
    codes = []
    for rcpt in recipients:
        code, reply = conn.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = f"{code} {reply.decode(errors='replace')}"
            codes.append(code)
    if len(refused) == len(recipients):
        # Retry only if some refusal was temporary; all-5xx is final.
        worst = min(codes) if any(c < 500 for c in codes) else codes[0]
        raise classify(worst, "; ".join(f"{k}: {v}" for k, v in refused.items()), "RCPT TO")
    return refused


def _reset(conn: smtplib.SMTP) -> None:
    """RSET after a refused transaction so the connection can carry the next one."""
    try:
        conn.rset()
    except (smtplib.SMTPException, OSError):
        conn.close()


class ThreadConnections:
    """One SMTP connection per thread for transactional mail; a broken one is replaced once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def send(
        self, sender: str, recipients: Sequence[str], data: bytes, before_data: Callable[[], None]
    ) -> dict[str, str]:
        """Send on this thread's connection, reconnecting once if it went stale."""
        conn = self._reusable()
        if conn is not None:
            try:
                return self._send(conn, sender, recipients, data, before_data, reused=True)
            except StaleConnectionError:
                logger.info("SMTP connection went stale; reconnecting")
        conn = open_connection(self.settings)
        self._local.conn = conn
        return self._send(conn, sender, recipients, data, before_data, reused=False)

    def _send(
        self,
        conn: smtplib.SMTP,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        before_data: Callable[[], None],
        *,
        reused: bool,
    ) -> dict[str, str]:
        try:
            refused = transact(conn, sender, recipients, data, before_data, reused=reused)
        except BaseException as exc:
            if not isinstance(exc, EmailRejectedError):
                self.discard()  # state unknown after a transport error: never reuse it
            raise
        self._local.used_at = time.monotonic()
        return refused

    def _reusable(self) -> smtplib.SMTP | None:
        """This thread's connection if it was used recently enough to still be open."""
        conn: smtplib.SMTP | None = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - getattr(self._local, "used_at", 0.0) > MAX_IDLE_SECONDS:
            self.discard()
            return None
        return conn

    def discard(self) -> None:
        """Drop this thread's connection without a QUIT that a hung server would never answer."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()


class ChunkConnection:
    """One connection for a bulk chunk: opened on first use, replaced after a transport error."""

    # Consecutive failed connects after which the rest of the chunk is deferred without trying.
    MAX_CONNECT_FAILURES = 2

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: smtplib.SMTP | None = None
        self.connect_failures = 0

    def send(
        self, sender: str, recipients: Sequence[str], data: bytes, before_data: Callable[[], None]
    ) -> dict[str, str]:
        """Send one message of the chunk."""
        if self.conn is None:
            if self.connect_failures >= self.MAX_CONNECT_FAILURES:
                raise EmailDeliveryError("SMTP server unreachable; deferring the rest of the chunk")
            try:
                self.conn = open_connection(self.settings)
            except EmailDeliveryError:
                self.connect_failures += 1
                raise
            self.connect_failures = 0
        try:
            return transact(self.conn, sender, recipients, data, before_data)
        except BaseException as exc:
            if not isinstance(exc, EmailRejectedError | TemporaryReplyError):
                self.conn.close()
                self.conn = None
            raise

    def close(self) -> None:
        """QUIT at the end of the chunk."""
        if self.conn is not None:
            _close(self.conn)
            self.conn = None

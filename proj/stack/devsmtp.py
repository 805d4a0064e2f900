"""A development SMTP server (aiosmtpd) that keeps every message and can be told to misbehave.

The local stack runs it on 127.0.0.1:1025 and stores messages as .eml files under .local/mail/;
tests run it in-process and script replies (451, 550, disconnect) and delays.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

logger = logging.getLogger(__name__)

DISCONNECT = "disconnect"


@dataclass
class Received:
    """One message as the server accepted it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> EmailMessage:
        """The message parsed with the modern email policy."""
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class MailSink:
    """aiosmtpd handler: records messages, optionally to a folder, with scripted faults."""

    mail_dir: Path | None = None
    delay: float = 0.0
    data_replies: deque[str] = field(default_factory=deque)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Tests: called with each stored message before the 250 goes out (e.g. to freeze a process).
    on_stored: Callable[[Received], None] | None = None
    # Tests: while set, RCPT replies wait (clients stop before DATA); `held` counts who waits.
    hold_rcpt: threading.Event = field(default_factory=threading.Event)
    held: int = 0

    def fail_next(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies ("451 ...", "550 ...", or DISCONNECT)."""
        self.data_replies.extend(replies)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept a recipient unless a reply was scripted for it."""
        await self._pause()
        await self._hold()
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Store the message, or play the next scripted fault."""
        await self._pause()
        if self.data_replies:
            reply = self.data_replies.popleft()
            if reply == DISCONNECT:
                server.transport.close()
                return "421 closing"
            return reply
        item = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
        with self.lock:
            self.received.append(item)
        if self.mail_dir is not None:
            self._save(item)
        if self.on_stored is not None:
            self.on_stored(item)
        return "250 Message accepted for delivery"

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def _hold(self) -> None:
        if not self.hold_rcpt.is_set():
            return
        self.held += 1
        while self.hold_rcpt.is_set():
            await asyncio.sleep(0.01)
        self.held -= 1

    def _save(self, item: Received) -> None:
        assert self.mail_dir is not None
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.eml"
        tmp = self.mail_dir / f".{name}.tmp"
        tmp.write_bytes(item.data)
        tmp.replace(self.mail_dir / name)
        logger.info("Stored message from %s to %s as %s", item.mail_from, item.rcpt_tos, name)


class _Authenticator:
    """Accept exactly one username and password."""

    def __init__(self, username: str, password: str) -> None:
        self._expected = (username.encode(), password.encode())

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            (auth_data.login, auth_data.password) == self._expected
        )
        # handled=False on failure, or aiosmtpd sends no reply and the client hangs.
        return AuthResult(success=ok, handled=ok, auth_data=auth_data)


def start(
    handler: MailSink,
    host: str = "127.0.0.1",
    port: int = 1025,
    *,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    auth: tuple[str, str] | None = None,
) -> Controller:
    """Start the server in a background thread and return its controller."""
    kwargs: dict[str, Any] = {"tls_context": tls_context, "require_starttls": require_starttls}
    if auth is not None:
        kwargs.update(authenticator=_Authenticator(*auth), auth_require_tls=tls_context is not None)
    else:
        kwargs.update(auth_require_tls=False)
    controller = Controller(handler, hostname=host, port=port, ready_timeout=10, **kwargs)
    controller.start()
    return controller


def main(argv: list[str] | None = None) -> None:
    """Run the development server until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m proj.stack.devsmtp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--mail-dir", type=Path, default=Path(".local/mail"))
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each reply")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s devsmtp %(message)s")
    controller = start(MailSink(mail_dir=args.mail_dir, delay=args.delay), args.host, args.port)
    logger.info("SMTP server on %s:%s storing mail in %s", args.host, args.port, args.mail_dir)
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()

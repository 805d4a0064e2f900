"""The MIME message of a checked request: text with an HTML alternative, attachments, our headers.

Built with `EmailMessage` and the modern SMTP policy, which refuses CR/LF in any header on its own;
`proj.mail.message.validate` has already refused every line break and control character, so this
is the second guard against header injection, not the only one.
"""

from __future__ import annotations

from collections.abc import Iterable
from email import policy
from email.message import EmailMessage
from email.utils import formatdate

from proj.errors import InvalidEmailError, ProjError
from proj.files.sniff import sniff
from proj.files.storage import Storage
from proj.mail.message import EmailRequest
from proj.settings import Settings


def build_message(request: EmailRequest, message_id: str, settings: Settings) -> EmailMessage:
    """The MIME message: text with an HTML alternative, attachments with their sniffed type."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = settings.mail_from
    for name, values in (("To", request.to), ("Cc", request.cc), ("Reply-To", request.reply_to)):
        if values:
            msg[name] = ", ".join(values)
    msg["Subject"] = request.subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id
    for name, value in request.headers:
        msg[name] = value
    if request.text:
        msg.set_content(request.text)
        if request.html:
            msg.add_alternative(request.html, subtype="html")
    else:
        msg.set_content(request.html or "", subtype="html")
    _attach(msg, request.attachments, settings)
    return msg


def to_bytes(msg: EmailMessage) -> bytes:
    """The message as SMTP carries it (CRLF line ends, from the SMTP policy)."""
    return msg.as_bytes()


def _attach(msg: EmailMessage, keys: Iterable[str], settings: Settings) -> None:
    """Add each attachment with the type sniffed from its content, never trusted from its name."""
    keys = list(keys)
    if not keys:
        return
    storage = Storage(settings.files_root)
    for key in keys:
        try:
            path = storage.file(key)
            maintype, _, subtype = sniff(path).mime.partition("/")
            data = path.read_bytes()
        except ProjError as exc:
            raise InvalidEmailError(f"attachment {key!r}: {exc}") from exc
        msg.add_attachment(data, maintype=maintype, subtype=subtype or "octet-stream",
                           filename=path.name)

"""Checking a send request before anything is sent: addresses, headers, body, template, attachments."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from email_validator import EmailNotValidError, validate_email

from proj.errors import InvalidEmailError, ProjError
from proj.files.storage import Storage
from proj.mail.templates import render
from proj.settings import Settings, get_settings

# Extra headers callers may set; everything else (From, To, Bcc, Message-ID...) is ours to write.
ALLOWED_HEADERS = frozenset(
    h.lower()
    for h in (
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "List-Id",
        "In-Reply-To",
        "References",
        "Precedence",
        "Auto-Submitted",
    )
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
# RFC 5322 line limit; a longer subject or header value is a bug upstream, not a message.
MAX_HEADER_LENGTH = 998
MAX_RECIPIENTS = 100
MAX_KEY_LENGTH = 200
# RFC 5321's path limit; checked before email-validator, which takes a second over a megabyte.
MAX_ADDRESS_LENGTH = 254
MAX_TEMPLATE_NAME = 100
# Characters of a caller's value an error message quotes: the message is logged, stored with the
# result and the dead letter, and scrubbed by a regex that took hours over a 2 MB argument.
SHOWN = 200


@dataclass(frozen=True)
class EmailRequest:
    """A checked message, ready to build: every address normalised, every header value clean."""

    to: tuple[str, ...]
    subject: str
    text: str
    html: str | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[str, ...] = ()
    idempotency_key: str = ""

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: To, Cc and Bcc, each once."""
        return list(dict.fromkeys((*self.to, *self.cc, *self.bcc)))


def validate(
    to: str | Sequence[str] = (),
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    *,
    cc: str | Sequence[str] | None = None,
    bcc: str | Sequence[str] | None = None,
    reply_to: str | Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[str] | None = None,
    template: str | None = None,
    context: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
) -> EmailRequest:
    """Check everything `send_email` would, and return the request it would send.

    Raises:
        InvalidEmailError: with a sentence a person understands, before anything is sent.
    """
    settings = settings or get_settings()
    if template is not None:
        if subject is not None or text is not None or html is not None:
            raise InvalidEmailError("give either a template or subject/text/html, not both")
        subject, text, html = render(template_name(template), context or {}, settings.mail_templates_dir)
    request = EmailRequest(
        to=_addresses(to, "to"),
        subject=_header_value("subject", subject or ""),
        text=_body(text, html, settings.email_max_body_chars),
        html=html if html else None,
        cc=_addresses(cc, "cc"),
        bcc=_addresses(bcc, "bcc"),
        reply_to=_addresses(reply_to, "reply_to"),
        headers=_extra_headers(headers),
        attachments=_attachments(attachments, settings),
    )
    if not request.to and not request.cc and not request.bcc:
        raise InvalidEmailError("a message needs at least one recipient in to, cc or bcc")
    if len(request.recipients) > MAX_RECIPIENTS:
        raise InvalidEmailError(f"at most {MAX_RECIPIENTS} recipients per message; use send_bulk")
    return _with_key(request, idempotency_key)


def _addresses(value: str | Sequence[str] | None, field: str) -> tuple[str, ...]:
    """Normalise one address or a list of them; display names and lists in one string are refused."""
    if value is None:
        return ()
    items = _items(value, field, "an address or a list of addresses")
    # Counted before each is checked: 20,000 copies of one address took email-validator a second.
    if len(items) > MAX_RECIPIENTS:
        raise InvalidEmailError(f"{field}: {len(items)} addresses; at most {MAX_RECIPIENTS} per message")
    return tuple(dict.fromkeys(address(item, field) for item in items))


def _items(value: object, field: str, expected: str) -> list[object]:
    """A string as a list of one, a list (or tuple) as it is; JSON can carry anything else too."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return list(value)
    raise InvalidEmailError(f"{field}: expected {expected}, got {type(value).__name__}")


def address(value: object, field: str = "address") -> str:
    """One plain address (no display name), checked by email-validator, in its ASCII form."""
    if not isinstance(value, str):
        raise InvalidEmailError(f"{field}: expected an address string, got {type(value).__name__}")
    if len(value) > MAX_ADDRESS_LENGTH:
        raise InvalidEmailError(
            f"{field}: {value!r:.{SHOWN}} is not a valid email address: "
            f"{len(value)} characters, at most {MAX_ADDRESS_LENGTH}"
        )
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise InvalidEmailError(f"{field}: {value!r} is not a valid email address: {exc}") from None
    return str(checked.ascii_email or checked.normalized)


def template_name(name: object) -> str:
    """A template name short enough to quote; proj.mail.templates checks the rest."""
    if not isinstance(name, str) or len(name) > MAX_TEMPLATE_NAME:
        raise InvalidEmailError(
            f"template: {name!r:.{SHOWN}} is not a template name (at most {MAX_TEMPLATE_NAME} characters)"
        )
    return name


def _header_value(name: str, value: object) -> str:
    """A header value without line breaks (the header-injection guard) and within the line limit."""
    if not isinstance(value, str):
        raise InvalidEmailError(f"{name}: expected text, got {type(value).__name__}")
    # str.splitlines() is what the email package splits on: \x1c-\x1e, \x85, \u2028 as well as CR/LF.
    if len(value.splitlines()) > 1 or any(_is_control(ch) for ch in value):
        raise InvalidEmailError(f"{name}: line breaks and control characters are not allowed in a header")
    if len(value) > MAX_HEADER_LENGTH:
        raise InvalidEmailError(f"{name}: longer than {MAX_HEADER_LENGTH} characters")
    return value


def _is_control(ch: str) -> bool:
    """A control or line/paragraph separator character; a tab is fine in a header."""
    return ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def _body(text: str | None, html: str | None, limit: int) -> str:
    """The text part; a message with neither text nor HTML, or a part over the limit, is refused."""
    for name, part in (("text", text), ("html", html)):
        if part is not None and not isinstance(part, str):
            raise InvalidEmailError(f"{name}: expected text, got {type(part).__name__}")
        if part is not None and len(part) > limit:
            raise InvalidEmailError(f"{name}: {len(part)} characters, over the limit of {limit}")
    if not (text or "").strip() and not (html or "").strip():
        raise InvalidEmailError("a message needs a body: text, html or a template")
    return text or ""


def _extra_headers(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Allowlisted extra headers (and any X-*), names and values checked."""
    if not headers:
        return ()
    if not isinstance(headers, Mapping):
        raise InvalidEmailError("headers: expected a mapping of header name to value")
    checked = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidEmailError(f"headers: {name!r:.{SHOWN}} is not a valid header name")
        if name.lower() not in ALLOWED_HEADERS and not name.lower().startswith("x-"):
            raise InvalidEmailError(f"headers: {name!r} may not be set by callers")
        checked.append((name, _header_value(f"header {name}", value)))
    return tuple(checked)


def _attachments(keys: Sequence[str] | None, settings: Settings) -> tuple[str, ...]:
    """Storage keys that exist under the storage root and fit the size limit together."""
    if not keys:
        return ()
    checked, storage, total = [], Storage(settings.files_root), 0
    for key in _items(keys, "attachments", "a storage key or a list of them"):
        if not isinstance(key, str):
            raise InvalidEmailError(f"attachments: expected a storage key string, got {type(key).__name__}")
        checked.append(key)
        try:
            total += storage.file(key).stat().st_size
        except ProjError as exc:  # unsafe path, missing or empty file
            raise InvalidEmailError(f"attachment {key!r:.{SHOWN}}: {exc}") from exc
    if total > settings.email_max_attachment_bytes:
        raise InvalidEmailError(
            f"attachments total {total} bytes, over the limit of {settings.email_max_attachment_bytes}"
        )
    return tuple(checked)


def _with_key(request: EmailRequest, key: str | None) -> EmailRequest:
    """The request with its idempotency key: the given one, else a hash of content and recipients."""
    if key is None:
        body = json.dumps(asdict(request), sort_keys=True, ensure_ascii=False)
        key = "auto:" + hashlib.sha256(body.encode()).hexdigest()
    elif not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidEmailError(f"idempotency_key: 1 to {MAX_KEY_LENGTH} printable characters")
    return replace(request, idempotency_key=key)


def message_id_for(key: str, settings: Settings) -> str:
    """The Message-ID derived from an idempotency key: a redelivery carries the same one."""
    domain = sender_address(settings).rpartition("@")[2] or "localhost"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>"


def sender_address(settings: Settings) -> str:
    """The bare envelope sender from MAIL_FROM, which may carry a display name."""
    match = re.search(r"<([^<>]+)>\s*$", settings.mail_from)
    return (match.group(1) if match else settings.mail_from).strip()

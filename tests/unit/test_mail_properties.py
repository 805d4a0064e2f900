"""Property tests: any address, subject and body ends in a buildable message or a clear InvalidEmailError."""

from __future__ import annotations

from email import message_from_bytes, policy

from hypothesis import given, settings
from hypothesis import strategies as st

from proj.errors import InvalidEmailError
from proj.mail import build_message, message_id_for, to_bytes, validate
from proj.settings import Settings

SETTINGS = Settings()
addresses = st.one_of(
    st.emails(),
    st.text(max_size=60),
    st.builds("{}@{}.example.com".format, st.text(max_size=20), st.text(max_size=10)),
)
texts = st.text(max_size=300)


def _normalise(value: str) -> str:
    return " ".join(value.split())


@settings(max_examples=300, deadline=None)
@given(to=addresses, subject=texts, text=texts)
def test_input_is_sent_intact_or_refused_clearly(to, subject, text):
    try:
        request = validate(to=to, subject=subject, text=text, settings=SETTINGS)
    except InvalidEmailError as exc:
        assert str(exc)  # a sentence, never an empty error
        return
    raw = to_bytes(build_message(request, message_id_for(request.idempotency_key, SETTINGS), SETTINGS))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    parsed = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=policy.default)
    assert _normalise(parsed["Subject"]) == _normalise(subject)
    assert parsed["To"] == request.to[0] and "\n" not in parsed["To"]
    assert len(parsed.get_all("To")) == 1 and parsed["Bcc"] is None
    body = parsed.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert body.rstrip("\n") == text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=20).filter(lambda s: s.isprintable()), value=texts)
def test_extra_headers_are_allowlisted_and_single_line(name, value):
    try:
        request = validate(
            to="a@example.com", subject="s", text="t", headers={name: value}, settings=SETTINGS
        )
    except InvalidEmailError:
        return
    assert name.lower().startswith("x-") or name.lower() in (
        "list-id",
        "list-unsubscribe",
        "references",
        "list-unsubscribe-post",
        "in-reply-to",
        "precedence",
        "auto-submitted",
    )
    raw = to_bytes(build_message(request, "<x@example.com>", SETTINGS))
    parsed = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=policy.default)
    assert parsed["To"] == "a@example.com" and parsed["Bcc"] is None
    assert _normalise(str(parsed[name])) == _normalise(value)

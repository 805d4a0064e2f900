"""The email services without Celery: validation, templates, MIME, reply classification, limits."""

from __future__ import annotations

import os
import time
from email import message_from_bytes, policy
from pathlib import Path
from types import SimpleNamespace

import pytest

from proj.credentials import scrub
from proj.errors import EmailDeliveryError, EmailRejectedError, InvalidEmailError, TransientError
from proj.mail import build_message, bulk, message_id_for, to_bytes, validate
from proj.mail.retry import backoff_cap, outage_bound, retry_delay
from proj.mail.transport import body_for, classify
from proj.settings import Settings
from proj.stores.ratelimit import parse_limits


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    root = tmp_path / "files"
    root.mkdir()
    return Settings(
        files_root=root, mail_from="Proj <noreply@mail.example.com>", email_max_attachment_bytes=1000
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"to": "a@example.com", "subject": "x\r\nBcc: v@example.com", "text": "t"}, "line breaks"),
        ({"to": "a@example.com", "subject": "x\nBcc: v@example.com", "text": "t"}, "line breaks"),
        (
            {"to": "a@example.com", "subject": "s", "text": "t", "headers": {"X-A": "1\r\nBcc: v@e.com"}},
            "line breaks",
        ),
        (
            {"to": "a@example.com", "subject": "s", "text": "t", "headers": {"Bcc": "v@example.com"}},
            "may not be set",
        ),
        (
            {"to": "a@example.com", "subject": "s", "text": "t", "headers": {"X-A\r\nBcc": "v"}},
            "not a valid header name",
        ),
        ({"to": "a@example.com\r\nBcc: v@example.com", "subject": "s", "text": "t"}, "not a valid email"),
        ({"to": "Ann <a@example.com>", "subject": "s", "text": "t"}, "not a valid email"),
        ({"to": "a@example.com, b@example.com", "subject": "s", "text": "t"}, "not a valid email"),
        ({"to": "a@localhost", "subject": "s", "text": "t"}, "not a valid email"),
        ({"to": [], "subject": "s", "text": "t"}, "at least one recipient"),
        ({"to": "a@example.com", "subject": "s", "text": "   "}, "needs a body"),
        ({"to": "a@example.com", "subject": "s"}, "needs a body"),
        ({"to": "a@example.com", "template": "nope"}, "unknown template"),
        ({"to": "a@example.com", "template": "../welcome"}, "not a template name"),
        ({"to": "a@example.com", "template": "welcome", "context": {"name": "x"}}, "is undefined"),
        ({"to": "a@example.com", "template": "welcome", "subject": "s"}, "not both"),
        ({"to": "a@example.com", "subject": "s", "text": "t", "idempotency_key": "a\nb"}, "idempotency_key"),
        ({"to": "a@example.com", "subject": "s" * 999, "text": "t"}, "longer than"),
        # JSON carries any type: each is an InvalidEmailError, not a TypeError from iterating it.
        ({"to": 5, "text": "t"}, "to: expected an address or a list of addresses, got int"),
        ({"to": {"a": 1}, "text": "t"}, "to: expected an address or a list"),
        ({"to": "a@example.com", "cc": 1.5, "text": "t"}, "cc: expected an address"),
        ({"to": "a@example.com", "text": "t", "attachments": 5}, "attachments: expected a storage key"),
        ({"to": "a@example.com", "text": "t", "attachments": [["k"]]}, "expected a storage key string"),
        ({"to": ["a@example.com"] * 101, "text": "t"}, "101 addresses; at most 100"),
    ],
)
def test_bad_input_is_refused_with_a_clear_reason(settings, kwargs, reason):
    with pytest.raises(InvalidEmailError, match=reason):
        validate(**kwargs, settings=settings)


HUGE = "x" * 2_000_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"to": HUGE, "text": "t"},
        {"to": ["a@example.com", HUGE], "text": "t"},
        {"to": "a@example.com", "text": "t", "headers": {HUGE: "v"}},
        {"to": "a@example.com", "template": HUGE},
        {"to": "a@example.com", "template": [HUGE]},
        {"to": "a@example.com", "text": "t", "attachments": [HUGE]},
    ],
)
def test_a_huge_argument_is_refused_fast_with_a_short_message(settings, kwargs):
    # The message is logged, stored and scrubbed (proj.credentials.scrub, a regex that took hours
    # over 2 MB of letters while holding the GIL: the whole email worker stopped).
    started = time.monotonic()
    with pytest.raises(InvalidEmailError) as info:
        validate(**kwargs, settings=settings)
    assert len(str(info.value)) < 500
    scrub(str(info.value))
    assert time.monotonic() - started < 1


def test_a_bulk_send_with_a_huge_template_name_is_refused_with_a_short_message(settings):
    mailer = SimpleNamespace(settings=settings)
    with pytest.raises(InvalidEmailError, match="not a template name") as info:
        bulk.run(mailer, ["x" * 2_000_000], [{"to": "a@example.com"}], None, "id", print, False)
    assert len(str(info.value)) < 500


def test_bodies_and_bulk_lists_over_their_limits_are_refused(settings):
    env = {
        "EMAIL_MAX_BODY_CHARS": "10",
        "EMAIL_BULK_MAX_RECIPIENTS": "3",
        "FILES_ROOT": str(settings.files_root),
    }
    small = Settings.from_env(env)
    assert validate("a@example.com", "s", "x" * 10, settings=small).text == "x" * 10
    for kwargs in ({"text": "x" * 11}, {"text": "t", "html": "x" * 11}):
        with pytest.raises(InvalidEmailError, match="11 characters, over the limit of 10"):
            validate("a@example.com", "s", **kwargs, settings=small)
    with pytest.raises(InvalidEmailError, match="over the limit"):  # a rendered template too
        validate(
            "a@example.com",
            template="welcome",
            context=dict.fromkeys(("name", "product", "url"), "x"),
            settings=small,
        )
    with pytest.raises(InvalidEmailError, match="recipients: 4, over the limit of 3 per send_bulk"):
        bulk.run(
            SimpleNamespace(settings=small),
            "welcome",
            [{"to": "a@example.com"}] * 4,
            None,
            "id",
            print,
            False,
        )
    assert Settings().email_max_body_chars == 1_000_000
    assert Settings().email_bulk_max_recipients == 10_000


@pytest.mark.parametrize("key", ["", "k" * 168, "a\nb", 5, ["k"], {"k": 1}])
def test_a_bulk_idempotency_key_of_another_type_or_length_is_refused_for_the_whole_call(settings, key):
    mailer = SimpleNamespace(settings=settings)
    with pytest.raises(InvalidEmailError, match="idempotency_key: 1 to 167 printable characters"):
        bulk.run(mailer, "welcome", [{"to": "a@example.com"}], key, "id", print, False)


def test_attachments_must_exist_stay_inside_the_root_and_fit(settings, tmp_path):
    (settings.files_root / "ok.bin").write_bytes(b"x" * 600)
    (settings.files_root / "big.bin").write_bytes(b"x" * 600)
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", settings.files_root / "link.txt")
    base = {"to": "a@example.com", "subject": "s", "text": "t", "settings": settings}
    assert validate(**base, attachments=["ok.bin"]).attachments == ("ok.bin",)
    for keys, reason in [
        (["missing.bin"], "no file"),
        (["../secret.txt"], "must be relative"),
        (["/etc/passwd"], "must be relative"),
        (["link.txt"], "outside the storage root"),
        (["ok.bin", "big.bin"], "over the limit"),
    ]:
        with pytest.raises(InvalidEmailError, match=reason):
            validate(**base, attachments=keys)


def test_template_renders_text_and_autoescaped_html(settings):
    request = validate(
        to="a@example.com",
        template="welcome",
        settings=settings,
        context={"name": "<script>x</script>", "product": "P&Q", "url": "https://e.com/?a&b"},
    )
    assert request.subject == "Welcome to P&Q, <script>x</script>"
    assert "Hello <script>x</script>," in request.text
    assert request.html is not None and "&lt;script&gt;x&lt;/script&gt;" in request.html
    assert "<script>" not in request.html


def test_addresses_are_normalised_and_deduplicated(settings):
    request = validate(
        to=["A@Bücher.de", "A@bücher.de"],
        cc="b@example.com",
        bcc=["b@example.com"],
        subject="s",
        text="t",
        settings=settings,
    )
    assert request.to == ("A@xn--bcher-kva.de",)
    assert request.recipients == ["A@xn--bcher-kva.de", "b@example.com"]


def test_idempotency_key_and_message_id(settings):
    first = validate(to="a@example.com", subject="s", text="t", settings=settings)
    same = validate(to="a@example.com", subject="s", text="t", settings=settings)
    other = validate(to="a@example.com", subject="s", text="u", settings=settings)
    assert first.idempotency_key == same.idempotency_key != other.idempotency_key
    given = validate(to="a@example.com", subject="s", text="t", idempotency_key="order-7", settings=settings)
    assert given.idempotency_key == "order-7"
    message_id = message_id_for("order-7", settings)
    assert message_id == message_id_for("order-7", settings) != message_id_for("order-8", settings)
    assert message_id.startswith("<") and message_id.endswith("@mail.example.com>")


def test_built_message_has_alternative_parts_and_sniffed_attachment(settings):
    (settings.files_root / "notes.pdf").write_bytes(b"GIF89a" + b"\x00" * 20)  # a GIF named .pdf
    request = validate(
        to="a@example.com",
        bcc="hidden@example.com",
        subject="Grüße",
        text="plain",
        html="<p>rich</p>",
        attachments=["notes.pdf"],
        settings=settings,
    )
    raw = to_bytes(build_message(request, "<id-1@mail.example.com>", settings))
    msg = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=policy.default)
    assert msg["Subject"] == "Grüße" and msg["Message-ID"] == "<id-1@mail.example.com>"
    assert msg["From"] == "Proj <noreply@mail.example.com>" and msg["Bcc"] is None
    assert msg.get_body(("plain",)).get_content().rstrip("\n") == "plain"
    assert msg.get_body(("html",)).get_content().rstrip("\n") == "<p>rich</p>"
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_content_type() == "image/gif"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (421, EmailDeliveryError),
        (450, EmailDeliveryError),
        (451, EmailDeliveryError),
        (452, EmailDeliveryError),
        (550, EmailRejectedError),
        (552, EmailRejectedError),
        (554, EmailRejectedError),
    ],
)
def test_smtp_replies_are_classified(code, kind):
    error = classify(code, b"4.0.0 some text", "DATA")
    assert isinstance(error, kind)
    assert isinstance(error, TransientError) == (code < 500)
    assert f"{code} 4.0.0 some text" in str(error)


def test_rate_limit_spec():
    rates = parse_limits("gmail.com=20/s, *=200/m ,yahoo.com=3600/h")
    assert rates["gmail.com"].interval_ms == 50 and rates["gmail.com"].burst == 2
    assert rates["*"].interval_ms == 300 and rates["*"].burst == 1
    assert rates["yahoo.com"].interval_ms == 1000
    assert parse_limits("") == {}
    for bad in ("gmail.com", "gmail.com=20", "gmail.com=0/s", "gmail.com=20/d"):
        with pytest.raises(Exception, match="EMAIL_RATE_LIMITS"):
            parse_limits(bad)


def test_retries_outlast_a_ten_minute_smtp_outage_with_the_default_settings():
    defaults = Settings.from_env({})
    assert (defaults.email_retry_backoff_max, defaults.email_max_retries) == (600, 10)
    # Computed, not timed: the sum of the shortest possible delays, 1 + 2 + 4 ... + 256 + 300.
    assert outage_bound(defaults) == 811 >= 600


def test_each_retry_delay_lies_between_half_its_cap_and_its_cap():
    settings = Settings(email_retry_backoff_max=600)
    assert [backoff_cap(n, 600) for n in range(11)] == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]
    assert backoff_cap(10_000, 600) == 600  # no huge integers, however often a task was retried
    for retries in range(12):
        cap = backoff_cap(retries, 600)
        delays = [retry_delay(retries, settings) for _ in range(200)]
        assert all(cap / 2 <= delay <= cap for delay in delays)
        assert len(set(delays)) > 1  # jittered: retries of many messages do not come back together


def test_outage_bound_follows_the_settings():
    env = {"EMAIL_RETRY_BACKOFF_MAX": "10", "EMAIL_MAX_RETRIES": "10"}
    assert outage_bound(Settings.from_env(env)) == 1 + 2 + 4 + 5 * 7
    assert outage_bound(Settings(email_retry_backoff_max=2, email_max_retries=10)) == 10
    assert outage_bound(Settings(email_max_retries=0)) == 0
    with pytest.raises(Exception, match="EMAIL_MAX_RETRIES"):
        Settings.from_env({"EMAIL_MAX_RETRIES": "ten"})


class _Server:
    """What `body_for` asks of an smtplib connection: the extensions of the EHLO reply."""

    def __init__(self, *extensions: str) -> None:
        self.extensions = extensions

    def has_extn(self, name: str) -> bool:
        return name.lower() in self.extensions


def test_8bit_parts_are_declared_with_body_8bitmime_or_reencoded_for_a_server_without_it(settings):
    request = validate(
        to="a@example.com", subject="Grüße", text="Grüße aus Köln", html="<p>Grüße</p>", settings=settings
    )
    raw = to_bytes(build_message(request, "<id-8@mail.example.com>", settings))
    assert not raw.isascii() and b"Content-Transfer-Encoding: 8bit" in raw  # short lines stay 8-bit

    assert body_for(_Server("8bitmime"), raw) == (raw, ["BODY=8BITMIME"])
    seven, options = body_for(_Server(), raw)
    assert options == [] and seven.isascii() and b"8bit" not in seven
    original = message_from_bytes(raw, policy=policy.default)
    downgraded = message_from_bytes(seven, policy=policy.default)
    for name in ("Message-ID", "Subject", "To", "From", "Date"):
        assert downgraded[name] == original[name]
    for kind in ("plain", "html"):
        before = original.get_body((kind,)).get_content()
        after = downgraded.get_body((kind,)).get_content()
        assert after.replace("\r\n", "\n") == before.replace("\r\n", "\n")


def test_pure_ascii_messages_declare_nothing(settings):
    request = validate(to="a@example.com", subject="Hello", text="plain ASCII", settings=settings)
    raw = to_bytes(build_message(request, "<id-7@mail.example.com>", settings))
    assert raw.isascii()
    assert body_for(_Server("8bitmime"), raw) == (raw, [])
    assert body_for(_Server(), raw) == (raw, [])


@pytest.mark.timeout(20)
def test_scrubbing_a_long_run_of_letters_is_linear_not_quadratic():
    from proj.credentials import mask_url

    # 2 MB of letters took hours before the regex's repeats were bounded (and held the GIL).
    text = "x" * 2_000_000 + " redis://user:s3cret@host:6379/0"
    assert mask_url(text).endswith(" redis://user:**@host:6379/0")
    assert mask_url("amqp://:p@ss@host/") == "amqp://:**@host/"

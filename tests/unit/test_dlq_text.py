"""The text `proj dlq` prints: shortened errors, ISO times, ages."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proj.cli.dlq import ELLIPSIS, age_seconds, iso, shorten


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300), st.integers(min_value=10, max_value=120))
def test_shorten_fits_on_one_line_and_keeps_the_start(text: str, width: int) -> None:
    flat = " ".join(text.split())
    short = shorten(text, width)
    assert len(short) <= width and "\n" not in short
    if len(flat) <= width:
        assert short == flat
    else:
        assert short.endswith(ELLIPSIS) and flat.startswith(short[:-1])


def test_shorten_cuts_after_a_whole_word_else_within_one() -> None:
    assert shorten("ConnectionError: the server at mail.example.com closed the line", 40) == (
        "ConnectionError: the server at…"
    )
    assert shorten("x" * 50, 20) == "x" * 19 + ELLIPSIS  # no word boundary late enough: cut inside


def test_times_are_iso_8601_utc() -> None:
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(1_796_117_283.9) == "2026-12-01T09:28:03Z"  # seconds, not rounded up


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("2D", 172800)])
def test_ages(text: str, seconds: int) -> None:
    assert age_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1", "h", "1.5h", "-1h", "1w", "an hour"])
def test_what_is_not_an_age_is_refused_with_the_forms_that_are(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"use a number and s, m, h or d \(1h, 2d\)"):
        age_seconds(text)

"""The console's pieces that need no server: its charts, how it words ages and headers, where a
login may send the browser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from service.console import charts, views
from service.console.auth import Keys, local_target

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
END = START + timedelta(hours=1)


def test_a_bar_chart_draws_a_bar_per_non_empty_bucket_and_escapes_its_words() -> None:
    svg = charts.bar_chart(
        charts.Series("received", [0, 2.0, 0, 4.0], "bars"),
        title="<script>x</script>",
        unit="/min",
        start=START,
        end=END,
        summary='6 messages & "more"',
    )
    assert svg.count("<rect ") == 2
    assert "<script>" not in svg
    assert "&lt;script&gt;x&lt;/script&gt;" in svg
    assert "6 messages &amp; &#34;more&#34;" in svg
    assert ">4/min<" in svg  # the top label is the largest value
    assert "09:00" in svg
    assert "10:00 UTC" in svg


def test_a_line_chart_breaks_where_a_bucket_is_empty() -> None:
    svg = charts.line_chart(
        [charts.Series("max", [1.0, 2.0, None, 3.0, None, 1.0, 1.0], "line-max")],
        title="lag",
        unit=" s",
        start=START,
        end=END,
        summary="lag",
    )
    assert svg.count("<polyline ") == 2  # [1, 2] and [1, 1]
    assert svg.count("<circle ") == 1  # the lone 3
    empty = charts.line_chart(
        [charts.Series("max", [None] * 5, "line-max")],
        title="lag",
        unit=" s",
        start=START,
        end=END,
        summary="none",
    )
    assert "<polyline" not in empty
    assert "<circle" not in empty


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "-"),
        (1.25, "1.2 s"),
        (timedelta(seconds=75), "1 min 15 s"),
        (timedelta(hours=3, minutes=12, seconds=5), "3 h 12 min"),
        (timedelta(days=2, hours=1), "2 d 1 h"),
        (-4.0, "0.0 s"),
    ],
)
def test_ages_read_in_two_units_at_most(value: timedelta | float | None, shown: str) -> None:
    assert views.age(value) == shown


def test_headers_hide_secrets_and_cut_the_access_key() -> None:
    shown = dict(
        views.shown_headers(
            {"access-key": "AKID123456", "signature": "sig", "cookie": "c", "user-agent": "u"}
        )
    )
    assert shown == {"access-key": "AKID…", "user-agent": "u"}
    assert views.shown_headers(["not", "a", "dict"]) == []


@pytest.mark.parametrize(
    ("target", "goes_to"),
    [
        ("/console/orders?status=paid", "/console/orders?status=paid"),
        ("https://evil.example/console/", "/console/"),
        ("//evil.example/console/", "/console/"),
        ("/console/\\evil", "/console/"),
        ("/console//evil.example", "/console/"),
        ("/metrics", "/console/"),
        (None, "/console/"),
    ],
)
def test_a_login_sends_the_browser_only_within_the_console(
    target: str | None, goes_to: str
) -> None:
    assert local_target(target) == goes_to


def test_sessions_are_bound_to_the_admin_token() -> None:
    keys = Keys("a-token-of-enough-length-1")
    other = Keys("a-token-of-enough-length-2")
    _, cookie = keys.new_session()

    request = SimpleNamespace(cookies={"pandasync_console": cookie})
    assert keys.session_of(request) is not None  # type: ignore[arg-type]
    assert other.session_of(request) is None  # type: ignore[arg-type]
    assert keys.token_matches("a-token-of-enough-length-1")
    assert not keys.token_matches("a-token-of-enough-length-")

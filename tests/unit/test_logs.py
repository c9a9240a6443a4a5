"""Log lines: structured, with the fields a caller gave, never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from service.logs import configure_logging


@pytest.fixture
def last_line() -> Iterator[Callable[[], dict[str, Any]]]:
    """JSON logging as configured for production, written to a buffer; reads the last line."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("INFO", "json")
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield lambda: dict(json.loads(buffer.getvalue().strip().splitlines()[-1]))
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_standard_library_extra_fields_are_rendered_and_redacted(
    last_line: Callable[[], dict[str, Any]],
) -> None:
    logging.getLogger("workers.scheduler").info(
        "sweep finished", extra={"examined": 120, "drift": 1, "access_secret": "s3cr3t"}
    )
    line = last_line()
    assert (line["event"], line["examined"], line["drift"]) == ("sweep finished", 120, 1)
    assert line["access_secret"] == "[redacted]"


def test_structlog_fields_are_redacted(last_line: Callable[[], dict[str, Any]]) -> None:
    structlog.get_logger("pandasync.test").warning("call failed", token="abc", order_id="o1")
    line = last_line()
    assert (line["event"], line["order_id"], line["token"]) == ("call failed", "o1", "[redacted]")

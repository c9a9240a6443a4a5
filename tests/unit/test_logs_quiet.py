"""Libraries that talk at INFO about their own plumbing are kept at WARNING."""

from __future__ import annotations

import logging

import pytest

from service.logs import configure_logging


@pytest.mark.parametrize("name", ["pika", "pika.adapters.blocking_connection", "httpx"])
def test_chatty_libraries_are_quiet_below_warning(name: str) -> None:
    configure_logging("INFO", "json")
    logger = logging.getLogger(name)
    assert not logger.isEnabledFor(logging.INFO)
    assert logger.isEnabledFor(logging.WARNING)

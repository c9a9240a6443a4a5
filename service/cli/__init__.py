"""The ``pandasync`` command (README.md, Commands).

Each command reads Settings once; an invalid setting stops it with a message naming the setting
(exit 2). When ``PANDASYNC_DATABASE_URL`` is unset the commands that need a database start the
embedded Postgres under ``PANDASYNC_DATA_DIR`` and export its URL to their child processes.
"""

from __future__ import annotations

# The commands register themselves on ``main`` when imported.
from service.cli import bulk, failures, operate, outbound, payments, roles, timeline  # noqa: F401
from service.cli.common import main

__all__ = ["main"]

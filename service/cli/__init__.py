"""The ``pandasync`` command (README.md, Commands).

Each command reads Settings once; an invalid setting stops it with a message naming the setting
(exit 2). When ``PANDASYNC_DATABASE_URL`` is unset the commands that need a database start the
embedded Postgres under ``PANDASYNC_DATA_DIR`` and export its URL to their child processes.
"""

from __future__ import annotations

# Each command's module is imported when the command is looked up (common.COMMAND_MODULES),
# so a command starts without importing every other command's dependencies.
from service.cli.common import main

__all__ = ["main"]

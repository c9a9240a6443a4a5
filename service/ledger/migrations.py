"""The schema's migrations (Alembic, ``migrations/``), for ``pandasync migrate``, the tests, the
benchmarks and ``service.checks``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Config:
    """The project's alembic.ini, pointed at ``url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    # Alembic's ini interpolation would choke on a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def run_migrations(url: str, revision: str = "head") -> None:
    """``alembic upgrade`` against ``url``."""
    command.upgrade(alembic_config(url), revision)

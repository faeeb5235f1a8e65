"""Alembic migrations of the catalog schema, applied by ``labelgen serve`` at start.

:func:`upgrade` runs every migration newer than the database's (``alembic_version``) in
one transaction per step, on SQLite and PostgreSQL alike; no ``alembic.ini`` is needed.
A new migration goes in ``versions/`` with ``down_revision`` set to the previous one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["HEAD", "upgrade", "current"]

HEAD = "0002"
"""The newest revision (tests check the tables it creates match :mod:`labelgen.service.db`)."""


def _config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Any, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision`` (default: the newest)."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def current(engine: Any) -> str | None:
    """The database's revision (None: not migrated yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()

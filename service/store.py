"""The label-set store: SQLite in the state dir (default), or PostgreSQL when a database URL is set.

Implementations live in :mod:`service.stores`; this module picks one from the settings.
"""

from __future__ import annotations

from service.settings import Settings
from service.stores.base import SetDelta, SetRows, Store
from service.stores.sqlite import DB_FILE, SqliteStore

LabelSetStore = SqliteStore  # the embedded default, under its historical name

__all__ = ["DB_FILE", "LabelSetStore", "SetDelta", "SetRows", "SqliteStore", "Store", "open_store"]


def open_store(settings: Settings, embed_dim: int, space: str) -> Store:
    """PostgreSQL when ``database_url`` is set (shared by a fleet), else SQLite in ``state_dir``; the
    store reads and writes the vectors of ``space`` (models.bundle.bundle_space of the served bundle)."""
    if settings.database_url is None:
        return SqliteStore(settings.state_dir, embed_dim, space)
    from service.stores.postgres import PostgresStore  # psycopg only when asked for

    return PostgresStore(
        settings.database_url.get_secret_value(),
        embed_dim,
        space,
        poll_interval_s=settings.poll_interval_s,
        retry_after_s=settings.retry_after_s,
    )

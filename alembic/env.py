"""Alembic environment for picloud.

Works two ways:
- programmatically (``picloud.migrations``): a SQLAlchemy ``Connection`` is passed in
  ``config.attributes["connection"]`` and used as is (the caller owns the transaction
  and holds the migration lock, ``picloud.migrations.migration_lock``);
- from the alembic CLI: the URL is ``-x url=...``, else ``sqlalchemy.url`` from the
  config, else ``PICLOUD_DATABASE_URL``; the run holds the migration lock itself.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from manager_core.tables import metadata
from picloud.migrations import migration_lock

config = context.config
target_metadata = metadata

COMPARE_OPTIONS = {"compare_type": True, "compare_server_default": True}


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("PICLOUD_DATABASE_URL")
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set PICLOUD_DATABASE_URL")
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, **COMPARE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **COMPARE_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection, migration_lock(connection):
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

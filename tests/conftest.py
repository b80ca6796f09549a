"""Shared fixtures. The PostgreSQL ones live in ``tests/pg.py``:

- ``pg_server`` (session): the shared test server (``PgServer``); fails, never skips,
  when PostgreSQL is unavailable.
- ``db_url``: URL of a fresh database migrated to head (a template clone).
- ``empty_db_url``: URL of a fresh, empty database.
- ``pg_data_dir``: a scratch directory (outside pytest's tmp_path) for an
  ``EmbeddedPostgres`` cluster or a ``PICLOUD_DATA_DIR``.
- ``engine`` (async): an ``AsyncEngine`` on ``db_url``, disposed afterwards; the test
  must leave no pooled connection checked out.
"""

from __future__ import annotations

import pytest

from tests import pg
from tests.pg import db_url, empty_db_url, engine, pg_data_dir, pg_server

__all__ = ["anyio_backend", "db_url", "empty_db_url", "engine", "pg_data_dir", "pg_server"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    pg.configure(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    pg.configure_node(node)


def pytest_unconfigure(config: pytest.Config) -> None:
    pg.unconfigure(config)

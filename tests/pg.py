"""Real-PostgreSQL test support: one server and one migrated template per test run.

The pytest controller (the only process without ``config.workerinput``) starts the
server in ``pytest_configure`` — or uses ``PICLOUD_TEST_DATABASE_URL`` — migrates a
template database once, and hands ``PgServer.to_json()`` to every xdist worker
through ``workerinput``. Each test gets its own database cloned from the template
(``CREATE DATABASE … TEMPLATE``), dropped ``WITH (FORCE)`` afterwards.

If the server cannot be started, the error is recorded and every test that asks
for PostgreSQL fails with it: nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.db import make_engine
from picloud import migrations
from picloud.embedded_pg import TEST_SETTINGS, EmbeddedPostgres

ENV_URL = "PICLOUD_TEST_DATABASE_URL"
WORKERINPUT_KEY = "picloud_pg"
STASH_KEY = pytest.StashKey["PgServer"]()
CONTROLLER_KEY = pytest.StashKey["PgController"]()


def _normalise(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@attrs.frozen
class PgServer:
    """Where the test PostgreSQL is, or why it is not there."""

    admin_url: str | None
    template: str | None
    error: str | None = None
    #: ``STRATEGY FILE_COPY`` (PostgreSQL 15+) is much faster with ``wal_level=minimal``.
    file_copy: bool = False

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> PgServer:
        return cls(**json.loads(raw))

    def require(self) -> PgServer:
        if self.error is not None or self.admin_url is None:
            pytest.fail(f"test PostgreSQL is unavailable:\n{self.error}", pytrace=False)
        return self

    def url(self, database: str) -> str:
        """The URL of ``database`` on this server."""
        assert self.admin_url is not None
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def execute(self, sql: str) -> object:
        """Run one statement outside a transaction on the admin database; return its
        scalar result, if any."""
        assert self.admin_url is not None
        engine = create_engine(
            self.admin_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as conn:
                result = conn.execute(text(sql))
                return result.scalar() if result.returns_rows else None
        finally:
            engine.dispose()

    def create_database(self, *, template: str | None = None, prefix: str = "test") -> str:
        """Create a fresh database (a clone of ``template`` if given); return its name."""
        name = f"{prefix}_{uuid.uuid4().hex}"
        clause = f' TEMPLATE "{template}"' if template else ""
        if template and self.file_copy:
            clause += " STRATEGY FILE_COPY"
        self.execute(f'CREATE DATABASE "{name}"{clause}')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@attrs.define
class PgController:
    """Lives in the pytest controller process only: owns the server and template."""

    server: EmbeddedPostgres | None = None
    tmpdir: Path | None = None
    info: PgServer = PgServer(None, None, "not started")

    def start(self) -> PgServer:
        try:
            external = os.environ.get(ENV_URL)
            if external:
                admin_url = _normalise(external)
            else:
                self.tmpdir = Path(tempfile.mkdtemp(prefix="picloud-test-pg-"))
                self.server = EmbeddedPostgres(self.tmpdir / "data", settings=TEST_SETTINGS)
                self.server.start()
                admin_url = self.server.url("postgres")
            info = PgServer(admin_url, None)
            version = int(str(info.execute("SHOW server_version_num")))
            template = info.create_database(prefix="picloud_template")
            self.info = PgServer(admin_url, template, file_copy=version >= 150000)
            migrations.upgrade(info.url(template))
        except Exception:
            self.info = PgServer(None, None, traceback.format_exc())
        return self.info

    def stop(self) -> None:
        try:
            if self.server is None and self.info.template and self.info.admin_url:
                self.info.drop_database(self.info.template)
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None


# -- hooks, called from conftest.py -------------------------------------------------


def _uses_xdist(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and (
        getattr(config.option, "dist", "no") != "no"
    )


def _controller_info(config: pytest.Config) -> PgServer:
    """Start the server on first need (controller process only)."""
    info = config.stash.get(STASH_KEY, None)
    if info is None:
        info = config.stash[CONTROLLER_KEY].start()
        config.stash[STASH_KEY] = info
    return info


def configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        config.stash[STASH_KEY] = PgServer.from_json(workerinput[WORKERINPUT_KEY])
        return
    config.stash[CONTROLLER_KEY] = PgController()
    if _uses_xdist(config):
        # Workers get the server's address at start-up, so it must exist by then.
        _controller_info(config)
    # Without xdist the server starts lazily, when a test first asks for it.


def configure_node(node: object) -> None:
    info = _controller_info(node.config)  # type: ignore[attr-defined]
    node.workerinput[WORKERINPUT_KEY] = info.to_json()  # type: ignore[attr-defined]


def unconfigure(config: pytest.Config) -> None:
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is not None:
        controller.stop()


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """The shared test server; fails (never skips) the test when it is unavailable."""
    config = request.config
    info = config.stash[STASH_KEY] if hasattr(config, "workerinput") else _controller_info(config)
    return info.require()


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """A scratch directory for an ``EmbeddedPostgres`` cluster (or a data dir).

    Not under pytest's ``tmp_path``: as root the server runs as another user, who must
    traverse the parents, and pytest keeps resetting ``/tmp/pytest-of-root`` to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="picloud-pgdata-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def db_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh database migrated to head (a clone of the template)."""
    name = pg_server.create_database(template=pg_server.template)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def empty_db_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh, empty (unmigrated) database."""
    name = pg_server.create_database(prefix="empty")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An ``AsyncEngine`` on ``db_url``, configured as the node's (``make_engine``); the
    test must return every pooled connection."""
    engine = make_engine(db_url, pool_size=5, max_overflow=10)
    try:
        yield engine
        assert engine.pool.checkedout() == 0, "a pooled connection was left checked out"  # type: ignore[attr-defined]
    finally:
        await engine.dispose()

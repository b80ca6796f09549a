"""Run picloud's alembic migrations programmatically.

The migration scripts live in the repository root's ``alembic/`` directory (next to
``alembic.ini``); ``PICLOUD_ALEMBIC_DIR`` overrides where to find them.

One migrator at a time: every run holds PostgreSQL's session-level advisory lock
:data:`MIGRATION_LOCK_KEY` (in the migrated database) on its own connection, from
before its transaction begins until after it ends. Nodes that start, or are upgraded,
together take turns: the first migrates, the others find the schema at head and do
nothing. A run waits at most :data:`MIGRATION_LOCK_WAIT_SECONDS` for the lock, saying
once (a warning on the ``picloud.migrations`` logger) that it waits and for whom.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.exc import SQLAlchemyError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "MIGRATION_LOCK_WAIT_SECONDS",
    "MigrationLockTimeout",
    "alembic_config",
    "alembic_dir",
    "downgrade",
    "heads",
    "migration_lock",
    "upgrade",
]

ALEMBIC_DIR_ENV = "PICLOUD_ALEMBIC_DIR"

#: The advisory lock every migration run holds: the bytes of ``b"picloudm"`` as a
#: signed 64-bit integer (``0x7069636C6F75646D``). Advisory locks belong to one
#: database, so picloud databases sharing a server do not wait for each other. In
#: ``pg_locks`` it shows as ``locktype = 'advisory'``, ``classid = 1885954924``,
#: ``objid = 1869964397``, ``objsubid = 1``.
MIGRATION_LOCK_KEY = 0x7069636C6F75646D

#: How long a run waits for another process's migration before it gives up.
MIGRATION_LOCK_WAIT_SECONDS = 300.0

_POLL_FIRST_SECONDS = 0.05
_POLL_MAX_SECONDS = 0.5

log = logging.getLogger("picloud.migrations")


class MigrationLockTimeout(Exception):
    """Another process held the migration lock for longer than this run would wait."""


class AlembicDirNotFoundError(FileNotFoundError):
    """The alembic migrations directory could not be found; set PICLOUD_ALEMBIC_DIR."""


def alembic_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding ``env.py`` and ``versions/``."""
    env = os.environ if environ is None else environ
    override = env.get(ALEMBIC_DIR_ENV)
    if override:
        path = Path(override)
        if not (path / "env.py").is_file():
            raise AlembicDirNotFoundError(f"{ALEMBIC_DIR_ENV}={override} has no env.py")
        return path
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "alembic"
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise AlembicDirNotFoundError(AlembicDirNotFoundError.__doc__)


def alembic_config(environ: Mapping[str, str] | None = None) -> Config:
    """An alembic ``Config`` pointing at our scripts (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(alembic_dir(environ)))
    return config


def heads() -> tuple[str, ...]:
    """The head revision(s) of the migration scripts."""
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def _normalise(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _holder(connection: Connection) -> int | None:
    """The PostgreSQL backend pid holding the migration lock, if any."""
    pid = connection.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = CAST(:hi AS oid) AND objid = CAST(:lo AS oid) AND objsubid = 1"
        ),
        {"hi": MIGRATION_LOCK_KEY >> 32, "lo": MIGRATION_LOCK_KEY & 0xFFFFFFFF},
    ).scalar()
    return None if pid is None else int(pid)


def _held_by(pid: int | None) -> str:
    return "" if pid is None else f" (PostgreSQL backend pid {pid})"


def _try_lock(connection: Connection) -> bool:
    locked = connection.execute(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
    ).scalar()
    connection.commit()  # the session holds the lock; no transaction is left open
    return bool(locked)


@contextmanager
def migration_lock(
    connection: Connection, *, wait_seconds: float = MIGRATION_LOCK_WAIT_SECONDS
) -> Iterator[None]:
    """Hold the migration lock (:data:`MIGRATION_LOCK_KEY`) on ``connection`` for the
    block; ``connection`` must not be in a transaction, and is left in none.

    The lock is the session's, so it outlasts the block's transactions; it is released
    when the block ends, and in any case when the connection closes (a migrator that
    dies releases it with its connection). Another holder is waited for, polling, at
    most ``wait_seconds``; the wait is logged once. Raises
    :class:`MigrationLockTimeout` when the lock stays taken.
    """
    if connection.in_transaction():
        raise ValueError("migration_lock needs a connection that is in no transaction")
    deadline = time.monotonic() + wait_seconds
    delay = _POLL_FIRST_SECONDS
    waiting = False
    while not _try_lock(connection):
        if not waiting:
            waiting = True
            log.warning(
                "another process is migrating the database%s: waiting for it, at most %g s",
                _held_by(_holder(connection)),
                wait_seconds,
            )
            connection.commit()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            holder = _holder(connection)
            connection.commit()
            raise MigrationLockTimeout(
                f"another process has held the migration lock for {wait_seconds:g} s"
                f"{_held_by(holder)}: start again once it is done, or end that backend"
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX_SECONDS)
    try:
        yield
    finally:
        # Closing the connection releases the lock as well; this only does it sooner,
        # and must not replace what ends the block (a signal while it starts, say).
        with contextlib.suppress(Exception):
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()


def _fail(url: str, exc: Exception) -> NoReturn:
    """Raise ``StartupError`` ("cannot migrate the database at HOST:PORT: why", in one
    line, never the password): what ``picloud serve`` and ``picloud migrate`` print."""
    from sqlalchemy.engine import make_url

    from picloud.runtime import StartupError, _describe  # runtime imports this module

    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    why = reason[0].strip() if reason else type(exc).__name__
    password = make_url(url).password
    if password:
        why = why.replace(str(password), "***")
    raise StartupError(f"cannot migrate the database at {_describe(url)}: {why}") from None


def _run(url: str, action: str, revision: str, lock_wait_seconds: float) -> None:
    config = alembic_config()
    engine = create_engine(_normalise(url), poolclass=pool.NullPool)
    try:
        with (
            engine.connect() as connection,
            migration_lock(connection, wait_seconds=lock_wait_seconds),
            connection.begin(),
        ):
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    except (MigrationLockTimeout, SQLAlchemyError, CommandError) as exc:
        _fail(url, exc)
    finally:
        engine.dispose()


def upgrade(
    url: str, revision: str = "head", *, lock_wait_seconds: float = MIGRATION_LOCK_WAIT_SECONDS
) -> None:
    """Migrate the database at ``url`` up to ``revision`` (in one transaction, holding
    the migration lock; a database already there is left alone).

    Raises ``picloud.runtime.StartupError`` (one line: "cannot migrate the database at
    HOST:PORT: why") when the lock stays taken for ``lock_wait_seconds``, or the
    database or alembic refuses.
    """
    _run(url, "upgrade", revision, lock_wait_seconds)


def downgrade(
    url: str, revision: str, *, lock_wait_seconds: float = MIGRATION_LOCK_WAIT_SECONDS
) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops
    everything); as :func:`upgrade` does, under the migration lock."""
    _run(url, "downgrade", revision, lock_wait_seconds)

"""What ``picloud serve`` does around the ASGI app: the data directory's lock, signals
while it starts, database, migration, first admin.

Exceptions: ``StartupError`` (a start that cannot go on; its message is the one line
the command prints) and ``StartupInterrupted`` (SIGTERM or SIGINT before the server
runs; a ``BaseException``, as ``KeyboardInterrupt`` is).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from manager_core.db import make_engine
from manager_core.postgres.users import PostgresUserRepo, new_token
from picloud import migrations
from picloud.settings import Settings
from picloud.startup_signals import StartupSignals
from picloud_shared.errors import Conflict
from picloud_shared.principals import BOOTSTRAP_ADMIN_NAME

EMBEDDED_DATABASE = "picloud"
ADMIN_NAME = BOOTSTRAP_ADMIN_NAME
SERVE_LOCK = "serve.lock"
CONNECT_TIMEOUT_SECONDS = 10


class StartupError(Exception):
    """A start that cannot go on; the message says why, in one line."""


def prepare_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` if needed. Raises :class:`StartupError` when it cannot be."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StartupError(
            f"cannot use the data directory {data_dir}: it, or a directory above it, is a file"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"cannot use the data directory {data_dir}: {exc.strerror or exc}"
        ) from None
    if not data_dir.is_dir():  # a symlink to a file, say
        raise StartupError(f"cannot use the data directory {data_dir}: it is not a directory")


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``DATA_DIR/serve.lock`` (an exclusive ``flock``, which dies with the
    process) for the block: one ``picloud serve`` per data directory. Raises
    :class:`StartupError` naming the holder's pid when another process holds it."""
    prepare_data_dir(data_dir)
    path = data_dir / SERVE_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use the data directory {data_dir}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StartupError(f"cannot lock {path}: {exc.strerror}") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise StartupError(
                f"the data directory {data_dir} is in use by another picloud serve ({pid}); "
                "a second node on this machine connects with PICLOUD_DATABASE_URL "
                "(README, Several nodes)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _describe(url: str) -> str:
    """``HOST:PORT`` of a database URL (its socket directory for a UNIX socket);
    never its password."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    host = parsed.host or parsed.query.get("host") or "localhost"
    port = parsed.port or parsed.query.get("port") or 5432
    return f"{host if isinstance(host, str) else ','.join(host)}:{port}"


def check_reachable(url: str) -> None:
    """Connect to ``url`` once. Raises :class:`StartupError` ("cannot reach the
    database at HOST:PORT: why", the password never shown) when that fails."""
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(
        url, poolclass=pool.NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error is the reason
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        why = reason[0] if reason else type(exc).__name__
        password = engine.url.password
        if password:
            why = why.replace(str(password), "***")
        raise StartupError(f"cannot reach the database at {_describe(url)}: {why}") from None
    finally:
        engine.dispose()


@contextmanager
def database(
    settings: Settings,
    *,
    on_lost: Callable[[str], None] | None = None,
    signals: StartupSignals | None = None,
) -> Iterator[str]:
    """The database URL to serve from, migrated to head.

    With no ``PICLOUD_DATABASE_URL`` the embedded PostgreSQL in ``DATA_DIR/pg`` is
    started for the duration of the block (and reused across restarts). With
    ``on_lost``, a server this process started is watched: restarted when it dies,
    and ``on_lost(why)`` called from the watch's thread if it cannot be kept up
    (``picloud.pg_watch``). With ``signals``, a SIGTERM or SIGINT while PostgreSQL
    starts takes effect once it has started, and stops it.

    Raises :class:`StartupError` when the data directory cannot be used or the
    database cannot be reached.
    """
    if settings.database_url is not None:
        check_reachable(settings.database_url)
        migrations.upgrade(settings.database_url)
        yield settings.database_url
        return
    from picloud.cli import ensure_database
    from picloud.embedded_pg import EmbeddedPostgres, become_subreaper
    from picloud.pg_watch import PgWatch

    prepare_data_dir(settings.data_dir)
    if on_lost is not None:
        become_subreaper()  # a killed server must be reaped to be started again
    pg = EmbeddedPostgres(settings.embedded_pg_dir)
    try:
        with signals.held() if signals is not None else contextlib.nullcontext():
            pg.start()  # initdb and pg_ctl are never cut short
        ensure_database(pg.url("postgres"), EMBEDDED_DATABASE)
        url = pg.url(EMBEDDED_DATABASE)
        migrations.upgrade(url)
        watch = None
        if on_lost is not None and pg.owner:
            watch = PgWatch(pg, on_lost, max_restarts=settings.embedded_pg_restarts)
        if watch is not None:
            watch.start()
        try:
            yield url
        finally:
            if watch is not None:
                watch.stop()  # before the server is stopped on purpose
    finally:
        pg.stop()


async def _ensure_admin(url: str, token: str, *, replace: bool) -> str:
    """``created``, ``replaced`` (the admin's token is now ``token``), ``kept``, or
    ``absent`` (``replace`` asked, but there are instance admins and none is
    ``admin``: the token was not applied)."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        users = PostgresUserRepo(engine)
        try:
            if await users.ensure_instance_admin(ADMIN_NAME, token) is not None:
                return "created"
            if replace and await users.replace_admin_token(ADMIN_NAME, token):
                return "replaced"
        except Conflict:
            named = await users.get_by_name(ADMIN_NAME)
            if named is not None and not named.is_instance_admin:
                raise StartupError(
                    f"there is no instance admin, and the bootstrap admin's name {ADMIN_NAME!r}"
                    " is taken by a user who is not one: run `picloud admin delete-user"
                    f" {ADMIN_NAME}` (or `picloud admin create-user NAME --instance-admin`),"
                    " then start again"
                ) from None
            raise StartupError(
                "PICLOUD_ADMIN_TOKEN is another user's token: choose another one"
            ) from None
        if replace:
            named = await users.get_by_name(ADMIN_NAME)
            if named is None or not named.is_instance_admin:
                return "absent"
        return "kept"
    finally:
        await engine.dispose()


def bootstrap_admin(url: str, settings: Settings) -> None:
    """Create the instance admin on first start; print a generated token once.

    On later starts a ``PICLOUD_ADMIN_TOKEN`` that is not the admin's token any more
    replaces it (the old one stops working): that is how the admin token is rotated.
    A ``PICLOUD_ADMIN_TOKEN`` that cannot be applied (instance admins exist, none
    called ``admin``) is said so on stderr (the token itself never).

    Raises :class:`StartupError` when ``admin`` must be created but its name is
    taken by a user who is not an instance admin, or the token is another user's.
    """
    token = settings.admin_token or new_token()
    outcome = anyio.run(
        functools.partial(_ensure_admin, replace=bool(settings.admin_token)), url, token
    )
    if outcome == "replaced":
        print(
            f"picloud: the token of instance admin {ADMIN_NAME!r} is now PICLOUD_ADMIN_TOKEN;"
            " its previous token no longer works",
            file=sys.stderr,
        )
    if outcome == "absent":
        print(
            f"picloud: PICLOUD_ADMIN_TOKEN is not used: there is no instance admin"
            f" {ADMIN_NAME!r}, and {ADMIN_NAME!r} is created only when there is no instance"
            " admin at all (an instance admin can create users with the admin API)",
            file=sys.stderr,
        )
    if outcome != "created":
        return
    if settings.admin_token:
        print(
            f"picloud: created instance admin {ADMIN_NAME!r} with PICLOUD_ADMIN_TOKEN",
            file=sys.stderr,
        )
    else:
        print(
            f"picloud: created instance admin {ADMIN_NAME!r}; its token (shown once):\n{token}",
            file=sys.stderr,
            flush=True,
        )


async def _create_user(url: str, name: str, instance_admin: bool) -> str:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        _, token = await PostgresUserRepo(engine).create_user(name, instance_admin)
        return token
    finally:
        await engine.dispose()


def create_user(url: str, name: str, instance_admin: bool) -> str:
    return anyio.run(_create_user, url, name, instance_admin)

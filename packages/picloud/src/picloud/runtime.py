"""What ``picloud serve`` does around the ASGI app: database, migration, first admin."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from manager_core.db import make_engine
from manager_core.postgres.users import PostgresUserRepo, new_token
from picloud import migrations
from picloud.settings import Settings

EMBEDDED_DATABASE = "picloud"
ADMIN_NAME = "admin"


@contextmanager
def database(settings: Settings, *, on_lost: Callable[[str], None] | None = None) -> Iterator[str]:
    """The database URL to serve from, migrated to head.

    With no ``PICLOUD_DATABASE_URL`` the embedded PostgreSQL in ``DATA_DIR/pg`` is
    started for the duration of the block (and reused across restarts). With
    ``on_lost``, a server this process started is watched: restarted when it dies,
    and ``on_lost(why)`` called from the watch's thread if it cannot be kept up
    (``picloud.pg_watch``).
    """
    if settings.database_url is not None:
        migrations.upgrade(settings.database_url)
        yield settings.database_url
        return
    from picloud.cli import ensure_database
    from picloud.embedded_pg import EmbeddedPostgres, become_subreaper
    from picloud.pg_watch import PgWatch

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if on_lost is not None:
        become_subreaper()  # a killed server must be reaped to be started again
    with EmbeddedPostgres(settings.embedded_pg_dir) as pg:
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


async def _ensure_admin(url: str, token: str, *, replace: bool) -> str:
    """``created``, ``replaced`` (the admin's token is now ``token``) or ``kept``."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        users = PostgresUserRepo(engine)
        if await users.ensure_instance_admin(ADMIN_NAME, token) is not None:
            return "created"
        if replace and await users.replace_admin_token(ADMIN_NAME, token):
            return "replaced"
        return "kept"
    finally:
        await engine.dispose()


def bootstrap_admin(url: str, settings: Settings) -> None:
    """Create the instance admin on first start; print a generated token once.

    On later starts a ``PICLOUD_ADMIN_TOKEN`` that is not the admin's token any more
    replaces it (the old one stops working): that is how the admin token is rotated.
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

"""The ``picloud`` command line: ``serve``, ``migrate`` and ``admin`` (``create-user``,
``delete-user``, ``rotate-token``: for an operator at the database, e.g. one who lost
every instance admin's token).

Each subcommand is a ``_cmd_<name>(args, settings) -> int`` function registered on
its own subparser; ``main()`` reads the settings once and returns its exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from picloud.settings import Settings

__all__ = ["main"]

EMBEDDED_DATABASE = "picloud"
T = TypeVar("T")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picloud", description="Self-hosted serverless platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the picloud server")
    serve.add_argument("--host", help="listen address (PICLOUD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (PICLOUD_PORT, default 8080)")
    _add_data_dir(serve)
    serve.set_defaults(handler=_cmd_serve)

    migrate = commands.add_parser(
        "migrate",
        help="migrate PICLOUD_DATABASE_URL (or the embedded PostgreSQL) to the latest schema",
    )
    _add_data_dir(migrate)
    migrate.set_defaults(handler=_cmd_migrate)

    admin = commands.add_parser("admin", help="administration")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    create_user = admin_commands.add_parser("create-user", help="create a user and print its token")
    create_user.add_argument("name")
    create_user.add_argument(
        "--instance-admin", action="store_true", help="make the user an instance admin"
    )
    _add_data_dir(create_user)
    create_user.set_defaults(handler=_cmd_create_user)

    delete_user = admin_commands.add_parser(
        "delete-user",
        help="delete a user: their token stops working and their memberships are gone",
    )
    delete_user.add_argument("name")
    _add_data_dir(delete_user)
    delete_user.set_defaults(handler=_cmd_delete_user)

    rotate_token = admin_commands.add_parser(
        "rotate-token", help="give a user a new token and print it; the old one stops working"
    )
    rotate_token.add_argument("name")
    _add_data_dir(rotate_token)
    rotate_token.set_defaults(handler=_cmd_rotate_token)
    return parser


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (PICLOUD_DATA_DIR; embedded PostgreSQL in DIR/pg)",
    )


def _apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "data_dir")
        if getattr(args, name, None) is not None
    }
    return attrs.evolve(settings, **overrides)


def _server_class() -> type:
    import contextlib
    from collections.abc import Iterator

    import uvicorn

    class PicloudServer(uvicorn.Server):
        """uvicorn's server, minus re-raising SIGTERM/SIGINT after a graceful
        shutdown: picloud has drained, stopped its database, and exits 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return PicloudServer


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    import uvicorn

    from picloud.app import create_app
    from picloud.http_protocol import BoundedHttpToolsProtocol
    from picloud.runtime import bootstrap_admin, database
    from picloud.services import build_services

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server: Any = None
    lost: list[str] = []

    def on_lost(why: str) -> None:  # the embedded PostgreSQL could not be kept up
        lost.append(why)
        if server is not None:
            server.should_exit = True  # a graceful stop, as on SIGTERM

    with database(settings, on_lost=on_lost) as url:
        bootstrap_admin(url, settings)
        app = create_app(build_services(settings, url))
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http=BoundedHttpToolsProtocol,  # httptools, each request head bounded
            lifespan="on",
            log_level="info",
            access_log=False,
            server_header=False,  # a script's own Server header is the only one
            timeout_graceful_shutdown=30,
            limit_concurrency=settings.max_connections,
        )
        server = _server_class()(config)
        if not lost:
            server.run()
        if not server.started or lost:
            if lost:
                print(f"picloud serve: embedded PostgreSQL lost: {lost[0]}", file=sys.stderr)
            return 1
    print("picloud serve: stopped", file=sys.stderr)
    return 0


def _cmd_create_user(args: argparse.Namespace, settings: Settings) -> int:
    from picloud.runtime import create_user, database

    try:
        with database(settings) as url:
            token = create_user(url, args.name, args.instance_admin)
    except Exception as exc:  # PicloudError (name taken, bad name) or a database error
        print(f"picloud admin create-user: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _on_user(settings: Settings, name: str, action: Callable[[Any, Any], Awaitable[T]]) -> T:
    """``await action(users_repo, user)`` for the user called ``name``, on the database
    ``serve`` would use. Raises ``NotFound`` when there is no such user."""
    import anyio

    from manager_core.db import make_engine
    from manager_core.postgres.users import PostgresUserRepo
    from picloud.runtime import database
    from picloud_shared.errors import NotFound

    async def run(url: str) -> T:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            users = PostgresUserRepo(engine)
            user = await users.get_by_name(name)
            if user is None:
                raise NotFound(f"no user named {name!r}")
            return await action(users, user)
        finally:
            await engine.dispose()

    with database(settings) as url:
        return anyio.run(run, url)


def _cmd_delete_user(args: argparse.Namespace, settings: Settings) -> int:
    async def delete(users: Any, user: Any) -> None:
        await users.delete(user.id)

    try:
        _on_user(settings, args.name, delete)
    except Exception as exc:  # PicloudError (no such user, last admin, ...) or the database
        print(f"picloud admin delete-user: {exc}", file=sys.stderr)
        return 1
    print(f"picloud admin delete-user: deleted user {args.name!r}", file=sys.stderr)
    return 0


def _cmd_rotate_token(args: argparse.Namespace, settings: Settings) -> int:
    async def rotate(users: Any, user: Any) -> str:
        _, token = await users.rotate_token(user.id)
        return str(token)

    try:
        token = _on_user(settings, args.name, rotate)
    except Exception as exc:  # PicloudError (no such user) or a database error
        print(f"picloud admin rotate-token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from picloud import migrations

    if settings.database_url is not None:
        migrations.upgrade(settings.database_url)
        print("picloud migrate: database migrated to head", file=sys.stderr)
        return 0

    from picloud.embedded_pg import EmbeddedPostgres

    with EmbeddedPostgres(settings.embedded_pg_dir) as pg:
        ensure_database(pg.url("postgres"), EMBEDDED_DATABASE)
        migrations.upgrade(pg.url(EMBEDDED_DATABASE))
    print(
        f"picloud migrate: embedded database in {settings.embedded_pg_dir} migrated to head",
        file=sys.stderr,
    )
    return 0


def ensure_database(admin_url: str, name: str) -> None:
    """Create database ``name`` through ``admin_url`` unless it exists."""
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(admin_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
            if not exists:
                quoted = conn.dialect.identifier_preparer.quote(name)
                conn.execute(text(f"CREATE DATABASE {quoted}"))
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        settings = _apply_overrides(Settings.from_env(os.environ), args)
    except ValueError as exc:
        print(f"picloud: {exc}", file=sys.stderr)
        return 2
    return args.handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())

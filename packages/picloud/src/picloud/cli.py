"""The ``picloud`` command line: ``serve``, ``migrate`` and ``admin`` (``create-user``,
``delete-user``, ``rotate-token``: for an operator at the database, e.g. one who lost
every instance admin's token).

Each subcommand is a ``_cmd_<name>(args, settings) -> int`` function registered on
its own subparser; ``main()`` reads the settings once and returns its exit code.

Exit statuses: 0 done (``serve``: stopped by SIGTERM or SIGINT, also while it was
still starting); 1 the command failed, in one line on stderr (``serve``: it could not
start: data directory unusable or in use by another ``picloud serve``, database
unreachable, address not available, bootstrap admin's name taken; or its embedded
PostgreSQL was lost); 2 a bad command line or ``PICLOUD_*`` setting (``admin``: also a
data directory with no database in it, with no ``PICLOUD_DATABASE_URL``: ``admin``
never creates one, which no ``serve`` would use).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from picloud.settings import Settings
from picloud.startup_signals import StartupInterrupted, StartupSignals

__all__ = ["main"]

EMBEDDED_DATABASE = "picloud"
T = TypeVar("T")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picloud",
        description="Self-hosted serverless platform. Settings: the PICLOUD_* variables"
        " (README.md, Settings).",
    )
    parser.add_argument("--version", action="version", version=f"picloud {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the picloud server")
    serve.add_argument("--host", help="listen address (PICLOUD_HOST, default 127.0.0.1)")
    serve.add_argument(
        "--port", type=_port, help="listen port (PICLOUD_PORT, default 8080; 0 picks a free one)"
    )
    _add_data_dir(serve)
    serve.set_defaults(handler=_cmd_serve)

    migrate = commands.add_parser(
        "migrate",
        help="migrate PICLOUD_DATABASE_URL (or the embedded PostgreSQL) to the latest schema",
    )
    _add_data_dir(migrate)
    migrate.set_defaults(handler=_cmd_migrate)

    admin = commands.add_parser(
        "admin",
        help="administration, on the database of a picloud serve with the same --data-dir"
        " or PICLOUD_DATABASE_URL",
    )
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("picloud")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (PICLOUD_DATA_DIR; embedded PostgreSQL in DIR/pg)",
    )


def _port(value: str) -> int:
    """``--port``, checked as ``PICLOUD_PORT`` is."""
    try:
        number = int(value.strip())
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port (0-65535; 0 picks a free one), not {value!r}"
        )
    return number


def _apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "data_dir")
        if getattr(args, name, None) is not None
    }
    return attrs.evolve(settings, **overrides)


# On SIGTERM, requests get uvicorn's graceful window (GRACEFUL_SHUTDOWN_SECONDS) to
# finish; this long before it ends, the sync requests still waiting are answered 503
# "this node is stopping" (InboxRegistry.stop_waiting), not cut off by uvicorn.
GRACEFUL_SHUTDOWN_SECONDS = 30
STOP_ANSWER_MARGIN_SECONDS = 2


def _server_class(signals: Any, on_stopping: Callable[[], object]) -> type:
    import asyncio
    import logging
    from collections.abc import Iterator

    import uvicorn

    class PicloudServer(uvicorn.Server):
        """uvicorn's server, minus re-raising SIGTERM/SIGINT after a graceful
        shutdown: picloud has drained, stopped its database, and exits 0. A signal
        that came while uvicorn was not yet handling them stops it as soon."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                if signals.received is not None:
                    self.handle_exit(signals.received, None)
                try:
                    yield
                finally:
                    self._captured_signals.clear()

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            delay = max(0.0, self.config.timeout_graceful_shutdown - STOP_ANSWER_MARGIN_SECONDS)
            answer = asyncio.get_running_loop().call_later(delay, on_stopping)
            try:
                await super().shutdown(sockets=sockets)
            finally:
                answer.cancel()

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets:  # uvicorn says where only when it binds itself
                port = sockets[0].getsockname()[1]
                host = self.config.host
                shown = f"[{host}]" if ":" in host else host
                logging.getLogger("picloud").info("listening on http://%s:%d", shown, port)

    return PicloudServer


def uvicorn_config(app: Any, settings: Settings) -> Any:
    """How ``picloud serve`` runs ``app`` under uvicorn."""
    import uvicorn

    from picloud.access_log import AccessLog
    from picloud.http_protocol import BoundedHttpToolsProtocol

    return uvicorn.Config(
        AccessLog(app) if settings.access_log else app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=BoundedHttpToolsProtocol,  # httptools, each request head bounded
        lifespan="on",
        log_level="info",
        access_log=False,
        server_header=False,  # a script's own Server header is the only one
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # uvicorn refuses a request once its connections (the request's own one
        # included) reach the limit: one more lets exactly max_connections be served.
        limit_concurrency=settings.max_connections + 1,
    )


def listen(host: str, port: int) -> list[Any]:
    """Sockets bound to ``host``:``port`` (every address ``host`` names), not yet
    listening, as asyncio's ``create_server`` would bind them. Raises
    ``StartupError`` ("cannot listen on HOST:PORT: why")."""
    import socket

    from picloud.runtime import StartupError

    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        why = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {why}") from None
    return sockets


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    signals: StartupSignals = args.signals  # installed by main(), which also ends
    from picloud.runtime import StartupError  # a start that a signal interrupted

    if (warning := settings.unknown_warning()) is not None:
        print(warning, file=sys.stderr)
    try:
        with contextlib.ExitStack() as stack:
            return _serve(settings, signals, stack)
    except StartupError as exc:
        print(f"picloud serve: {exc}", file=sys.stderr)
        return 1


def _serve(settings: Settings, signals: Any, stack: contextlib.ExitStack) -> int:
    import logging

    from picloud.embedded_pg import EmbeddedPostgresError
    from picloud.runtime import StartupError, bootstrap_admin, data_dir_lock, database

    if settings.database_url is None:
        stack.enter_context(data_dir_lock(settings.data_dir))
    sockets = listen(settings.host, settings.port)
    for sock in sockets:
        stack.callback(sock.close)

    from picloud.app import create_app
    from picloud.services import build_services

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # While PostgreSQL is away the outbox pool tries to reconnect every second or so,
    # each failure a WARNING of its own; the node says it once (readyz, the refused
    # requests' line every 10 s, the dispatcher's claims).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    server: Any = None
    lost: list[str] = []

    def on_lost(why: str) -> None:  # the embedded PostgreSQL could not be kept up
        lost.append(why)
        if server is not None:
            server.should_exit = True  # a graceful stop, as on SIGTERM

    try:
        url = stack.enter_context(database(settings, on_lost=on_lost, signals=signals))
    except EmbeddedPostgresError as exc:
        raise StartupError(f"the embedded PostgreSQL did not start: {exc}") from None
    bootstrap_admin(url, settings)
    services = build_services(settings, url)
    app = create_app(services)
    server = _server_class(signals, services.inbox.stop_waiting)(uvicorn_config(app, settings))
    signals.raising = False  # uvicorn stops on a signal from now on (capture_signals)
    if not lost:
        try:
            server.run(sockets=sockets)
        except SystemExit:  # uvicorn's own exit when the app's startup failed
            server.started = False
    if not server.started or lost:
        if lost:
            print(f"picloud serve: embedded PostgreSQL lost: {lost[0]}", file=sys.stderr)
        else:
            print("picloud serve: the server did not start (see the log above)", file=sys.stderr)
        return 1
    stack.close()  # PostgreSQL stopped before we say so
    print("picloud serve: stopped", file=sys.stderr)
    return 0


def _cmd_create_user(args: argparse.Namespace, settings: Settings) -> int:
    from picloud.runtime import ADMIN_NAME, create_user, database

    if args.name == ADMIN_NAME and not args.instance_admin:
        print(
            f"picloud admin create-user: the name {ADMIN_NAME!r} is the bootstrap instance"
            f" admin's: create it with --instance-admin, or choose another name",
            file=sys.stderr,
        )
        return 1
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
    from picloud.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
    from picloud.runtime import StartupError, check_reachable, prepare_data_dir

    try:
        if settings.database_url is not None:
            check_reachable(settings.database_url)
            migrations.upgrade(settings.database_url)
            print("picloud migrate: database migrated to head", file=sys.stderr)
            return 0
        prepare_data_dir(settings.data_dir)
        with EmbeddedPostgres(settings.embedded_pg_dir) as pg:
            ensure_database(pg.url("postgres"), EMBEDDED_DATABASE)
            migrations.upgrade(pg.url(EMBEDDED_DATABASE))
    except StartupError as exc:
        print(f"picloud migrate: {exc}", file=sys.stderr)
        return 1
    except EmbeddedPostgresError as exc:
        print(f"picloud migrate: the embedded PostgreSQL did not start: {exc}", file=sys.stderr)
        return 1
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
    if args.handler is _cmd_serve:
        # From here on SIGTERM/SIGINT stop what a start started, and exit 0.
        args.signals = StartupSignals()
        args.signals.install()
        try:
            return _main(args)
        except StartupInterrupted:
            print("picloud serve: stopped before it served", file=sys.stderr)
            return 0
    return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        settings = _apply_overrides(Settings.from_env(os.environ), args)
    except ValueError as exc:
        print(f"picloud: {exc}", file=sys.stderr)
        return 2
    if args.command == "admin" and (missing := _no_database(settings)) is not None:
        print(f"picloud admin {args.admin_command}: {missing}", file=sys.stderr)
        return 2
    return args.handler(args, settings)


def _no_database(settings: Settings) -> str | None:
    """Why ``picloud admin`` has no database to act on, or ``None`` when it has one:
    with no ``PICLOUD_DATABASE_URL``, the data directory must hold the embedded
    cluster a ``serve`` (or ``migrate``) made there. Looks only; creates nothing."""
    from picloud.embedded_pg import EmbeddedPostgres

    if settings.database_url is not None:
        return None
    if EmbeddedPostgres(settings.embedded_pg_dir).initialised:
        return None
    data_dir = shlex.quote(str(settings.data_dir))
    return (
        f"no picloud database in {settings.data_dir} (start `picloud serve --data-dir"
        f" {data_dir}` once first, or pass the --data-dir or PICLOUD_DATABASE_URL your"
        " serve uses)"
    )


if __name__ == "__main__":
    sys.exit(main())

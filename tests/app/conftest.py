"""Fixtures of the end-to-end suites: one real ``picloud serve`` per test module."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.app.server import Server, serving
from tests.pg import PgServer


@pytest.fixture(scope="module")
def server(
    pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    """``picloud serve`` on a fresh copy of the template database, for the whole
    module (starting one costs a few seconds); 4 gate slots, the access log on."""
    name = pg_server.create_database(template=pg_server.template)
    log = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "picloud.log"
    try:
        env = {"PICLOUD_MAX_CONCURRENT_EXECUTIONS": "4", "PICLOUD_ACCESS_LOG": "on"}
        with serving(pg_server.url(name), log, env=env) as s:
            yield s
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def user(server: Server) -> Iterator[httpx.Client]:
    """An anonymous client of the module's server (a route's caller)."""
    with server.client() as c:
        yield c

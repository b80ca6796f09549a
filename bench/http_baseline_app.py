"""Baseline B for the HTTP benchmark: a bare starlette app on uvicorn.

    .venv/bin/python bench/http_baseline_app.py --database-url URL --port N [--pool-size 20]

``POST /insert`` does one ``INSERT … RETURNING`` through SQLAlchemy Core (async, the
same ``manager_core.db.make_engine`` picloud uses, same pool size and overflow) and
answers JSON. Served like ``picloud serve``: one uvicorn process, uvloop, httptools,
no access log. ``GET /readyz`` answers once the table exists.

Not part of picloud; started by ``bench/http_bench.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from manager_core.db import make_engine

metadata = sa.MetaData()
items = sa.Table(
    "baseline_items",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("payload", JSONB, nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)


def create_app(database_url: str, pool_size: int, max_overflow: int) -> Starlette:
    engine = make_engine(
        database_url, pool_size=pool_size, max_overflow=max_overflow, session_options=None
    )
    insert = items.insert().returning(items.c.id, items.c.created_at)

    async def do_insert(request: Request) -> Response:
        raw = await request.body()
        payload = json.loads(raw) if raw else None
        async with engine.begin() as conn:
            row = (await conn.execute(insert, {"payload": payload})).one()
        return JSONResponse({"id": row.id, "created_at": row.created_at.isoformat()})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"status": "ready"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        try:
            yield
        finally:
            await engine.dispose()

    return Starlette(
        routes=[
            Route("/insert", do_insert, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--max-overflow", type=int, default=20)
    args = parser.parse_args()
    app = create_app(args.database_url, args.pool_size, args.max_overflow)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

"""Benchmark ``PostgresTriggerRepo.list_matching_kv`` as one app's triggers grow.

Starts a throwaway embedded PostgreSQL in a temp dir, migrates it, and for 10,
1 000 and 10 000 KV triggers in ONE app (plus as many in a second app, as noise)
times ``list_matching_kv`` for a mix of keys. Trigger mix per 10 consecutive
triggers: 7 ``user:{i}:*``, 1 exact ``order:{i}``, 1 ``log/{i}/?``, 1 ``tmp:{i}*`` —
and every 100th trigger is a bare ``*`` (empty literal prefix: always a candidate);
every 3rd trigger has empty ops (any op), the rest ``set`` or ``delete``.

Run:  .venv/bin/python bench/trigger_match_bench.py [--iterations 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.db import make_engine
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud import migrations
from picloud.embedded_pg import TEST_SETTINGS, EmbeddedPostgres
from picloud_shared.triggers import KvOp, glob_literal_prefix

SIZES = (10, 1_000, 10_000)


def _glob(i: int) -> str:
    if i % 100 == 99:
        return "*"
    kind = i % 10
    if kind < 7:
        return f"user:{i}:*"
    if kind == 7:
        return f"order:{i}"
    if kind == 8:
        return f"log/{i}/?"
    return f"tmp:{i}*"


def _ops(i: int) -> list[str]:
    return [] if i % 3 == 0 else (["set"] if i % 3 == 1 else ["delete"])


async def _populate(engine: AsyncEngine, n: int) -> uuid.UUID:
    """An app with ``n`` KV triggers (bulk-inserted as the repo would write them)."""
    async with engine.begin() as conn:
        app = (
            await conn.execute(
                sa.insert(t.apps)
                .values(name=f"bench-{n}-{uuid.uuid4().hex[:6]}")
                .returning(t.apps.c.id)
            )
        ).scalar_one()
        script = (
            await conn.execute(
                sa.insert(t.scripts)
                .values(app_id=app, name="s", source="def handle(e, c): pass")
                .returning(t.scripts.c.id)
            )
        ).scalar_one()
        ids = [uuid.uuid4() for _ in range(n)]
        globs = [_glob(i) for i in range(n)]
        await conn.execute(
            sa.insert(t.triggers),
            [
                {
                    "id": ids[i],
                    "app_id": app,
                    "kind": "kv",
                    "script_id": script,
                    "match_prefix": glob_literal_prefix(globs[i]),
                }
                for i in range(n)
            ],
        )
        await conn.execute(
            sa.insert(t.kv_trigger_details),
            [{"trigger_id": ids[i], "key_glob": globs[i], "ops": _ops(i)} for i in range(n)],
        )
        await conn.execute(sa.text("ANALYZE triggers; ANALYZE kv_trigger_details"))
    return app


async def _time(
    engine: AsyncEngine, repo: PostgresTriggerRepo, app: uuid.UUID, n: int, iterations: int
) -> dict:
    """Time calls inside one open transaction (the emitter's path), next to a
    ``SELECT 1`` round trip on the same connection as the floor."""
    keys = [
        (f"user:{(n // 2) // 10 * 10}:profile", KvOp.SET),
        (f"order:{min(7, n - 1)}", KvOp.DELETE),
        ("unmatched:key:with:a:rather:long:name:" + "x" * 100, KvOp.SET),
        ("log/8/a", KvOp.SET),
    ]
    samples: list[float] = []
    floor: list[float] = []
    matched: dict[str, int] = {}
    async with engine.connect() as conn:
        for i in range(iterations):
            key, op = keys[i % len(keys)]
            start = time.perf_counter()
            found = await repo.list_matching_kv(app, key, op, conn=conn)  # type: ignore[arg-type]
            samples.append((time.perf_counter() - start) * 1000)
            matched[key[:16]] = len(found)
            start = time.perf_counter()
            await conn.execute(sa.text("SELECT 1"))
            floor.append((time.perf_counter() - start) * 1000)
        await conn.rollback()
    samples.sort()
    return {
        "n": n,
        "median_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "floor_ms": statistics.median(floor),
        "matched": matched,
    }


async def _main(url: str, iterations: int) -> list[dict]:
    engine = make_engine(url, pool_size=2)
    try:
        repo = PostgresTriggerRepo(engine)
        results = []
        for n in SIZES:
            await _populate(engine, n)  # noise: another app of the same size
            app = await _populate(engine, n)
            for _ in range(20):  # warm-up: pool, plan cache
                await repo.list_matching_kv(app, "user:0:x", KvOp.SET)  # type: ignore[arg-type]
            results.append(await _time(engine, repo, app, n, iterations))
        return results
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="picloud-bench-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "data", settings=TEST_SETTINGS)
        server.start()
        try:
            url = server.url("postgres")
            migrations.upgrade(url)
            results = anyio.run(_main, url, args.iterations)
        finally:
            server.stop()
    print(f"list_matching_kv, {args.iterations} calls per size (4 keys round-robin)")
    print("| triggers in app | median ms | p99 ms | SELECT 1 median ms | matches per key |")
    print("|---:|---:|---:|---:|---|")
    for r in results:
        matched = ", ".join(f"`{k}`: {v}" for k, v in r["matched"].items())
        print(
            f"| {r['n']:,} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['floor_ms']:.3f} | {matched} |"
        )


if __name__ == "__main__":
    main()

"""Benchmark the ``Dispatcher`` against PgQueuer on one embedded PostgreSQL (issue 5).

Starts a throwaway embedded PostgreSQL under /tmp with durable settings (fsync,
synchronous_commit and full_page_writes on — the server defaults), one database
migrated for picloud and one with PgQueuer's schema, and measures:

1. Drain throughput. picloud: N outbox rows of a KV trigger whose script is a
   no-op (``def handle(event, ctx): pass``), run through the real dispatcher, the
   real sandboxed ``ProcessExecutor`` and the group-commit completer; timed from
   ``Dispatcher.run`` start until the completer has committed all N executions
   ``succeeded`` (checked in the database afterwards). PgQueuer (``asyncpg`` driver
   by default; ``--pgq-driver psycopg`` for the other): N jobs of a no-op async
   entrypoint, timed from ``QueueManager.run`` start until its N-th completion is
   committed (``Queries.log_jobs`` returned for it). Same batch size, runs
   interleaved, medians reported.
2. Commits per delivered event: ``pg_stat_database.xact_commit`` of the run's
   database before and after (stats read from the ``postgres`` database, after
   the server flushed them), divided by N.
3. Commit-to-script-start latency at low load: one KV write at a time through
   ``PostgresKvRepo.set`` (same engine and ``OutboxSignal`` as the dispatcher, so
   the in-process wake-up applies); the script returns ``time.time()``; latency =
   that minus the wall clock right after ``set()`` returned. Then the same with a
   repo whose signal the dispatcher does not wait on (pure poll fallback).

The N outbox rows are the emitter's own: one ``PostgresKvRepo.set`` writes a row
(and its ``executions`` row) through the real fan-out, and that pair is copied
N-1 times in one statement (fresh execution ids, everything else identical).

``--null-executor`` replaces the worker round trip with an in-process no-op answer:
what remains is the dispatcher's own cost per row (the ceiling of this design on
this machine, whatever the executor).

Run (the ``bench`` dependency group holds pgqueuer; CI does not install it):

    uv run --all-packages --group bench python bench/dispatch_bench.py [--n 5000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from executor_core.executor import ProcessExecutor
from manager_core import tables as t
from manager_core.db import make_engine, make_pool
from manager_core.dispatcher import Dispatcher, DispatcherSettings
from manager_core.host_api import PostgresHostApi
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from manager_core.postgres.scripts import PostgresScriptRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from manager_core.postgres.users import PostgresUserRepo
from orchestrator_core.inbox import InboxRegistry
from picloud import migrations
from picloud.cli import ensure_database
from picloud.embedded_pg import EmbeddedPostgres
from picloud_shared.execution import ExecRequest, ExecResult, ScriptResponse
from picloud_shared.gate import ExecutionGate
from picloud_shared.ids import AppId
from picloud_shared.ports import HostApi
from picloud_shared.principals import Principal
from picloud_shared.triggers import CreateKvTrigger

# The server's defaults are durable (fsync, synchronous_commit, full_page_writes on);
# only capacity is raised. Both sides run on this one server.
PG_SETTINGS: dict[str, str] = {"max_connections": "200"}
SHOWN = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "commit_delay",
    "server_version",
)

NOOP = "def handle(event, ctx):\n    pass\n"
STAMP = "import time\ndef handle(event, ctx):\n    return {'t': time.time()}\n"
PICLOUD_DB = "picloud_bench"
PGQ_DB = "pgqueuer_bench"
# Backends flush their counters at exit (an idle backend may hold them up to 10 s):
# every connection of a run is closed before reading, then this long is waited.
STATS_SETTLE = 1.0


def libpq_dsn(sqlalchemy_url: str) -> str:
    return "postgresql://" + sqlalchemy_url.split("://", 1)[1]


# ---------------------------------------------------------------------- stats


class Stats:
    """Reads ``pg_stat_database`` from the ``postgres`` database (not counted in ours)."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)

    def settings(self) -> dict[str, str]:
        return {
            name: self._conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in SHOWN
        }

    async def commits(self, db: str) -> int:
        await anyio.sleep(STATS_SETTLE)
        self._conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self._conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (db,)
        ).fetchone()
        assert row is not None
        return int(row[0])

    def commit_floor_ms(self, samples: int = 100) -> float:
        """Median ms of a one-row INSERT + COMMIT (the WAL flush this disk costs)."""
        self._conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (x int)")
        times = []
        for i in range(samples):
            start = time.perf_counter()
            with self._conn.transaction():
                self._conn.execute("INSERT INTO bench_commit_floor VALUES (%s)", (i,))
            times.append((time.perf_counter() - start) * 1000)
        self._conn.execute("DROP TABLE bench_commit_floor")
        return statistics.median(times)

    def vacuum(self, dsn: str, tables: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {tables}")

    def close(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------------- picloud


class NullExecutor:
    """``--null-executor``: answers every request at once, in-process, as the no-op
    script would (one event-loop pass, no worker). What is left is the dispatcher's
    own cost per row: claim, routing, completion, bookkeeping."""

    async def execute(self, request: ExecRequest, host: HostApi) -> ExecResult:
        await anyio.lowlevel.checkpoint()
        return ExecResult.succeeded(request.execution_id, ScriptResponse.empty())


class TimedExecutor:
    """Wraps the executor to sum the time spent in ``execute`` (IPC + script)."""

    def __init__(self, inner: ProcessExecutor | NullExecutor) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    async def execute(self, request: Any, host: HostApi) -> Any:
        start = time.perf_counter()
        try:
            return await self.inner.execute(request, host)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def timed(fn: Callable[..., Awaitable[Any]], acc: dict[str, float], name: str) -> Callable:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def completion_event(d: Dispatcher, n: int, phases: dict[str, float]) -> anyio.Event:
    """Set once the dispatcher's group-commit completer has committed ``n`` rows (the
    no-op script writes nothing, so every success goes through it); times its flushes."""
    done = anyio.Event()
    flush = timed(d._completer._flush, phases, "complete_flush")

    async def counting_flush(batch: Any) -> None:
        await flush(batch)
        if d._completer.rows >= n:
            done.set()

    d._completer._flush = counting_flush  # type: ignore[method-assign]
    return done


class Picloud:
    def __init__(self, engine: AsyncEngine, executor: ProcessExecutor, args: argparse.Namespace):
        self.engine = engine
        self.args = args
        self.executor = TimedExecutor(NullExecutor() if args.null_executor else executor)
        self.signal = OutboxSignal()
        self.triggers = PostgresTriggerRepo(engine)
        self.emitter = OutboxEventEmitter(self.triggers, self.signal)
        self.kv = PostgresKvRepo(engine, self.emitter)
        self.docs = PostgresDocumentRepo(engine, self.emitter)
        self.outbox = PostgresOutboxRepo(engine, self.signal)
        self.gate = ExecutionGate(args.gate)
        self.inbox = InboxRegistry()

    async def setup(self) -> None:
        owner, _ = await PostgresUserRepo(self.engine).create_user("bench-owner")
        self.owner = owner.id
        self.app_id: AppId = (await PostgresAppRepo(self.engine).create("bench", owner.id)).id
        scripts = PostgresScriptRepo(self.engine)
        noop = (await scripts.create(self.app_id, "noop", NOOP)).id
        stamp = (await scripts.create(self.app_id, "stamp", STAMP)).id
        for glob, script in (("bench:*", noop), ("lat:*", stamp)):
            create = CreateKvTrigger(self.app_id, script, self.owner, glob)
            await self.triggers.create_kv_trigger(create)

    def host_factory(
        self, conn: AsyncConnection, app_id: AppId, principal: Principal, depth: int
    ) -> HostApi:
        return PostgresHostApi(conn, app_id, principal, depth, self.kv, self.docs)

    def dispatcher(self, poll_interval: float = 0.1) -> Dispatcher:
        return Dispatcher(
            engine=self.engine,
            executor=self.executor,  # type: ignore[arg-type]
            gate=self.gate,
            inbox=self.inbox,
            host_factory=self.host_factory,
            executions=PostgresExecutionRepo(self.engine),
            dead_letters=PostgresDeadLetterRepo(self.engine, self.outbox, self.emitter),
            outbox=self.outbox,
            signal=self.signal,
            settings=DispatcherSettings(
                node_id="bench",
                poll_interval=poll_interval,
                batch_size=self.args.batch_size,
                claim_linger=self.args.claim_linger,
                completion_linger=self.args.completion_linger,
            ),
        )

    async def fill(self, n: int) -> None:
        """One real KV write (emitter fan-out), then its rows copied n-1 times."""
        entry = await self.kv.set(self.app_id, "bench:template", {"v": 1})
        assert entry is not None
        ex_cols = [c.name for c in t.executions.columns if c.name != "id"]
        ob_cols = [c.name for c in t.outbox.columns if c.name not in ("id", "execution_id")]
        sql = f"""
            WITH tmpl AS (
                SELECT e.id AS eid FROM executions e JOIN outbox o ON o.execution_id = e.id
                WHERE e.app_id = :app AND e.status = 'queued'
                ORDER BY o.id LIMIT 1
            ), ex AS (
                INSERT INTO executions (id, {", ".join(ex_cols)})
                SELECT gen_random_uuid(), {", ".join("e." + c for c in ex_cols)}
                FROM executions e, tmpl, generate_series(1, :copies)
                WHERE e.id = tmpl.eid
                RETURNING id
            )
            INSERT INTO outbox (execution_id, {", ".join(ob_cols)})
            SELECT ex.id, {", ".join("o." + c for c in ob_cols)}
            FROM ex, tmpl, outbox o WHERE o.execution_id = tmpl.eid
        """
        async with self.engine.begin() as conn:
            await conn.execute(sa.text(sql), {"app": self.app_id, "copies": n - 1})
        async with self.engine.connect() as conn:
            due = (await conn.execute(sa.text("SELECT count(*) FROM outbox"))).scalar_one()
        assert due == n, (due, n)

    @asynccontextmanager
    async def outbox_pool(self) -> AsyncIterator[None]:
        """As the binary wires it: the outbox's hot statements on a psycopg pool (a new
        one per run, closed after it, so its backends' commit counters are flushed)."""
        pool = make_pool(self.engine.url.render_as_string(hide_password=False), max_size=8)
        await pool.open(wait=True)
        self.outbox = PostgresOutboxRepo(self.engine, self.signal, pool=pool)
        try:
            yield
        finally:
            await pool.close()

    async def drain(self, n: int) -> dict[str, Any]:
        d = self.dispatcher()
        phases: dict[str, float] = {}
        d._claim = timed(d._claim, phases, "claim")  # type: ignore[method-assign]
        done = completion_event(d, n, phases)
        self.executor.seconds, self.executor.calls = 0.0, 0
        gc_time = [0.0, 0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_time[1] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[1]

        gc.callbacks.append(on_gc)
        cpu0, times0 = time.process_time(), os.times()
        async with anyio.create_task_group() as tg:
            start = time.perf_counter()
            await tg.start(d.run)
            await done.wait()
            elapsed = time.perf_counter() - start
            d.stop()
        cpu, times1 = time.process_time() - cpu0, os.times()
        gc.callbacks.remove(on_gc)
        m = d.metrics
        return {
            "seconds": elapsed,
            "per_s": n / elapsed,
            "claim_batches": m.claim_batches,
            "rows_per_claim": m.claimed / max(1, m.claim_batches),
            "complete_batches": d._completer.batches,
            "rows_per_complete": d._completer.rows / max(1, d._completer.batches),
            "claim_ms_per_batch": 1000 * phases.get("claim", 0) / max(1, m.claim_batches),
            "flush_ms_per_batch": 1000
            * phases.get("complete_flush", 0)
            / max(1, d._completer.batches),
            "execute_us_per_run": 1e6 * self.executor.seconds / max(1, self.executor.calls),
            "execution_us_avg": 1e6 * sum(m.duration_seconds.values()) / n,
            "bench_process_cpu_us_per_event": 1e6 * cpu / n,
            "of_which_system_us_per_event": 1e6 * (times1.system - times0.system) / n,
            "gc_us_per_event": 1e6 * gc_time[0] / n,
            "conflict_reruns": m.conflict_reruns,
            "outcomes": {"/".join(k): v for k, v in m.executions.items()},
        }

    async def warm_pool(self) -> None:
        """Open the pool's connections before the clock starts (PgQueuer's connection is
        open before its clock starts too). Checked in with a rollback: no commit."""
        conns = [await self.engine.connect() for _ in range(20)]
        for c in conns:
            await c.exec_driver_sql("SELECT 1")
        for c in conns:
            await c.close()

    async def verify_and_clear(self, n: int) -> None:
        async with self.engine.begin() as conn:
            left = (await conn.execute(sa.text("SELECT count(*) FROM outbox"))).scalar_one()
            ok = (
                await conn.execute(
                    sa.text("SELECT count(*) FROM executions WHERE status = 'succeeded'")
                )
            ).scalar_one()
            assert left == 0, left
            assert ok == n, (ok, n)
            await conn.execute(sa.text("DELETE FROM executions"))


async def picloud_latency(pc: Picloud, samples: int, *, notified: bool, pace: float) -> list[float]:
    """ms from the commit of a KV write to the script's ``time.time()``."""
    d = pc.dispatcher()
    done = completion_event(d, samples + 10, {})
    # A repo whose emitter notifies a signal the dispatcher does not wait on.
    kv = (
        pc.kv
        if notified
        else PostgresKvRepo(pc.engine, OutboxEventEmitter(pc.triggers, OutboxSignal()))
    )
    commits: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        for i in range(samples + 10):
            key = f"lat:{i}"
            await kv.set(pc.app_id, key, i)
            commits[key] = time.time()
            await anyio.sleep(pace)
        await done.wait()
        d.stop()
    async with pc.engine.begin() as conn:
        rows = (
            await conn.execute(
                sa.select(t.executions.c.result, t.outbox.c.id.is_(None))
                .select_from(t.executions.outerjoin(t.outbox))
                .where(t.executions.c.status == "succeeded")
            )
        ).all()
        await conn.execute(sa.text("DELETE FROM executions"))
    started: list[float] = []
    for result, _ in rows:
        found = _find_t(result)
        if found is not None:
            started.append(found)
    # Pair by key: the event's key is not in the result, so pair by order of commit.
    stamps = sorted(started)
    order = sorted(commits.values())
    lat = [(s - c) * 1000 for s, c in zip(stamps, order, strict=True)]
    return lat[10:]  # first 10: warm-up


def _find_t(value: Any) -> float | None:
    if isinstance(value, dict):
        if "t" in value and isinstance(value["t"], float):
            return value["t"]
        for v in value.values():
            found = _find_t(v)
            if found is not None:
                return found
    if isinstance(value, str):
        try:
            return _find_t(json.loads(value))
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------- pgqueuer


@asynccontextmanager
async def pgq_queries(dsn: str, driver: str) -> AsyncIterator[Any]:
    """PgQueuer's ``Queries`` on one connection of its own driver."""
    from pgqueuer.queries import Queries

    if driver == "asyncpg":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver

        conn = await asyncpg.connect(dsn)
        try:
            yield Queries(AsyncpgDriver(conn))
        finally:
            await conn.close()
    else:
        from pgqueuer.db import PsycopgDriver

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as pconn:
            yield Queries(PsycopgDriver(pconn))


async def pgq_count(q: Any) -> int:
    rows = await q.driver.fetch("SELECT count(*) AS n FROM pgqueuer")
    return int(rows[0]["n"])


async def pgq_fill(dsn: str, n: int, driver: str) -> None:
    async with pgq_queries(dsn, driver) as q:
        await q.enqueue(["noop"] * n, [None] * n, [0] * n)
        left = await pgq_count(q)
        assert left == n, (left, n)


async def pgq_drain(dsn: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Timed until the N-th completion is committed (``Queries.log_jobs`` returned for
    it: the job row deleted, its log row written) — the same end point as picloud's."""
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager

    async with pgq_queries(dsn, args.pgq_driver) as queries:
        qm = QueueManager(queries)
        seen = 0
        logged = 0
        flushes = 0
        last = done = 0.0
        log_jobs = queries.log_jobs

        async def counting_log_jobs(items: Any) -> None:
            nonlocal logged, done, flushes
            await log_jobs(items)
            flushes += 1
            logged += len(items)
            if logged >= n and not done:
                done = time.perf_counter()
                qm.shutdown.set()

        queries.log_jobs = counting_log_jobs  # type: ignore[method-assign]

        @qm.entrypoint("noop", concurrency_limit=args.pgq_concurrency_limit)
        async def noop(job: Job) -> None:
            nonlocal seen, last
            seen += 1
            if seen == n:
                last = time.perf_counter()

        cpu0 = time.process_time()
        start = time.perf_counter()
        await qm.run(
            batch_size=args.batch_size,
            max_concurrent_tasks=args.pgq_max_concurrent_tasks or None,
            dequeue_timeout=timedelta(seconds=1),
        )
        cpu = time.process_time() - cpu0
        left = await pgq_count(queries)
    assert seen == n, (seen, n)
    assert logged == n, (logged, n)
    assert left == 0, left
    elapsed = done - start
    return {
        "seconds": elapsed,
        "per_s": n / elapsed,
        "last_handler_s": last - start,
        "complete_flushes": flushes,
        "rows_per_complete": logged / max(1, flushes),
        "bench_process_cpu_us_per_event": 1e6 * cpu / n,
    }


async def pgq_install(dsn: str, driver: str) -> None:
    async with pgq_queries(dsn, driver) as q:
        await q.install()


# ---------------------------------------------------------------------- main


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def run(pg: EmbeddedPostgres, args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats(libpq_dsn(pg.url("postgres")))
    out: dict[str, Any] = {"settings": stats.settings(), "picloud": [], "pgqueuer": []}
    out["commit_floor_ms"] = stats.commit_floor_ms()
    print("one-row commit, median ms:", round(out["commit_floor_ms"], 3), flush=True)
    pgq_dsn = libpq_dsn(pg.url(PGQ_DB))
    pc_dsn = libpq_dsn(pg.url(PICLOUD_DB))
    await pgq_install(pgq_dsn, args.pgq_driver)
    engine = make_engine(pg.url(PICLOUD_DB), pool_size=20)
    try:
        async with ProcessExecutor(args.workers, spare_workers=1) as executor:
            pc = Picloud(engine, executor, args)
            await pc.setup()
            # Warm-up both sides (worker spawns, plan caches).
            await pc.fill(200)
            async with pc.outbox_pool():
                await pc.drain(200)
            await pc.verify_and_clear(200)
            await pgq_fill(pgq_dsn, 200, args.pgq_driver)
            await pgq_drain(pgq_dsn, 200, args)

            async def one_picloud() -> None:
                stats.vacuum(pc_dsn, "outbox, executions")
                await pc.fill(args.n)
                await pc.engine.dispose()
                before = await stats.commits(PICLOUD_DB)
                await pc.warm_pool()
                async with pc.outbox_pool():
                    if args.profile:
                        import cProfile

                        prof = cProfile.Profile(time.process_time)  # CPU, not wall
                        prof.enable()
                    r = await pc.drain(args.n)
                    if args.profile:
                        prof.disable()
                        prof.dump_stats(args.profile)
                await pc.engine.dispose()
                after = await stats.commits(PICLOUD_DB)
                r["commits_per_event"] = (after - before) / args.n
                await pc.verify_and_clear(args.n)
                out["picloud"].append(r)
                print("picloud ", {k: _r(v) for k, v in r.items()}, flush=True)

            async def one_pgq() -> None:
                stats.vacuum(pgq_dsn, "pgqueuer, pgqueuer_log")
                await pgq_fill(pgq_dsn, args.n, args.pgq_driver)
                before = await stats.commits(PGQ_DB)
                r = await pgq_drain(pgq_dsn, args.n, args)
                after = await stats.commits(PGQ_DB)
                r["commits_per_event"] = (after - before) / args.n
                out["pgqueuer"].append(r)
                print("pgqueuer", {k: _r(v) for k, v in r.items()}, flush=True)

            for i in range(args.repeats):
                first, second = (one_picloud, one_pgq) if i % 2 == 0 else (one_pgq, one_picloud)
                await first()
                await second()

            if args.latency_samples:
                for notified in (True, False):
                    async with pc.outbox_pool():
                        lat = await picloud_latency(
                            pc, args.latency_samples, notified=notified, pace=args.pace
                        )
                    key = "latency_notified" if notified else "latency_poll"
                    out[key] = {p: pct(lat, p) for p in (50, 90, 99)} | {"n": len(lat)}
                    print(key, {k: _r(v) for k, v in out[key].items()}, flush=True)
    finally:
        await engine.dispose()
        stats.close()
    return out


def _r(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--claim-linger",
        type=float,
        default=attrs.fields(DispatcherSettings).claim_linger.default,
        help="DispatcherSettings.claim_linger (s)",
    )
    p.add_argument(
        "--completion-linger",
        type=float,
        default=attrs.fields(DispatcherSettings).completion_linger.default,
        help="DispatcherSettings.completion_linger (s)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gate", type=int, default=16, help="picloud execution gate size")
    p.add_argument("--workers", type=int, default=8, help="picloud executor worker processes")
    p.add_argument("--pgq-driver", choices=("asyncpg", "psycopg"), default="asyncpg")
    p.add_argument("--pgq-concurrency-limit", type=int, default=0, help="0: unlimited")
    p.add_argument("--pgq-max-concurrent-tasks", type=int, default=0, help="0: unlimited")
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--pace", type=float, default=0.02, help="s between latency samples")
    p.add_argument(
        "--null-executor",
        action="store_true",
        help="picloud runs no worker: an in-process no-op answers (the dispatcher's own cost)",
    )
    p.add_argument("--profile", type=Path, help="cProfile the picloud drains into this file")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="picloud-dispatch-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    pg = EmbeddedPostgres(root / "pg", settings=PG_SETTINGS)
    try:
        pg.start()
        ensure_database(pg.url("postgres"), PICLOUD_DB)
        ensure_database(pg.url("postgres"), PGQ_DB)
        migrations.upgrade(pg.url(PICLOUD_DB))
        out = anyio.run(run, pg, args)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    out["args"] = vars(args) | {"json": str(args.json) if args.json else None}
    out["machine"] = (
        f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    pc, pq = out["picloud"], out["pgqueuer"]
    med_pc = statistics.median(r["per_s"] for r in pc)
    med_pq = statistics.median(r["per_s"] for r in pq)
    out["summary"] = {
        "commit_floor_ms": out["commit_floor_ms"],
        "picloud_events_per_s_median": med_pc,
        "pgqueuer_events_per_s_median": med_pq,
        "ratio_picloud_over_pgqueuer": med_pc / med_pq,
        "picloud_commits_per_event_median": statistics.median(r["commits_per_event"] for r in pc),
        "pgqueuer_commits_per_event_median": statistics.median(r["commits_per_event"] for r in pq),
    }
    print(json.dumps({"settings": out["settings"], "summary": out["summary"]}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Alembic migrations: one head, up/down/up round trip, schema equal to tables.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from manager_core.tables import metadata
from picloud import migrations
from tests.pg import PgServer

HEAD = "0007"


@pytest.fixture
def second_empty_db_url(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.create_database(prefix="empty")
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


def _query(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    rows = _query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {str(name) for (name,) in rows} - {"alembic_version"}


def _catalog(url: str) -> dict[str, set[tuple[object, ...]]]:
    """Everything alembic's comparison does not cover: CHECKs, index SQL, identity."""
    return {
        "constraints": set(
            _query(
                url,
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
                "AND conrelid::regclass::text <> 'alembic_version'",
            )
        ),
        "indexes": set(
            _query(
                url,
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' AND tablename <> 'alembic_version'",
            )
        ),
        "columns": set(
            _query(
                url,
                "SELECT table_name, column_name, data_type, udt_name, is_nullable, "
                "column_default, is_identity, identity_generation "
                "FROM information_schema.columns WHERE table_schema = 'public' "
                "AND table_name <> 'alembic_version'",
            )
        ),
    }


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, metadata)


def test_exactly_one_head() -> None:
    """The migration history is linear: exactly one head."""
    assert migrations.heads() == (HEAD,)


@pytest.mark.anyio
async def test_upgrade_from_empty_matches_tables_py(empty_db_url: str) -> None:
    """Migrating an empty database to head yields exactly the schema of tables.py."""
    migrations.upgrade(empty_db_url)
    engine = create_async_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
    finally:
        await engine.dispose()
    assert diff == []
    assert _query(empty_db_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]


def test_migrated_catalog_equals_create_all(empty_db_url: str, second_empty_db_url: str) -> None:
    """CHECK constraints, index definitions, defaults and identity match create_all's."""
    migrations.upgrade(empty_db_url)
    engine = create_engine(second_empty_db_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
    finally:
        engine.dispose()
    migrated, declared = _catalog(empty_db_url), _catalog(second_empty_db_url)
    for part in ("constraints", "indexes", "columns"):
        assert migrated[part] - declared[part] == set(), part
        assert declared[part] - migrated[part] == set(), part


def test_downgrade_to_base_then_upgrade_again(empty_db_url: str) -> None:
    """Downgrading to base leaves no tables; upgrading again restores every table."""
    migrations.upgrade(empty_db_url)
    assert _tables(empty_db_url) == set(metadata.tables)
    migrations.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()
    migrations.upgrade(empty_db_url)
    assert _tables(empty_db_url) == set(metadata.tables)


def test_route_from_0001_reads_sync_after_0002(empty_db_url: str) -> None:
    """0002 is non-breaking: a route that existed before reads dispatch_mode 'sync'."""
    migrations.upgrade(empty_db_url, "0001")
    _query(
        empty_db_url,
        """
        WITH app AS (INSERT INTO apps (name) VALUES ('shop') RETURNING id),
             script AS (
                 INSERT INTO scripts (app_id, name, source)
                 SELECT id, 'hello', 'def handle(e, c): pass' FROM app RETURNING id, app_id
             )
        INSERT INTO routes (app_id, method, path, script_id)
        SELECT app_id, 'GET', '/hello', id FROM script
        """,
    )
    migrations.upgrade(empty_db_url, HEAD)
    assert _query(empty_db_url, "SELECT dispatch_mode FROM routes") == [("sync",)]
    migrations.downgrade(empty_db_url, "0001")
    assert _query(empty_db_url, "SELECT method, path FROM routes") == [("GET", "/hello")]


def test_alembic_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """PICLOUD_ALEMBIC_DIR must point at a directory with env.py."""
    real = migrations.alembic_dir()
    assert (real / "versions").is_dir()
    assert migrations.alembic_dir({"PICLOUD_ALEMBIC_DIR": str(real)}) == real
    with pytest.raises(FileNotFoundError, match="PICLOUD_ALEMBIC_DIR"):
        migrations.alembic_dir({"PICLOUD_ALEMBIC_DIR": str(tmp_path)})


def test_a_status_change_is_a_hot_update_after_0003(empty_db_url: str) -> None:
    """No index of executions holds its status, so moving an execution through its
    statuses adds no index entries (a heap-only update)."""
    migrations.upgrade(empty_db_url, HEAD)
    rows = _query(
        empty_db_url,
        """
        WITH app AS (INSERT INTO apps (name) VALUES ('shop') RETURNING id),
             e AS (INSERT INTO executions (id, app_id, source_kind)
                   SELECT gen_random_uuid(), id, 'http' FROM app RETURNING id)
        SELECT id FROM e
        """,
    )
    (execution_id,) = rows[0]
    engine = create_engine(empty_db_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE executions SET status = 'succeeded', attempts = 1,"
                    " finished_at = now() WHERE id = :id"
                ),
                {"id": execution_id},
            )
            counts = conn.execute(
                text(
                    "SELECT pg_stat_get_xact_tuples_updated('executions'::regclass),"
                    " pg_stat_get_xact_tuples_hot_updated('executions'::regclass)"
                )
            ).one()
    finally:
        engine.dispose()
    assert tuple(counts) == (1, 1)


def test_0006_counts_the_data_stored_before_it(empty_db_url: str) -> None:
    """0006 fills app_storage with what every app already stores (and 0 for an app
    storing nothing)."""
    migrations.upgrade(empty_db_url, "0005")
    _query(
        empty_db_url,
        """
        WITH a AS (INSERT INTO apps (name) VALUES ('full') RETURNING id),
             b AS (INSERT INTO apps (name) VALUES ('empty') RETURNING id),
             kv AS (INSERT INTO kv_entries (app_id, key, value)
                    SELECT id, k, v FROM a,
                    (VALUES ('k', '{"a": [1, 2]}'::jsonb), ('ключ', '"значение"'::jsonb)) AS x(k, v)
                    RETURNING 1)
        INSERT INTO documents (app_id, collection, id, data)
        SELECT id, 'c', 'd1', '{"x": "y"}'::jsonb FROM a
        """,
    )
    migrations.upgrade(empty_db_url, HEAD)
    rows = dict(
        _query(
            empty_db_url,
            "SELECT apps.name, app_storage.bytes FROM apps JOIN app_storage ON app_id = apps.id",
        )
    )
    # 'k' {"a": [1, 2]} = 1 + 13; 'ключ' "значение" = 8 + 18; 'c' 'd1' {"x": "y"} = 3 + 10
    assert rows == {"full": 14 + 26 + 13, "empty": 0}

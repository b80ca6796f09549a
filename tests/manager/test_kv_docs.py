"""PostgresKvRepo and PostgresDocumentRepo on real PostgreSQL: round trips, versions,
limits at their edges, pagination and cross-app isolation."""

from __future__ import annotations

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from picloud_shared import wire
from picloud_shared.errors import (
    Conflict,
    InvalidInput,
    InvalidName,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
)
from picloud_shared.limits import MAX_DOCUMENT_BYTES, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES
from tests.manager import factories

pytestmark = pytest.mark.anyio


def _string_of_serialized_size(size: int) -> str:
    """A JSON string value whose serialized form is exactly ``size`` bytes."""
    return "x" * (size - 2)


# -- KV -------------------------------------------------------------------------------


async def test_kv_set_get_round_trip(engine: AsyncEngine) -> None:
    """A stored value reads back equal, with version 1."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    value = {"a": [1, 2.5, None, True], "b": {"c": "ü"}}
    written = await kv.set(app, "k", value)
    entry = await kv.get(app, "k")
    assert entry is not None
    assert (entry.value, entry.version) == (value, 1)
    assert written.to_wire() == {"key": "k", "value": value, "version": 1}


async def test_kv_get_missing_is_none(engine: AsyncEngine) -> None:
    """A key never written reads as None."""
    app = await factories.app(engine)
    assert await PostgresKvRepo(engine).get(app, "nope") is None


async def test_kv_version_bumps_on_every_write(engine: AsyncEngine) -> None:
    """Each set bumps the version, even when the value is unchanged."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    versions = [(await kv.set(app, "k", 1)).version for _ in range(3)]
    assert versions == [1, 2, 3]


async def test_kv_delete_reports_existence(engine: AsyncEngine) -> None:
    """delete is True once for an existing key, then False."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    await kv.set(app, "k", "v")
    assert await kv.delete(app, "k") is True
    assert await kv.delete(app, "k") is False
    assert await kv.get(app, "k") is None


async def test_kv_key_of_512_bytes_is_accepted(engine: AsyncEngine) -> None:
    """A key of exactly 512 UTF-8 bytes (multi-byte characters) is stored."""
    app = await factories.app(engine)
    key = "é" * (MAX_KV_KEY_BYTES // 2)
    assert len(key.encode()) == MAX_KV_KEY_BYTES
    await PostgresKvRepo(engine).set(app, key, 1)
    assert await PostgresKvRepo(engine).get(app, key) is not None


@pytest.mark.parametrize("key", ["x" * 513, "é" * 256 + "x"])
async def test_kv_key_past_512_bytes_is_rejected(engine: AsyncEngine, key: str) -> None:
    """Keys of more than 512 UTF-8 bytes raise LimitExceeded."""
    app = await factories.app(engine)
    with pytest.raises(LimitExceeded):
        await PostgresKvRepo(engine).set(app, key, 1)


async def test_empty_keys_ids_and_limits_out_of_range_are_invalid_input(
    engine: AsyncEngine,
) -> None:
    """The same codes as a script's ctx gets: an empty key or document id, and a list
    limit outside 1-1001 (a page of 1000 and its look-ahead row), are invalid_input; a
    document id past 128 characters is limit_exceeded."""
    app = await factories.app(engine)
    kv, docs = PostgresKvRepo(engine), PostgresDocumentRepo(engine)
    with pytest.raises(InvalidInput):
        await kv.set(app, "", 1)
    with pytest.raises(InvalidInput):
        await docs.insert(app, "c", {}, "")
    with pytest.raises(LimitExceeded):
        await docs.insert(app, "c", {}, "i" * 129)
    for limit in (0, 1002):
        with pytest.raises(InvalidInput):
            await kv.list(app, limit=limit)


async def test_kv_value_exactly_at_limit_is_accepted(engine: AsyncEngine) -> None:
    """A value whose serialized JSON is exactly 256 KiB is stored."""
    app = await factories.app(engine)
    value = _string_of_serialized_size(MAX_KV_VALUE_BYTES)
    assert len(wire.dumps(value).encode()) == MAX_KV_VALUE_BYTES
    entry = await PostgresKvRepo(engine).set(app, "big", value)
    assert entry.value == value


async def test_kv_value_over_limit_is_payload_too_large(engine: AsyncEngine) -> None:
    """One byte over 256 KiB serialized raises PayloadTooLarge and stores nothing."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    with pytest.raises(PayloadTooLarge):
        await kv.set(app, "big", _string_of_serialized_size(MAX_KV_VALUE_BYTES + 1))
    assert await kv.get(app, "big") is None


def _exponent_value(stored_size: int) -> list[object]:
    """A list of ``1e300`` (6 bytes as JSON text, 301 as PostgreSQL keeps it) padded
    with one string to ``stored_size`` bytes as kept."""
    count = (stored_size - 8) // 302  # "[" + count * ("1000…0" + ",") + '"…"]'
    pad = stored_size - 1 - 302 * count - 3
    return [1e300] * count + ["x" * pad]


async def test_kv_value_size_counts_numbers_as_postgres_keeps_them(engine: AsyncEngine) -> None:
    """``1e300`` is 6 bytes of JSON text but 301 digits in jsonb: the 256 KiB limit
    counts the digits, so a value kept at exactly the limit is stored (and reads back
    that size) and one a byte larger is refused, storing nothing."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    at_limit = _exponent_value(MAX_KV_VALUE_BYTES)
    assert len(wire.dumps(at_limit)) < MAX_KV_VALUE_BYTES // 40  # far under, as text
    entry = await kv.set(app, "amp", at_limit)
    assert len(wire.dumps(entry.value).encode()) == MAX_KV_VALUE_BYTES  # as it came back
    with pytest.raises(PayloadTooLarge, match="1e300 takes 301 bytes"):
        await kv.set(app, "amp2", _exponent_value(MAX_KV_VALUE_BYTES + 1))
    assert await kv.get(app, "amp2") is None


async def test_document_size_counts_numbers_as_postgres_keeps_them(engine: AsyncEngine) -> None:
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    overhead = len('{"v":}')
    at_limit = {"v": _exponent_value(MAX_DOCUMENT_BYTES - overhead)}
    doc = await docs.insert(app, "c", at_limit, "d")
    assert len(wire.dumps(doc.data).encode()) == MAX_DOCUMENT_BYTES
    with pytest.raises(PayloadTooLarge):
        await docs.insert(app, "c", {"v": _exponent_value(MAX_DOCUMENT_BYTES - overhead + 1)})


@pytest.mark.parametrize("value", [float("nan"), {1, 2}, "nul\x00char"])
async def test_kv_value_that_is_not_storable_json_is_invalid(
    engine: AsyncEngine, value: object
) -> None:
    """NaN, non-JSON types and NUL characters raise InvalidInput."""
    app = await factories.app(engine)
    with pytest.raises(InvalidInput):
        await PostgresKvRepo(engine).set(app, "k", value)  # type: ignore[arg-type]


async def test_kv_list_by_prefix_escapes_like_wildcards(engine: AsyncEngine) -> None:
    """'%' and '_' in a prefix are literal characters, not LIKE wildcards."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    for key in ("a_1", "ab", "a%2", "a%", "b", "a\\x"):
        await kv.set(app, key, key)
    assert [e.key for e in await kv.list(app, "a_")] == ["a_1"]
    assert [e.key for e in await kv.list(app, "a%")] == ["a%", "a%2"]
    assert [e.key for e in await kv.list(app, "a\\")] == ["a\\x"]
    assert [e.key for e in await kv.list(app)] == sorted(["a_1", "ab", "a%2", "a%", "b", "a\\x"])


async def test_kv_list_paginates_by_key(engine: AsyncEngine) -> None:
    """Keyset pagination walks every key exactly once, in order."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    keys = [f"k{i:02d}" for i in range(7)]
    for key in reversed(keys):
        await kv.set(app, key, 0)
    seen: list[str] = []
    after = None
    while page := await kv.list(app, "k", limit=3, after=after):
        seen += [e.key for e in page]
        after = page[-1].key
    assert seen == keys


async def test_kv_is_isolated_between_apps(engine: AsyncEngine) -> None:
    """The same key in two apps holds two values; listing one app never shows the other."""
    a, b = await factories.app(engine), await factories.app(engine)
    kv = PostgresKvRepo(engine)
    await kv.set(a, "k", "a")
    await kv.set(b, "k", "b")
    assert (await kv.get(a, "k")).value == "a"  # type: ignore[union-attr]
    assert [e.value for e in await kv.list(b)] == ["b"]
    assert await kv.delete(a, "k") is True
    assert (await kv.get(b, "k")).value == "b"  # type: ignore[union-attr]


async def test_kv_concurrent_first_writes_both_land(engine: AsyncEngine) -> None:
    """Racing first writes of one key never fail: the versions end at the write count."""
    app = await factories.app(engine)
    kv = PostgresKvRepo(engine)
    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(kv.set, app, "race", i)
    entry = await kv.get(app, "race")
    assert entry is not None
    assert entry.version == 8


# -- documents ------------------------------------------------------------------------


async def test_docs_insert_generates_a_hex_id_and_reads_back(engine: AsyncEngine) -> None:
    """insert without id returns a uuid4 hex id; get returns the same data."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    doc = await docs.insert(app, "orders", {"n": 1, "tags": ["a"]})
    assert len(doc.id) == 32
    assert int(doc.id, 16) >= 0
    got = await docs.get(app, "orders", doc.id)
    assert got is not None
    assert (got.data, got.version) == ({"n": 1, "tags": ["a"]}, 1)


async def test_docs_insert_with_a_taken_id_conflicts(engine: AsyncEngine) -> None:
    """An explicit id that exists raises Conflict and leaves the first document."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    await docs.insert(app, "c", {"v": 1}, id="x")
    with pytest.raises(Conflict):
        await docs.insert(app, "c", {"v": 2}, id="x")
    assert (await docs.get(app, "c", "x")).data == {"v": 1}  # type: ignore[union-attr]


async def test_docs_update_replaces_data_and_bumps_version(engine: AsyncEngine) -> None:
    """update replaces the whole object and bumps the version."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    await docs.insert(app, "c", {"a": 1, "b": 2}, id="d")
    updated = await docs.update(app, "c", "d", {"a": 3})
    assert (updated.data, updated.version) == ({"a": 3}, 2)


async def test_docs_update_missing_is_not_found(engine: AsyncEngine) -> None:
    """Updating a document that does not exist raises NotFound."""
    app = await factories.app(engine)
    with pytest.raises(NotFound):
        await PostgresDocumentRepo(engine).update(app, "c", "nope", {})


async def test_docs_delete_reports_existence(engine: AsyncEngine) -> None:
    """delete is True once, then False."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    await docs.insert(app, "c", {}, id="d")
    assert await docs.delete(app, "c", "d") is True
    assert await docs.delete(app, "c", "d") is False


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
async def test_docs_must_be_objects(engine: AsyncEngine, data: object) -> None:
    """A document that is not a JSON object raises InvalidInput."""
    app = await factories.app(engine)
    with pytest.raises(InvalidInput):
        await PostgresDocumentRepo(engine).insert(app, "c", data)  # type: ignore[arg-type]


async def test_docs_size_limit_is_one_mib_serialized(engine: AsyncEngine) -> None:
    """Exactly 1 MiB serialized is stored; one byte more is PayloadTooLarge."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    overhead = len(wire.dumps({"s": ""}).encode())
    at_limit = {"s": "x" * (MAX_DOCUMENT_BYTES - overhead)}
    assert len(wire.dumps(at_limit).encode()) == MAX_DOCUMENT_BYTES
    await docs.insert(app, "c", at_limit, id="ok")
    with pytest.raises(PayloadTooLarge):
        await docs.insert(app, "c", {"s": "x" * (MAX_DOCUMENT_BYTES - overhead + 1)}, id="no")
    assert await docs.get(app, "c", "no") is None


@pytest.mark.parametrize("collection", ["", "has space", "x" * 64, "dot.ted"])
async def test_docs_bad_collection_names_are_rejected(engine: AsyncEngine, collection: str) -> None:
    """Collection names follow [A-Za-z0-9_-]{1,63}."""
    app = await factories.app(engine)
    with pytest.raises(InvalidName):
        await PostgresDocumentRepo(engine).insert(app, collection, {})


async def test_docs_query_is_equality_on_top_level_fields(engine: AsyncEngine) -> None:
    """where matches top-level equality; arrays and objects must be equal, not contained."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    await docs.insert(app, "c", {"k": 1, "tags": ["a", "b"]}, id="1")
    await docs.insert(app, "c", {"k": 1, "tags": ["a"]}, id="2")
    await docs.insert(app, "c", {"k": 2, "tags": ["a"]}, id="3")
    await docs.insert(app, "other", {"k": 1}, id="4")
    assert [d.id for d in await docs.query(app, "c", {"k": 1})] == ["1", "2"]
    assert [d.id for d in await docs.query(app, "c", {"tags": ["a"]})] == ["2", "3"]
    assert [d.id for d in await docs.query(app, "c", {"k": 1, "tags": ["a"]})] == ["2"]
    assert [d.id for d in await docs.query(app, "c", {"missing": None})] == []
    assert [d.id for d in await docs.query(app, "c")] == ["1", "2", "3"]


async def test_docs_list_paginates_by_id(engine: AsyncEngine) -> None:
    """Keyset pagination over a collection visits every document once, in id order."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    ids = [f"d{i}" for i in range(5)]
    for doc_id in reversed(ids):
        await docs.insert(app, "c", {}, id=doc_id)
    first = await docs.list(app, "c", limit=2)
    rest = await docs.list(app, "c", limit=10, after=first[-1].id)
    assert [d.id for d in [*first, *rest]] == ids


async def test_docs_are_isolated_between_apps(engine: AsyncEngine) -> None:
    """The same collection and id in two apps are two documents."""
    a, b = await factories.app(engine), await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    await docs.insert(a, "c", {"app": "a"}, id="d")
    await docs.insert(b, "c", {"app": "b"}, id="d")
    assert (await docs.get(a, "c", "d")).data == {"app": "a"}  # type: ignore[union-attr]
    assert await docs.delete(b, "c", "d") is True
    assert await docs.get(a, "c", "d") is not None
    assert [d.id for d in await docs.list(b, "c")] == []


async def test_writes_to_an_app_deleted_meanwhile_are_not_found(engine: AsyncEngine) -> None:
    """A KV or document write whose app is gone by the time its row is inserted (a
    delete racing the admin API) is NotFound (404), not a foreign-key error (500)."""
    app = await factories.app(engine)
    kv, docs = PostgresKvRepo(engine), PostgresDocumentRepo(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(t.apps).where(t.apps.c.id == app))
    with pytest.raises(NotFound, match="app not found"):
        await kv.set(app, "k", 1)
    with pytest.raises(NotFound, match="app not found"):
        await docs.insert(app, "c", {"a": 1})


async def test_a_where_is_bounded_by_a_documents_size(engine: AsyncEngine) -> None:
    """A ``where`` value no larger than a document can match one; past a document's
    size (1 MiB as JSON) the query is ``payload_too_large``, as the README's limits
    table says."""
    app = await factories.app(engine)
    docs = PostgresDocumentRepo(engine)
    overhead = len('{"a":""}')
    fits = "x" * (MAX_DOCUMENT_BYTES - overhead)
    await docs.insert(app, "c", {"a": fits}, "d")
    (found,) = await docs.query(app, "c", where={"a": fits})
    assert found.id == "d"
    with pytest.raises(PayloadTooLarge):
        await docs.query(app, "c", where={"a": fits + "x"})

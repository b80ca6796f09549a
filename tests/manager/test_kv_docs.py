"""PostgresKvRepo and PostgresDocumentRepo on real PostgreSQL: round trips, versions,
limits at their edges, pagination and cross-app isolation."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.postgres.kv import PostgresKvRepo
from picloud_shared import wire
from picloud_shared.errors import InvalidInput, LimitExceeded, PayloadTooLarge
from picloud_shared.limits import MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES
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


@pytest.mark.parametrize("key", ["x" * 513, "é" * 256 + "x", ""])
async def test_kv_key_outside_1_to_512_bytes_is_rejected(engine: AsyncEngine, key: str) -> None:
    """Keys of 0 or more than 512 UTF-8 bytes raise LimitExceeded."""
    app = await factories.app(engine)
    with pytest.raises(LimitExceeded):
        await PostgresKvRepo(engine).set(app, key, 1)


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

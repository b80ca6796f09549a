"""Unit tests: frames, the seccomp program, the host bridge, MemoryHostApi."""

from __future__ import annotations

import struct
import sys
import uuid

import pytest

from executor_core import frames, sandbox
from executor_core.host_bridge import HostBridge
from executor_core.memory_host import MemoryHostApi
from picloud_shared.errors import Forbidden
from picloud_shared.ids import AppId, UserId
from picloud_shared.limits import MAX_JSON_DEPTH, MAX_WHERE_FIELDS, MAX_WRITE_BYTES_PER_EXECUTION
from picloud_shared.principals import Capability, Principal

pytestmark = pytest.mark.anyio


def test_frame_round_trip() -> None:
    """A frame is a 4-byte big-endian length and compact UTF-8 JSON."""
    message = {"t": "log", "line": "héllo", "v": [1, 2.5, None, True]}
    data = frames.encode(message)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert frames.FrameReader().feed(data[:3]) == []
    reader = frames.FrameReader()
    assert reader.feed(data + data[:5]) == [message]
    assert reader.feed(data[5:]) == [message]


@pytest.mark.parametrize(
    "body", [b"[1]", b'{"a": NaN}', b'{"a": Infinity}', b"{} x", b"{", b"\xff", b"[" * 100_000]
)
def test_bad_frame_bodies_are_refused(body: bytes) -> None:
    """Non-objects, NaN, trailing data, bad UTF-8 and deep nesting are FrameErrors."""
    with pytest.raises(frames.FrameError):
        frames.decode(body)


def test_oversized_frame_header_is_refused() -> None:
    """A length over the cap fails before any body is buffered."""
    with pytest.raises(frames.FrameError):
        frames.FrameReader(max_frame=100).feed(struct.pack(">I", 101))


def test_an_integer_too_long_for_json_decodes_to_a_marker() -> None:
    """An int of more than MAX_INT_DIGITS digits is never converted (that is quadratic)
    nor a frame error: it becomes a LongInt, which is no JSON (and no int) to anyone
    who checks. Up to the limit, and floats of any length, decode as usual."""
    assert frames.MAX_INT_DIGITS == 4300
    at_limit = "9" * 4300
    body = f'{{"a":[{at_limit},-{at_limit},1{at_limit},-1{at_limit},{"1" * 5000}.5]}}'
    a = frames.decode(body.encode())["a"]
    assert a[:2] == [10**4300 - 1, -(10**4300) + 1]
    assert isinstance(a[2], frames.LongInt)
    assert isinstance(a[3], frames.LongInt)
    assert not isinstance(a[2], int)
    assert a[2].digits == a[3].digits == 4301
    assert isinstance(a[4], float)
    with pytest.raises(TypeError, match="4300"):
        frames.dumps({"v": a[2]})
    huge = frames.decode(b'{"a":' + b"7" * (frames.MAX_FRAME_BYTES - 10) + b"}")["a"]
    assert huge.digits == frames.MAX_FRAME_BYTES - 10


def test_encoding_refuses_an_integer_too_long_for_json_whatever_the_limit() -> None:
    """``dumps`` refuses an int of more than 4300 digits even where the process lets
    Python convert it (a script may call ``sys.set_int_max_str_digits(0)``); a string
    of digits is no integer."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(ValueError, match="4300 digits"):
            frames.dumps({"v": [1, -(10**4300)]})
        with pytest.raises(ValueError, match="4300 digits"):
            frames.encode({"v": 10**5000})
        assert frames.dumps([10**4300 - 1]) == f"[{'9' * 4300}]"
        assert frames.dumps({"s": "1" * 5000}) == f'{{"s":"{"1" * 5000}"}}'
    finally:
        sys.set_int_max_str_digits(before)


def test_encoding_refuses_non_json() -> None:
    """NaN and non-JSON types never reach the pipe."""
    with pytest.raises(ValueError, match="Out of range"):
        frames.encode({"v": float("nan")})
    with pytest.raises(TypeError):
        frames.encode({"v": {1, 2}})


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_checks_arch_first(machine: str) -> None:
    """The filter loads the arch, compares it, and ends in allow/EPERM/ENOSYS returns."""
    program = sandbox.seccomp_program(machine)
    assert program is not None
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    audit = sandbox.AUDIT_ARCH_X86_64 if machine == "x86_64" else sandbox.AUDIT_ARCH_AARCH64
    assert insns[0] == (0x20, 0, 0, 4)
    assert insns[1][0] == 0x15
    assert insns[1][3] == audit
    assert insns[-3:] == [
        (0x06, 0, 0, sandbox.SECCOMP_RET_ALLOW),
        (0x06, 0, 0, sandbox.SECCOMP_RET_ERRNO | sandbox.EPERM),
        (0x06, 0, 0, sandbox.SECCOMP_RET_ERRNO | sandbox.ENOSYS),
    ]
    assert len(insns) < 256


def test_seccomp_refused_on_unknown_arch() -> None:
    """No filter is built for an architecture whose syscall numbers we do not know."""
    assert sandbox.seccomp_program("riscv64") is None


async def test_bridge_validates_before_the_host() -> None:
    """Wrong arity, oversized keys and values never reach the host."""
    host = MemoryHostApi()
    bridge = HostBridge(host)
    assert (await bridge.serve(1, "kv_get", ["a", "b"]))["code"] == "invalid_input"
    assert (await bridge.serve(2, "kv_get", "a"))["code"] == "invalid_input"
    assert (await bridge.serve(3, "kv_set", ["k" * 513, 1]))["code"] == "limit_exceeded"
    assert (await bridge.serve(4, "kv_set", ["k", "x" * 300_000]))["code"] == "payload_too_large"
    assert (await bridge.serve(5, "docs_insert", ["c", [], None]))["code"] == "invalid_input"
    assert (await bridge.serve(6, "kv_list", ["", True, None]))["code"] == "invalid_input"
    assert host.calls == 0
    assert await bridge.serve(7, "kv_set", ["k", {"a": 1}]) == {"t": "ret", "id": 7, "v": None}
    assert host.kv == {"k": {"a": 1}}


@pytest.mark.parametrize(
    ("op", "args", "code", "says"),
    [
        # A worker always sends after, None or not.
        ("kv_list", ["", 10], "invalid_input", "kv_list takes 3 arguments"),
        ("kv_list", ["", 10, "k" * 513], "limit_exceeded", "after (a key) is at most 512"),
        ("kv_list", ["", 10, ""], "invalid_input", "after (a key) must not be empty"),
        ("kv_list", ["", 10, 1], "invalid_input", "after must be a key"),
        ("kv_list", ["", 10, "\ud800"], "invalid_input", "after (a key) holds half"),
        ("docs_query", ["c", None, 10], "invalid_input", "docs_query takes 4 arguments"),
        ("docs_query", ["c", None, 10, "d" * 129], "limit_exceeded", "after (a document id)"),
        ("docs_query", ["c", None, 10, ""], "invalid_input", "after (a document id) must"),
        ("docs_query", ["c", None, 10, {}], "invalid_input", "after must be a document id"),
    ],
)
async def test_bridge_checks_a_lists_after(
    op: str, args: list[object], code: str, says: str
) -> None:
    """``after`` is the last argument of kv_list and docs_query (arity is exact),
    checked as a key or a document id is before the host sees it."""
    host = MemoryHostApi()
    reply = await HostBridge(host).serve(1, op, args)
    assert (reply["t"], reply["code"]) == ("err", code)
    assert says in reply["msg"]
    assert host.calls == 0


async def test_bridge_passes_after_to_the_host() -> None:
    host = MemoryHostApi()
    host.kv.update({"a": 1, "b": 2, "c": 3})
    host.docs["c"] = {"x": {}, "y": {}}
    bridge = HostBridge(host)
    assert (await bridge.serve(1, "kv_list", ["", 10, "a"]))["v"] == [
        {"key": "b", "value": 2},
        {"key": "c", "value": 3},
    ]
    assert (await bridge.serve(2, "kv_list", ["", 1, None]))["v"] == [{"key": "a", "value": 1}]
    assert (await bridge.serve(3, "docs_query", ["c", None, 10, "x"]))["v"] == [
        {"id": "y", "data": {}}
    ]
    assert (await bridge.serve(4, "docs_query", ["c", {}, 10, "y"]))["v"] == []


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("kv_get", ["a\x00"]),
        ("kv_set", ["a\x00", 1]),
        ("kv_set", ["k", {"v": ["x\x00"]}]),
        ("kv_list", ["\x00", 10, None]),
        ("kv_list", ["", 10, "a\x00"]),
        ("docs_insert", ["c", {"a\x00": 1}, None]),
        ("docs_insert", ["c", {"a": 1}, "id\x00"]),
        ("docs_update", ["c", "d", {"a": "\x00"}]),
        ("docs_query", ["c", {"a": "\x00"}, 10, None]),
        ("docs_query", ["c", None, 10, "id\x00"]),
    ],
)
async def test_bridge_refuses_a_nul_no_store_can_hold(op: str, args: list[object]) -> None:
    """Keys, ids, values, documents and filters with a NUL never reach the host
    (PostgreSQL refuses them, and a refused statement aborts the transaction)."""
    host = MemoryHostApi()
    reply = await HostBridge(host).serve(1, op, args)
    assert reply["code"] == "invalid_input"
    assert "NUL" in reply["msg"]
    assert host.calls == 0


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_bridge_bounds_nesting_and_where_fields() -> None:
    """Values and documents nest at most MAX_JSON_DEPTH levels; a query's where has
    at most MAX_WHERE_FIELDS fields (each list- or object-valued field is a clause of
    its own): past either the call fails before the host sees it."""
    host = MemoryHostApi()
    bridge = HostBridge(host)
    ok = await bridge.serve(1, "kv_set", ["k", _nested(MAX_JSON_DEPTH)])
    assert ok["t"] == "ret"
    deep = await bridge.serve(2, "kv_set", ["k", _nested(MAX_JSON_DEPTH + 1)])
    assert deep["code"] == "invalid_input"
    assert "levels deep" in deep["msg"]
    doc = await bridge.serve(3, "docs_insert", ["c", {"a": _nested(MAX_JSON_DEPTH)}, None])
    assert doc["code"] == "invalid_input"
    where = {f"f{i}": [] for i in range(MAX_WHERE_FIELDS)}
    assert (await bridge.serve(4, "docs_query", ["c", where, 10, None]))["t"] == "ret"
    where["one-more"] = []
    assert (await bridge.serve(5, "docs_query", ["c", where, 10, None]))["code"] == "limit_exceeded"
    assert host.calls == 2


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("kv_set", ["k", "LONG"]),
        ("kv_set", ["k", {"a": ["LONG"]}]),
        ("kv_get", ["LONG"]),
        ("kv_list", ["", "LONG", None]),
        ("kv_list", ["", 10, "LONG"]),
        ("docs_insert", ["c", {"a": "LONG"}, None]),
        ("docs_insert", ["c", {}, "LONG"]),
        ("docs_update", ["c", "d", {"a": "LONG"}]),
        ("docs_query", ["c", {"a": "LONG"}, 10, None]),
        ("docs_query", ["c", None, 10, "LONG"]),
    ],
)
async def test_bridge_refuses_an_integer_too_long_for_json(op: str, args: list[object]) -> None:
    """However a worker got a huge int into its frame, the host refuses it as the
    caller's invalid input (the script's catchable error), not as a broken frame."""
    body = frames.dumps({"a": args}).replace('"LONG"', "1" * 5000).encode()
    decoded = frames.decode(body)["a"]
    host = MemoryHostApi()
    reply = await HostBridge(host).serve(1, op, decoded)
    assert reply["t"] == "err"
    assert reply["code"] == "invalid_input"
    assert "arguments" not in reply["msg"]  # refused for the integer, not the arity
    assert host.calls == 0


async def test_bridge_caps_calls_per_execution() -> None:
    """Past the cap every call is LimitExceeded."""
    bridge = HostBridge(MemoryHostApi(), max_calls=2)
    assert (await bridge.serve(1, "kv_get", ["a"]))["t"] == "ret"
    assert (await bridge.serve(2, "kv_get", ["a"]))["t"] == "ret"
    assert (await bridge.serve(3, "kv_get", ["a"]))["code"] == "limit_exceeded"


async def test_bridge_caps_the_bytes_an_execution_writes() -> None:
    """Values and documents written count their size as JSON, to the byte: the write
    that would pass MAX_WRITE_BYTES_PER_EXECUTION is LimitExceeded and reaches no
    host; reads, deletes and smaller writes after it still work."""
    assert MAX_WRITE_BYTES_PER_EXECUTION == 64 * 1024 * 1024
    bridge = HostBridge(host := MemoryHostApi(), max_write_bytes=100)
    assert (await bridge.serve(1, "kv_set", ["a", "x" * 38]))["t"] == "ret"  # 40 bytes
    doc = {"k": "y" * 44}  # 52 bytes as JSON: {"k":"yy…"}, no spaces
    assert len(frames.dumps(doc).encode()) == 52
    assert (await bridge.serve(2, "docs_insert", ["c", doc, "d1"]))["t"] == "ret"
    assert bridge.written == 92
    over = await bridge.serve(3, "docs_update", ["c", "d1", {"k": "z"}])  # 9 bytes: 101
    assert over["code"] == "limit_exceeded"
    assert "per execution" in over["msg"]
    assert (await host.docs_get("c", "d1")) == doc  # the refused update reached no host
    assert (await bridge.serve(4, "kv_set", ["b", 12345678]))["t"] == "ret"  # 8 bytes: 100
    assert bridge.written == 100
    assert (await bridge.serve(5, "kv_set", ["b", 0]))["code"] == "limit_exceeded"
    assert (await bridge.serve(6, "kv_get", ["a"]))["v"] == "x" * 38
    assert (await bridge.serve(7, "kv_delete", ["a"]))["v"] is True


async def test_a_write_the_host_refuses_does_not_count_towards_the_cap() -> None:
    """Only writes the host made count: one it refused (here Forbidden, as a full
    storage quota would) leaves the whole allowance."""
    app = AppId(uuid.uuid4())
    reader = Principal(UserId(uuid.uuid4()), app, frozenset({Capability.APP_READ_DATA}))
    bridge = HostBridge(MemoryHostApi(reader), max_write_bytes=100)
    for call_id in range(5):
        refused = await bridge.serve(call_id, "kv_set", ["a", "x" * 38])  # 40 bytes each
        assert refused["code"] == "forbidden"
    assert bridge.written == 0


async def test_memory_host_enforces_capabilities() -> None:
    """Without app_write_data a write is Forbidden; reads still work with app_read_data."""
    import uuid

    app = AppId(uuid.uuid4())
    reader = Principal(UserId(uuid.uuid4()), app, frozenset({Capability.APP_READ_DATA}))
    host = MemoryHostApi(reader)
    with pytest.raises(Forbidden):
        await host.kv_set("k", 1)
    with pytest.raises(Forbidden):
        await host.docs_insert("c", {})
    assert await host.kv_get("k") is None
    assert await host.docs_query("c") == []


async def test_memory_host_copies_values() -> None:
    """Values are copied in and out: a caller mutating them changes nothing stored."""
    host = MemoryHostApi()
    value = {"a": [1]}
    await host.kv_set("k", value)
    value["a"].append(2)
    got = await host.kv_get("k")
    assert got == {"a": [1]}
    got["a"].append(3)
    assert await host.kv_get("k") == {"a": [1]}

"""No request can produce a 500 by its shape alone: fuzz every admin endpoint."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.manager.api.endpoints import ENDPOINTS, Endpoint, seed_world
from tests.manager.api.helpers import Api, bearer
from tests.strategies import json_values

pytestmark = pytest.mark.anyio

_worlds: dict[str, dict[str, str]] = {}
PLACEHOLDERS = (
    "id",
    "user_id",
    "name",
    "route_id",
    "trigger_id",
    "key",
    "collection",
    "doc_id",
    "execution_id",
    "dl_id",
)
path_values = st.one_of(
    st.text(min_size=1, max_size=40),
    st.uuids().map(str),
    st.sampled_from(["0", "-1", "null", "%00", "..", "a" * 600, "ü", "{}", "true"]),
)
bodies = st.one_of(
    json_values,
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    st.builds(
        lambda b, body: {**b, **body},
        st.just({}),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "source",
                    "script",
                    "key_glob",
                    "collection_glob",
                    "ops",
                    "retry",
                    "method",
                    "path",
                    "dispatch_mode",
                    "capabilities",
                    "timeout_seconds",
                    "memory_limit_mb",
                    "source_kinds",
                    "instance_admin",
                ]
            ),
            json_values,
            max_size=5,
        ),
    ),
)


@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=bodies,
    overrides=st.dictionaries(st.sampled_from(PLACEHOLDERS), path_values, max_size=2),
    raw=st.none() | st.binary(max_size=64),
)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_no_shape_of_request_is_a_500(
    api: Api, endpoint: Endpoint, body: object, overrides: dict[str, str], raw: bytes | None
) -> None:
    """Any JSON body, any path value, any bytes: the answer is never 5xx."""
    world = _worlds.get(api.app_id)
    if world is None:  # seeded once per test database (Hypothesis reuses the fixture)
        world = _worlds[api.app_id] = await seed_world(api)
    values = {**world, **{k: urllib.parse.quote(v, safe="") for k, v in overrides.items()}}
    url = endpoint.url(values)
    content = raw if raw is not None else json.dumps(body).encode()
    resp = await api.client.request(
        endpoint.method,
        url,
        content=content,
        headers={**bearer(api.root), "content-type": "application/json"},
    )
    assert resp.status_code < 500, (endpoint, url, content[:200], resp.text)


# JSON texts Python's parser accepts (or chokes on) that JSON or jsonb refuse.
UNSTORABLE_BODIES = [
    b"NaN",
    b'{"name": Infinity}',
    b"1e400",
    b'{"name": "a\\u0000b", "source": "x", "script": "s", "value": "\\u0000"}',
    b'{"name": "\\ud800"}',
    b"[" * 100_000,
]


@pytest.mark.parametrize("raw", UNSTORABLE_BODIES, ids=lambda raw: raw[:24].decode())
async def test_bodies_postgres_cannot_store_are_422_at_every_endpoint_that_reads_one(
    api: Api, raw: bytes
) -> None:
    world = _worlds.get(api.app_id)
    if world is None:
        world = _worlds[api.app_id] = await seed_world(api)
    for endpoint in ENDPOINTS:
        if endpoint.body is None:
            continue
        resp = await api.client.request(
            endpoint.method,
            endpoint.url(world),
            content=raw,
            headers={**bearer(api.root), "content-type": "application/json"},
        )
        assert resp.status_code == 422, (endpoint, resp.text)
        assert resp.json()["error"]["code"] == "invalid_input"

"""End to end: which route a request reaches, and what its answer carries, through
the real ``picloud serve`` (uvicorn) on a real database: routes come in the
database's order, and the server adds its own headers and drops a HEAD's body."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.app.server import Server
from tests.app.test_contract_tour import Admin

# Answers which script ran (its name in ``x-script``) and the event's method.
WHO = (
    "def handle(event, ctx):\n"
    "    return ctx.response('NAME', headers={'x-script': 'NAME', 'x-method': event['method']})\n"
)


@pytest.fixture
def admin(server: Server) -> Iterator[Admin]:
    a = Admin(server)
    try:
        for name in ("P", "L", "H"):
            a.script(name, WHO.replace("NAME", name))
        yield a
    finally:
        a.close()


@pytest.mark.parametrize(
    ("param", "literal", "path", "other"),
    [
        ("/u/{id}", "/u/é", "/u/%C3%A9", "/u/e"),
        ("/u/{id}", "/u/~x", "/u/~x", "/u/x"),
        ("/u/{id}", "/u/|x", "/u/%7Cx", "/u/x"),
        ("/a/{x}/z", "/a/é/{y}", "/a/%C3%A9/z", "/a/e/z"),
    ],
    ids=["e-acute", "tilde", "bar", "later-segment"],
)
def test_a_literal_segment_wins_over_a_param_sorting_before_it(
    admin: Admin, user: httpx.Client, param: str, literal: str, path: str, other: str
) -> None:
    """The literals sort after ``{``, so the database gives the param route first:
    the literal route is served all the same."""
    admin.route("GET", param, "P")
    admin.route("GET", literal, "L")
    r = user.get(f"/apps/{admin.app_name}{path}")
    assert (r.status_code, r.headers["x-script"]) == (200, "L"), r.text
    r = user.get(f"/apps/{admin.app_name}{other}")
    assert (r.status_code, r.headers["x-script"]) == (200, "P"), r.text


def test_head_reaches_its_own_route_and_else_the_get_route_without_a_body(
    admin: Admin, user: httpx.Client
) -> None:
    """A HEAD route is served beside a GET route of the same path; without one, HEAD
    runs the GET route (its event's method ``HEAD``) and the answer has the GET's
    headers and no body. A path served by GET allows HEAD."""
    admin.route("GET", "/h", "P")
    admin.route("HEAD", "/h", "H")
    admin.route("GET", "/g/{id}", "P")
    base = f"/apps/{admin.app_name}"
    r = user.head(base + "/h")
    assert (r.status_code, r.headers["x-script"], r.content) == (200, "H", b"")
    r = user.get(base + "/h")
    assert (r.status_code, r.headers["x-script"]) == (200, "P")
    got = user.get(base + "/g/1")
    r = user.head(base + "/g/1")
    assert (r.status_code, r.headers["x-script"], r.headers["x-method"]) == (200, "P", "HEAD")
    assert r.content == b""
    assert r.headers["content-length"] == got.headers["content-length"]
    r = user.delete(base + "/g/1")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")


def test_a_script_date_header_does_not_make_a_second_one(admin: Admin, user: httpx.Client) -> None:
    """The server sends its own ``Date``; a script's is dropped, not sent beside it."""
    admin.script(
        "dated",
        "def handle(event, ctx):\n"
        "    return ctx.response('ok', headers={'Date': 'Tue, 01 Jan 1980 00:00:00 GMT'})\n",
    )
    admin.route("GET", "/dated", "dated")
    r = user.get(f"/apps/{admin.app_name}/dated")
    assert (r.status_code, r.text) == (200, "ok")
    (date,) = r.headers.get_list("date")
    assert "1980" not in date


def test_a_plus_json_body_reaches_the_script_as_text(admin: Admin, user: httpx.Client) -> None:
    """``json`` is the parsed body for ``application/json`` only (API.md): an
    ``application/*+json`` body, well-formed or not, arrives as text."""
    admin.script(
        "echo",
        "def handle(event, ctx):\n    return {'body': event['body'], 'json': event['json']}\n",
    )
    admin.route("POST", "/echo", "echo")
    url = f"/apps/{admin.app_name}/echo"
    for raw in ('{"a": 1}', "{nope"):
        r = user.post(url, content=raw, headers={"content-type": "application/ld+json"})
        assert (r.status_code, r.json()) == (200, {"body": raw, "json": None}), r.text
    r = user.post(
        url, content='{"a": 1}', headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert (r.status_code, r.json()) == (200, {"body": '{"a": 1}', "json": {"a": 1}}), r.text

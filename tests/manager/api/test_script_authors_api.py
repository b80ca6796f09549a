"""The admin API's side of "a script gets no more data than its author held": every
save records the saver's data capabilities; data triggers need ``app_read_data``;
a dead letter's payload (the original event, the app's data) needs it too, and so do
what an execution's script made of that data: its result, logs, error message and
traceback."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from manager_core import tables as t
from manager_core.api.executions import WITHHELD
from picloud_shared.principals import Capability
from tests.manager.api.endpoints import enqueue_execution, insert_dead_letter
from tests.manager.api.helpers import SOURCE, Api

pytestmark = pytest.mark.anyio

C = Capability

# A script's traceback quotes its lines, and so the values they hold.
SECRET_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "<script s>", line 2, in handle\n'
    "    raise ValueError('the secret is ' + card)\n"
    "ValueError: the secret is 4111-1111\n"
)


async def test_each_save_records_the_savers_data_capabilities(api: Api) -> None:
    """Created by a member who manages scripts only: none. Re-saved by one who may
    also read: read only. By the owner: both. GET and the list show the last."""
    url = f"/apps/{api.app_id}/scripts"
    scripter = await api.user("scripter", C.APP_MANAGE_SCRIPTS, C.APP_READ)
    reader = await api.user("reader", C.APP_MANAGE_SCRIPTS, C.APP_READ_DATA)
    created = await api.call("POST", url, scripter, {"name": "s", "source": SOURCE})
    assert created.status_code == 201, created.text
    assert created.json()["data_capabilities"] == []
    saved = await api.call("PUT", f"{url}/s", reader, {"source": SOURCE})
    assert saved.json()["data_capabilities"] == ["app_read_data"]
    # a save that changes only a limit is a save too
    saved = await api.call("PUT", f"{url}/s", api.owner, {"timeout_seconds": 5})
    assert saved.json()["data_capabilities"] == ["app_read_data", "app_write_data"]
    got = await api.call("GET", f"{url}/s", scripter)
    assert got.json()["data_capabilities"] == ["app_read_data", "app_write_data"]
    listed = await api.call("GET", url, scripter)
    assert [s["data_capabilities"] for s in listed.json()["items"]] == [
        ["app_read_data", "app_write_data"]
    ]


@pytest.mark.parametrize("kind", ["kv", "docs", "dead-letter"])
async def test_registering_a_data_trigger_needs_read_data(api: Api, kind: str) -> None:
    """app_manage_triggers alone: 403 naming app_read_data, nothing registered; with
    app_read_data as well: 201."""
    await api.script("s")
    body = {
        "kv": {"script": "s", "key_glob": "*"},
        "docs": {"script": "s", "collection_glob": "*"},
        "dead-letter": {"script": "s"},
    }[kind]
    url = f"/apps/{api.app_id}/triggers/{kind}"
    manager = await api.user("manager", C.APP_MANAGE_TRIGGERS, C.APP_READ)
    refused = await api.call("POST", url, manager, body)
    assert refused.status_code == 403
    assert "app_read_data" in refused.json()["error"]["message"]
    assert (await api.call("GET", f"/apps/{api.app_id}/triggers")).json()["items"] == []
    reader = await api.user("reader", C.APP_MANAGE_TRIGGERS, C.APP_READ_DATA)
    assert (await api.call("POST", url, reader, body)).status_code == 201


async def test_a_dead_letters_payload_is_shown_only_to_data_readers(api: Api) -> None:
    """app_read lists dead letters, but their payload (a KV value here) is null for
    a member who may not read the app's data, and so is their error's traceback;
    resolving one answers the same way."""
    letter = await insert_dead_letter(
        api, await enqueue_execution(api), error_traceback=SECRET_TRACEBACK
    )
    url = f"/apps/{api.app_id}/dead-letters"
    watcher = await api.user("watcher", C.APP_READ, C.APP_MANAGE_DEAD_LETTERS)
    reader = await api.user("reader", C.APP_READ, C.APP_READ_DATA)
    (hidden,) = (await api.call("GET", url, watcher)).json()["items"]
    assert hidden["payload"] is None
    assert hidden["error"] == {
        "kind": "uncaught_exception",
        "message": WITHHELD,
        "traceback": None,
    }
    (shown,) = (await api.call("GET", url, reader)).json()["items"]
    assert shown["payload"]["value"] == 1
    assert shown["error"]["message"] == "boom"
    assert shown["error"]["traceback"] == SECRET_TRACEBACK
    resolved = await api.call("POST", f"{url}/{letter}/resolve", watcher)
    assert resolved.status_code == 200
    assert resolved.json()["payload"] is None
    assert resolved.json()["error"]["message"] == WITHHELD
    assert resolved.json()["error"]["traceback"] is None


async def test_what_a_script_made_of_the_data_is_shown_only_to_data_readers(api: Api) -> None:
    """An execution's result, logs, error message and traceback (a script's own text,
    which may quote a value) are withheld from an app_read member, in the list and
    one by one; its status, attempts and error kind are not."""
    execution_id = await enqueue_execution(api)
    async with api.deps.users._engine.begin() as conn:
        await conn.execute(
            sa.update(t.executions)
            .where(t.executions.c.id == execution_id)
            .values(
                status="failed",
                attempts=1,
                logs=["value is 4111-1111"],
                result={"status": 200, "body": "4111-1111"},
                error_kind="uncaught_exception",
                error_message="ValueError: the secret is 4111-1111",
                error_traceback=SECRET_TRACEBACK,
            )
        )
    url = f"/apps/{api.app_id}/executions"
    watcher = await api.user("watcher", C.APP_READ)
    reader = await api.user("reader", C.APP_READ, C.APP_READ_DATA)
    (listed,) = (await api.call("GET", url, watcher)).json()["items"]
    one = (await api.call("GET", f"{url}/{execution_id}", watcher)).json()
    for hidden in (listed, one):
        assert "4111" not in json.dumps(hidden)
        assert (hidden["status"], hidden["attempts"]) == ("failed", 1)
        assert hidden["error"] == {
            "kind": "uncaught_exception",
            "message": WITHHELD,
            "traceback": None,
        }
        assert (hidden["logs"], hidden["result"]) == (None, None)
    shown = (await api.call("GET", f"{url}/{execution_id}", reader)).json()
    assert shown["logs"] == ["value is 4111-1111"]
    assert shown["result"] == {"status": 200, "body": "4111-1111"}
    assert shown["error"]["message"] == "ValueError: the secret is 4111-1111"
    assert shown["error"]["traceback"] == SECRET_TRACEBACK

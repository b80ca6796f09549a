"""Fixtures for the executor suite: a real ProcessExecutor and request builders."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from executor_core.executor import ProcessExecutor
from executor_core.memory_host import MemoryHostApi
from picloud_shared.execution import ExecRequest
from picloud_shared.ids import AppId, ExecutionId, ScriptId, UserId
from picloud_shared.principals import ALL_CAPABILITIES, Principal

MakeRequest = Callable[..., ExecRequest]


def uid_base() -> int:
    """A uid range of its own per xdist worker, so parallel pools never share uids."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return 61000 + 1000 * index


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def executor() -> AsyncIterator[ProcessExecutor]:
    async with ProcessExecutor(4, spare_workers=1, uid_base=uid_base()) as ex:
        yield ex


@pytest.fixture
def host() -> MemoryHostApi:
    return MemoryHostApi()


def new_app() -> AppId:
    return AppId(uuid.uuid4())


@pytest.fixture
def make_request() -> MakeRequest:
    default_app = new_app()
    script_ids: dict[str, ScriptId] = {}

    def make(source: str, event: dict[str, Any] | None = None, **kw: Any) -> ExecRequest:
        app_id = kw.pop("app_id", default_app)
        # One script id per source text unless given: the compile cache is per id@version.
        script_id = kw.pop("script_id", None) or script_ids.setdefault(
            source, ScriptId(uuid.uuid4())
        )
        principal = Principal(UserId(uuid.uuid4()), app_id, ALL_CAPABILITIES)
        return ExecRequest(
            execution_id=ExecutionId(uuid.uuid4()),
            app_id=app_id,
            app_name=kw.pop("app_name", "demo"),
            script_id=script_id,
            script_version=kw.pop("script_version", 1),
            source=source,
            event=event if event is not None else {},
            principal=principal,
            **kw,
        )

    return make

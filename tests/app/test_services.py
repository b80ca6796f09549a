"""The composition root started in-process: what ``running`` does around the node."""

from __future__ import annotations

import gc

import pytest

from picloud.services import build_services, running
from picloud.settings import Settings

pytestmark = pytest.mark.anyio


async def test_a_running_node_keeps_its_startup_objects_out_of_the_collector(
    db_url: str,
) -> None:
    """Started, the node's long-lived objects are frozen (full collections skip them);
    stopped, they are given back, so a stopped node's garbage can be collected."""
    services = build_services(Settings(executor_max_workers=1), db_url, node_id="gc-node")
    assert gc.get_freeze_count() == 0
    async with running(services):
        assert services.dispatcher.ready
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0

"""A dispatcher in its own process, for the crash test.

``python -m tests.manager.dispatcher_proc URL NODE``

It runs until killed. It prints ``ready`` once the dispatcher claims.
"""

from __future__ import annotations

import sys

import anyio

from manager_core.db import make_engine
from tests.manager.dispatch_world import make_world


async def main(url: str, node: str) -> None:
    engine = make_engine(url, pool_size=10, max_overflow=10)
    async with make_world(engine, attach_app=False) as world:
        dispatcher = world.dispatcher(node, lease_seconds=2.0, recover_interval=0.2)
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            print("ready", flush=True)
            await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])

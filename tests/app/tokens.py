"""Whose a token is, read straight from the database (for the CLI and bootstrap tests)."""

from __future__ import annotations

import anyio

from manager_core.db import make_engine
from manager_core.postgres.users import PostgresUserRepo


def token_holder(url: str, token: str) -> str | None:
    """The name of the user ``token`` authenticates, if any."""

    async def look() -> str | None:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            user = await PostgresUserRepo(engine).authenticate(token)
            return None if user is None else user.name
        finally:
            await engine.dispose()

    return anyio.run(look)

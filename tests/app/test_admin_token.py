"""The instance admin's token: created on first start from ``PICLOUD_ADMIN_TOKEN`` (or
generated and printed once); on a later start a different ``PICLOUD_ADMIN_TOKEN``
replaces it, so the admin token can be rotated and a leaked one revoked."""

from __future__ import annotations

import anyio
import pytest

from manager_core.db import make_engine
from manager_core.postgres.users import PostgresUserRepo
from picloud.runtime import ADMIN_NAME, bootstrap_admin
from picloud.settings import Settings
from picloud_shared.errors import Conflict
from tests.app.tokens import token_holder

OLD, NEW = "first-admin-token-0123456789", "second-admin-token-0123456789"


def _start(url: str, token: str | None, capsys: pytest.CaptureFixture[str]) -> str:
    """What a start prints about the admin."""
    bootstrap_admin(url, Settings(database_url=url, admin_token=token))
    return capsys.readouterr().err


def test_a_new_admin_token_replaces_the_old_one(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "created instance admin" in _start(db_url, OLD, capsys)
    assert token_holder(db_url, OLD) == ADMIN_NAME
    assert _start(db_url, OLD, capsys) == ""  # the same token: nothing to do
    said = _start(db_url, NEW, capsys)
    assert "is now PICLOUD_ADMIN_TOKEN" in said
    assert NEW not in said  # never printed
    assert (token_holder(db_url, OLD), token_holder(db_url, NEW)) == (None, ADMIN_NAME)


def test_a_start_without_the_setting_keeps_the_token(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No PICLOUD_ADMIN_TOKEN after the first start: nothing printed, nothing changed
    (a generated token is printed on the first start only)."""
    assert "shown once" in _start(db_url, None, capsys)
    _start(db_url, OLD, capsys)
    assert _start(db_url, None, capsys) == ""
    assert token_holder(db_url, OLD) == ADMIN_NAME


def test_a_token_another_user_holds_is_refused(db_url: str) -> None:
    async def go() -> None:
        engine = make_engine(db_url, pool_size=1, max_overflow=0)
        try:
            users = PostgresUserRepo(engine)
            await users.ensure_instance_admin(ADMIN_NAME, OLD)
            await users.create_user("someone", token=NEW)
            with pytest.raises(Conflict):
                await users.replace_admin_token(ADMIN_NAME, NEW)
            assert (await users.authenticate(OLD)).name == ADMIN_NAME  # type: ignore[union-attr]
            assert await users.replace_admin_token("someone", OLD) is False  # not an admin
        finally:
            await engine.dispose()

    anyio.run(go)

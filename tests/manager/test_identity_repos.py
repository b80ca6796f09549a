"""Users, tokens, apps and members on real PostgreSQL."""

from __future__ import annotations

import uuid

import anyio
import pytest
from sqlalchemy import any_, func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres import PostgresAppRepo, PostgresUserRepo
from manager_core.postgres.users import hash_token
from picloud_shared.errors import Conflict, InvalidInput, InvalidName, NotFound
from picloud_shared.ids import AppId, UserId
from picloud_shared.principals import ALL_CAPABILITIES, Capability

pytestmark = pytest.mark.anyio


async def test_create_user_returns_a_token_that_authenticates(engine: AsyncEngine) -> None:
    """The token handed out on creation authenticates as that user."""
    users = PostgresUserRepo(engine)
    user, token = await users.create_user("alice")
    assert token.startswith("pc_")
    assert await users.authenticate(token) == user
    assert user.is_instance_admin is False


async def test_tokens_are_stored_only_as_sha256(engine: AsyncEngine) -> None:
    """The database holds the token's hash, never the token."""
    users = PostgresUserRepo(engine)
    _, token = await users.create_user("alice")
    async with engine.connect() as conn:
        stored = (await conn.execute(select(t.users.c.token_hash))).scalar_one()
    assert bytes(stored) == hash_token(token)
    assert token.encode() not in bytes(stored)


@pytest.mark.parametrize("token", ["", "pc_wrong", "pc_" + "x" * 43])
async def test_unknown_tokens_do_not_authenticate(engine: AsyncEngine, token: str) -> None:
    """An empty or unknown token authenticates nobody."""
    users = PostgresUserRepo(engine)
    await users.create_user("alice")
    assert await users.authenticate(token) is None


async def test_get_user_round_trips_and_misses(engine: AsyncEngine) -> None:
    """``get`` answers the stored user, and ``None`` for an unknown id."""
    users = PostgresUserRepo(engine)
    user, _ = await users.create_user("root", instance_admin=True)
    assert await users.get(user.id) == user
    assert user.is_instance_admin is True
    assert await users.get(UserId(uuid.uuid4())) is None


async def test_duplicate_user_name_is_a_conflict(engine: AsyncEngine) -> None:
    """User names are unique."""
    users = PostgresUserRepo(engine)
    await users.create_user("alice")
    with pytest.raises(Conflict):
        await users.create_user("alice")


@pytest.mark.parametrize("name", ["", " alice", "a" * 64, "al\x00ice", "-x"])
async def test_invalid_user_names_are_rejected(engine: AsyncEngine, name: str) -> None:
    """User names are 1-63 safe characters starting with a letter or digit."""
    with pytest.raises(InvalidName):
        await PostgresUserRepo(engine).create_user(name)


async def test_ensure_instance_admin_creates_the_admin_once(engine: AsyncEngine) -> None:
    """First call creates the admin with the given token; later calls do nothing."""
    users = PostgresUserRepo(engine)
    token = "a-provided-admin-token"
    admin = await users.ensure_instance_admin("admin", token)
    assert admin is not None
    assert admin.is_instance_admin
    assert await users.authenticate(token) == admin
    assert await users.ensure_instance_admin("admin2", "another-admin-token") is None
    assert await users.authenticate("another-admin-token") is None


async def test_ensure_instance_admin_is_safe_concurrently(engine: AsyncEngine) -> None:
    """Several processes starting at once create exactly one instance admin."""
    users = PostgresUserRepo(engine)
    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(users.ensure_instance_admin, f"admin{i}", f"token-number-{i:08d}")
    async with engine.connect() as conn:
        count = await conn.scalar(select(func.count()).select_from(t.users))
    assert count == 1


async def test_ensure_instance_admin_rejects_a_short_token(engine: AsyncEngine) -> None:
    """A guessable admin token (under 16 characters) is refused."""
    with pytest.raises(InvalidInput):
        await PostgresUserRepo(engine).ensure_instance_admin("admin", "short")


# -- apps -----------------------------------------------------------------------------


async def test_create_app_makes_the_creator_a_full_member(engine: AsyncEngine) -> None:
    """The creator holds every capability in the new app."""
    user, _ = await PostgresUserRepo(engine).create_user("alice")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", user.id)
    assert (app.name, app.created_by) == ("shop", user.id)
    assert await apps.capabilities_of(app.id, user.id) == ALL_CAPABILITIES
    assert await apps.get(app.id) == app
    assert await apps.get_by_name("shop") == app


async def test_unknown_app_lookups_answer_none(engine: AsyncEngine) -> None:
    """Lookups of a missing app answer ``None``."""
    apps = PostgresAppRepo(engine)
    assert await apps.get(AppId(uuid.uuid4())) is None
    assert await apps.get_by_name("nope") is None


async def test_duplicate_app_name_is_a_conflict(engine: AsyncEngine) -> None:
    """App names are unique across the instance."""
    user, _ = await PostgresUserRepo(engine).create_user("alice")
    apps = PostgresAppRepo(engine)
    await apps.create("shop", user.id)
    with pytest.raises(Conflict):
        await apps.create("shop", user.id)


@pytest.mark.parametrize("name", ["Shop", "", "a" * 64, "my_app"])
async def test_invalid_app_names_are_rejected(engine: AsyncEngine, name: str) -> None:
    """App names are [a-z0-9-]{1,63}."""
    user, _ = await PostgresUserRepo(engine).create_user("alice")
    with pytest.raises(InvalidName):
        await PostgresAppRepo(engine).create(name, user.id)


async def test_list_visible_shows_members_their_apps_and_admins_all(engine: AsyncEngine) -> None:
    """Members see their apps; instance admins see every app."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    root, _ = await users.create_user("root", instance_admin=True)
    apps = PostgresAppRepo(engine)
    await apps.create("a-shop", alice.id)
    await apps.create("b-blog", bob.id)
    alice_sees = await apps.list_visible(alice.id, instance_admin=False)
    root_sees = await apps.list_visible(root.id, instance_admin=True)
    assert [a.name for a in alice_sees] == ["a-shop"]
    assert [a.name for a in root_sees] == ["a-shop", "b-blog"]


async def test_list_visible_can_require_a_capability(engine: AsyncEngine) -> None:
    """With ``capability``, only apps where the member holds it are listed."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    apps = PostgresAppRepo(engine)
    shop = await apps.create("shop", alice.id)
    blog = await apps.create("blog", alice.id)
    await apps.set_capabilities(shop.id, bob.id, [Capability.APP_READ])
    await apps.set_capabilities(blog.id, bob.id, [Capability.APP_WRITE_DATA])
    seen = await apps.list_visible(bob.id, instance_admin=False, capability=Capability.APP_READ)
    assert [a.name for a in seen] == ["shop"]


async def test_list_visible_pages_by_name(engine: AsyncEngine) -> None:
    """Keyset pagination walks every app once, in name order."""
    user, _ = await PostgresUserRepo(engine).create_user("alice")
    apps = PostgresAppRepo(engine)
    for name in ["c", "a", "e", "b", "d"]:
        await apps.create(name, user.id)
    first = await apps.list_visible(user.id, instance_admin=False, limit=2)
    second = await apps.list_visible(user.id, instance_admin=False, limit=2, after=first[-1].name)
    third = await apps.list_visible(user.id, instance_admin=False, limit=2, after=second[-1].name)
    assert [a.name for a in [*first, *second, *third]] == ["a", "b", "c", "d", "e"]


async def test_delete_app_removes_its_members(engine: AsyncEngine) -> None:
    """Deleting an app answers ``True`` once and removes its member rows."""
    user, _ = await PostgresUserRepo(engine).create_user("alice")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", user.id)
    assert await apps.delete(app.id) is True
    assert await apps.delete(app.id) is False
    assert await apps.get(app.id) is None
    assert await apps.capabilities_of(app.id, user.id) is None


# -- members --------------------------------------------------------------------------


async def test_set_capabilities_adds_replaces_and_removes(engine: AsyncEngine) -> None:
    """Capabilities are replaced wholesale; an empty set removes the member."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    await apps.set_capabilities(app.id, bob.id, [Capability.APP_READ, Capability.APP_READ_DATA])
    assert await apps.capabilities_of(app.id, bob.id) == {
        Capability.APP_READ,
        Capability.APP_READ_DATA,
    }
    await apps.set_capabilities(app.id, bob.id, [Capability.APP_DELETE])
    assert await apps.capabilities_of(app.id, bob.id) == {Capability.APP_DELETE}
    assert await apps.set_capabilities(app.id, bob.id, []) == frozenset()
    assert await apps.capabilities_of(app.id, bob.id) is None


async def test_set_capabilities_for_a_missing_user_or_app_is_not_found(
    engine: AsyncEngine,
) -> None:
    """Members must be existing users of existing apps."""
    alice, _ = await PostgresUserRepo(engine).create_user("alice")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    with pytest.raises(NotFound):
        await apps.set_capabilities(app.id, UserId(uuid.uuid4()), [Capability.APP_READ])
    with pytest.raises(NotFound):
        await apps.set_capabilities(AppId(uuid.uuid4()), alice.id, [Capability.APP_READ])
    with pytest.raises(NotFound):
        await apps.set_capabilities(app.id, UserId(uuid.uuid4()), [])


async def test_principal_for_a_member_holds_their_capabilities(engine: AsyncEngine) -> None:
    """A member's principal carries exactly the stored capabilities."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    await apps.set_capabilities(app.id, bob.id, [Capability.APP_READ])
    principal = await apps.principal_for(app.id, bob.id)
    assert principal is not None
    assert principal.capabilities == {Capability.APP_READ}
    assert not principal.is_instance_admin
    assert principal.can(Capability.APP_READ)
    assert not principal.can(Capability.APP_DELETE)


async def test_principal_for_an_instance_admin_holds_everything(engine: AsyncEngine) -> None:
    """Instance admins act with every capability in any app, member or not."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    root, _ = await users.create_user("root", instance_admin=True)
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    principal = await apps.principal_for(app.id, root.id)
    assert principal is not None
    assert principal.is_instance_admin
    assert principal.capabilities == ALL_CAPABILITIES


async def test_principal_for_answers_none_for_outsiders_and_the_missing(
    engine: AsyncEngine,
) -> None:
    """Non-members, deleted users and unknown apps have no principal."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    root, _ = await users.create_user("root", instance_admin=True)
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    assert await apps.principal_for(app.id, bob.id) is None
    assert await apps.principal_for(app.id, UserId(uuid.uuid4())) is None
    assert await apps.principal_for(AppId(uuid.uuid4()), root.id) is None


async def test_principal_for_a_deleted_user_is_none(engine: AsyncEngine) -> None:
    """Once the user row is gone (cascading their memberships), so is the principal."""
    users = PostgresUserRepo(engine)
    alice, _ = await users.create_user("alice")
    bob, _ = await users.create_user("bob")
    apps = PostgresAppRepo(engine)
    app = await apps.create("shop", alice.id)
    await apps.set_capabilities(app.id, bob.id, [Capability.APP_READ])
    async with engine.begin() as conn:
        await conn.execute(t.users.delete().where(t.users.c.id == bob.id))
    assert await apps.principal_for(app.id, bob.id) is None


async def test_repos_join_a_callers_transaction(engine: AsyncEngine) -> None:
    """Calls made with ``conn`` commit or roll back with the caller's transaction."""
    users = PostgresUserRepo(engine)
    apps = PostgresAppRepo(engine)
    alice, _ = await users.create_user("alice")
    async with engine.connect() as conn:
        await conn.begin()
        await apps.create("shop", alice.id, conn=conn)
        assert await apps.get_by_name("shop", conn=conn) is not None
        await conn.rollback()
    assert await apps.get_by_name("shop") is None


async def test_a_user_who_becomes_an_apps_manager_while_being_deleted_keeps_it_managed(
    engine: AsyncEngine,
) -> None:
    """A delete of U waits for U's row; meanwhile M makes U a manager of M's app. The
    delete must then count U as that app's manager, so M, removing themself while the
    delete finishes, is refused: the app never ends without a member manager."""
    users, apps = PostgresUserRepo(engine), PostgresAppRepo(engine)
    admin, _ = await users.create_user("root", True)
    m, _ = await users.create_user("m", False)
    u, _ = await users.create_user("u", False)
    app = await apps.create("shop", m.id)
    outcome: dict[str, object] = {}

    async def delete_u() -> None:
        outcome["delete"] = await users.delete(u.id)

    async with engine.connect() as holder, engine.connect() as member_lock:
        # Hold U's row (as a membership insert does) so the delete waits for it.
        held = select(t.users.c.id).where(t.users.c.id == u.id)
        await holder.execute(held.with_for_update(key_share=True, read=True))
        async with anyio.create_task_group() as tg:
            tg.start_soon(delete_u)
            await anyio.sleep(0.5)
            await apps.set_capabilities(
                app.id, u.id, [Capability.APP_READ, Capability.APP_MANAGE_MEMBERS]
            )
            # Keep U's membership row: the delete's cascade waits on it, after its checks.
            await member_lock.execute(
                select(t.app_members.c.user_id)
                .where(t.app_members.c.app_id == app.id, t.app_members.c.user_id == u.id)
                .with_for_update()
            )
            await holder.rollback()
            await anyio.sleep(0.5)

            async def m_leaves() -> None:
                try:
                    await apps.set_capabilities(app.id, m.id, [])
                    outcome["m"] = "left"
                except Conflict:
                    outcome["m"] = "refused"

            tg.start_soon(m_leaves)
            await anyio.sleep(0.5)
            await member_lock.rollback()
    assert outcome["m"] == "refused"
    async with engine.connect() as conn:
        managers = await conn.scalar(
            select(func.count())
            .select_from(t.app_members)
            .where(
                t.app_members.c.app_id == app.id,
                literal(Capability.APP_MANAGE_MEMBERS.value) == any_(t.app_members.c.capabilities),
            )
        )
    assert managers == 1
    assert admin.is_instance_admin

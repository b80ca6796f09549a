"""Bearer-token authentication and capability checks for the admin API.

The checks run in this order, so an answer never reveals more than the caller
may know::

    no or unknown token                       → Unauthenticated  401
    app missing, or caller not a member
      (and not an instance admin)             → NotFound         404
    member without the capability             → Forbidden        403

Framework-free: the admin API hands in the raw ``Authorization`` header.
"""

from __future__ import annotations

from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.users import PostgresUserRepo, User
from picloud_shared.errors import Forbidden, NotFound, Unauthenticated
from picloud_shared.ids import AppId
from picloud_shared.principals import Capability, Principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class Authenticator:
    """Resolves callers and checks what they may do."""

    def __init__(self, users: PostgresUserRepo, apps: PostgresAppRepo) -> None:
        self._users = users
        self._apps = apps

    async def user(self, authorization: str | None) -> User:
        """The user behind an ``Authorization`` header. Raises ``Unauthenticated``."""
        token = bearer_token(authorization)
        user = None if token is None else await self._users.authenticate(token)
        if user is None:
            raise Unauthenticated(
                "a valid token is required: Authorization: Bearer <token> "
                "(missing, not a bearer token, or not one of this instance's)"
            )
        return user

    async def principal(self, user: User, app_id: AppId, capability: Capability) -> Principal:
        """``user`` acting in the app, holding ``capability``.

        Raises ``NotFound`` for an app the user cannot see (missing, or not a member
        and not an instance admin) and ``Forbidden`` when a member lacks ``capability``.
        """
        principal = await self._apps.principal_for(app_id, user.id)
        if principal is None:
            raise NotFound("no such app")
        if not principal.can(capability):
            raise Forbidden(f"this needs the {capability} capability")
        return principal

    @staticmethod
    def require_instance_admin(user: User) -> None:
        """Raise ``Forbidden`` unless ``user`` is an instance admin."""
        if not user.is_instance_admin:
            raise Forbidden("this needs an instance admin")

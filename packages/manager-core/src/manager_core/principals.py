"""``AdminPrincipalResolver``: who a dispatched script runs as.

A trigger's script runs as the user that registered the trigger
(``registered_by_principal``); a route's script as the user that registered the
route. The principal must still exist and still hold the capability that let them
register it, otherwise the execution fails with ``principal_revoked`` and is not
retried.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from picloud_shared.errors import PrincipalRevoked
from picloud_shared.ids import AppId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import Capability, Principal

# The capability a registrant must keep for their trigger or route to keep running.
REQUIRED_CAPABILITY: dict[OutboxSourceKind, Capability] = {
    OutboxSourceKind.KV: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.DOCS: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.DEAD_LETTER: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.HTTP: Capability.APP_MANAGE_ROUTES,
}


class AdminPrincipalResolver:
    """Builds the :class:`Principal` a dispatched execution runs as."""

    def resolve(
        self,
        *,
        app_id: AppId,
        source_kind: OutboxSourceKind,
        user_id: UserId | None,
        user_exists: bool,
        is_instance_admin: bool,
        capabilities: Iterable[str] | None,
    ) -> Principal:
        """The registrant as a principal of ``app_id``.

        Raises :class:`PrincipalRevoked` when the user is gone, is no longer a member,
        or lost the capability their registration needs.
        """
        if user_id is None or not user_exists:
            raise PrincipalRevoked("the user who registered this no longer exists")
        caps = _parse_capabilities(tuple(capabilities or ()))
        principal = Principal(user_id, app_id, caps, is_instance_admin)
        required = REQUIRED_CAPABILITY[source_kind]
        if not principal.can(required):
            raise PrincipalRevoked(f"the user who registered this no longer holds {required.value}")
        return principal


@functools.lru_cache(maxsize=256)
def _parse_capabilities(names: tuple[str, ...]) -> frozenset[Capability]:
    """``Capability.parse_all``, cached: every claimed row carries its registrant's
    capabilities, and a node sees few distinct sets."""
    return Capability.parse_all(names)

"""``AdminPrincipalResolver``: who a dispatched script runs as.

A trigger's script runs as the user that registered the trigger
(``registered_by_principal``); a route's script as the user that registered the
route. The principal must still exist and still hold the capability that let them
register it, otherwise the execution fails with ``principal_revoked`` and is not
retried.

Whoever holds ``app_manage_scripts`` can rewrite the code a registrant runs, so a
script never gets more of the app's data than the user who last saved it held
(``Script.data_capabilities``): the registrant's ``app_read_data`` and
``app_write_data`` are withheld when the author lacked them. A trigger on data (kv,
docs, dead letters) hands its script the data in its event, so it needs
``app_read_data`` from both; without it the execution is ``principal_revoked``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from picloud_shared.errors import PrincipalRevoked
from picloud_shared.ids import AppId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import DATA_CAPABILITIES, Capability, Principal

# The capability a registrant must keep for their trigger or route to keep running.
REQUIRED_CAPABILITY: dict[OutboxSourceKind, Capability] = {
    OutboxSourceKind.KV: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.DOCS: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.DEAD_LETTER: Capability.APP_MANAGE_TRIGGERS,
    OutboxSourceKind.HTTP: Capability.APP_MANAGE_ROUTES,
}

# Events of these kinds carry the app's data (a value, a document, a dead row's event).
DATA_EVENT_KINDS = frozenset(
    {OutboxSourceKind.KV, OutboxSourceKind.DOCS, OutboxSourceKind.DEAD_LETTER}
)


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
        script_capabilities: frozenset[Capability] = DATA_CAPABILITIES,
    ) -> Principal:
        """The registrant as a principal of ``app_id``, less the data capabilities
        the script's author did not hold (``script_capabilities``).

        Raises :class:`PrincipalRevoked` when the user is gone, is no longer a member,
        or lost the capability their registration needs, or when a data trigger's
        script may not read the data its event carries.
        """
        if user_id is None or not user_exists:
            raise PrincipalRevoked("the user who registered this no longer exists")
        caps = _parse_capabilities(tuple(capabilities or ()))
        principal = Principal(user_id, app_id, caps, is_instance_admin)
        required = REQUIRED_CAPABILITY[source_kind]
        if not principal.can(required):
            raise PrincipalRevoked(f"the user who registered this no longer holds {required.value}")
        if source_kind in DATA_EVENT_KINDS and not principal.can(Capability.APP_READ_DATA):
            raise PrincipalRevoked(
                "the user who registered this trigger does not hold app_read_data, "
                "and its events carry the app's data"
            )
        withheld = DATA_CAPABILITIES - script_capabilities
        if source_kind in DATA_EVENT_KINDS and Capability.APP_READ_DATA in withheld:
            raise PrincipalRevoked(
                "the script was last saved by a user without app_read_data, and this "
                "trigger's events carry the app's data; save it again as a user who holds it"
            )
        return principal.without(withheld)


@functools.lru_cache(maxsize=256)
def _parse_capabilities(names: tuple[str, ...]) -> frozenset[Capability]:
    """``Capability.parse_all``, cached: every claimed row carries its registrant's
    capabilities, and a node sees few distinct sets."""
    return Capability.parse_all(names)

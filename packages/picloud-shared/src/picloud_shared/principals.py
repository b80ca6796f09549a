"""Who is acting: capabilities and the principal a script runs as."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from picloud_shared.ids import AppId, UserId

#: The bootstrap instance admin's name: the user a first start creates. Nobody else
#: may take it (a user ``admin`` who is no instance admin stops a start that finds
#: no instance admin).
BOOTSTRAP_ADMIN_NAME = "admin"


class Capability(enum.StrEnum):
    """What a member may do in one app (wire names of API.md)."""

    APP_READ = "app_read"
    APP_DELETE = "app_delete"
    APP_MANAGE_MEMBERS = "app_manage_members"
    APP_MANAGE_SCRIPTS = "app_manage_scripts"
    APP_MANAGE_ROUTES = "app_manage_routes"
    APP_MANAGE_TRIGGERS = "app_manage_triggers"
    APP_WRITE_DATA = "app_write_data"
    APP_READ_DATA = "app_read_data"
    APP_MANAGE_DEAD_LETTERS = "app_manage_dead_letters"

    @classmethod
    def parse_all(cls, names: Iterable[object]) -> frozenset[Capability]:
        """Decode wire names; raises ``ValueError`` naming the first unknown one and
        every known one."""
        out: set[Capability] = set()
        for name in names:
            try:
                out.add(cls(name))
            except ValueError:
                allowed = ", ".join(c.value for c in cls)
                raise ValueError(
                    f"unknown capability {name!r}; expected one of: {allowed}"
                ) from None
        return frozenset(out)


ALL_CAPABILITIES: frozenset[Capability] = frozenset(Capability)

# What a script may do with its app's data (``ctx.kv``, ``ctx.docs``, the data a
# trigger event carries). A script runs with no more of these than the user who last
# saved it held when saving (``Script.data_capabilities``).
DATA_CAPABILITIES: frozenset[Capability] = frozenset(
    {Capability.APP_READ_DATA, Capability.APP_WRITE_DATA}
)


@attrs.frozen
class Principal:
    """A user acting within one app, with the capabilities they hold there.

    Scripts run as the principal that registered their trigger or route.
    """

    user_id: UserId
    app_id: AppId
    capabilities: frozenset[Capability]
    is_instance_admin: bool = False

    def can(self, capability: Capability) -> bool:
        """Whether this principal holds ``capability`` (instance admins hold all)."""
        return self.is_instance_admin or capability in self.capabilities

    @property
    def data_rights(self) -> frozenset[Capability]:
        """The data capabilities it holds (``DATA_CAPABILITIES`` it can)."""
        if self.is_instance_admin:
            return DATA_CAPABILITIES
        return self.capabilities & DATA_CAPABILITIES

    def without(self, withheld: frozenset[Capability]) -> Principal:
        """This principal, less ``withheld`` (an instance admin then holds every
        capability but those, as a plain member)."""
        if not withheld or not (self.is_instance_admin or withheld & self.capabilities):
            return self
        held = ALL_CAPABILITIES if self.is_instance_admin else self.capabilities
        return Principal(self.user_id, self.app_id, held - withheld, is_instance_admin=False)

"""What an app owns: the app itself, its scripts and routes."""

from __future__ import annotations

import enum
import re
from datetime import datetime

import attrs

from picloud_shared.errors import InvalidName
from picloud_shared.ids import AppId, RouteId, ScriptId, UserId
from picloud_shared.limits import DEFAULT_MEMORY_LIMIT_MB, DEFAULT_TIMEOUT_SECONDS
from picloud_shared.principals import DATA_CAPABILITIES, Capability

APP_NAME_RE = re.compile(r"[a-z0-9-]{1,63}")
SCRIPT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
COLLECTION_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def check_app_name(name: object) -> str:
    """Return ``name`` if it is a valid app name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not APP_NAME_RE.fullmatch(name):
        raise InvalidName("app names are 1-63 characters of a-z, 0-9 and '-'")
    return name


def check_script_name(name: object) -> str:
    """Return ``name`` if it is a valid script name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not SCRIPT_NAME_RE.fullmatch(name):
        raise InvalidName("script names are 1-63 characters of A-Z, a-z, 0-9, '_' and '-'")
    return name


def check_collection(name: object) -> str:
    """Return ``name`` if it is a valid collection name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
        raise InvalidName("collection names are 1-63 characters of A-Z, a-z, 0-9, '_' and '-'")
    return name


class DispatchMode(enum.StrEnum):
    """How a user route runs its script: wait for the answer, or accept and run later."""

    SYNC = "sync"
    ASYNC = "async"


@attrs.frozen
class App:
    id: AppId
    name: str
    created_at: datetime
    created_by: UserId | None = None


@attrs.frozen
class Script:
    id: ScriptId
    app_id: AppId
    name: str
    source: str
    version: int = 1
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB
    # The data capabilities the user who saved this version held: its executions get
    # no more of them, whoever registered the route or trigger that runs it.
    data_capabilities: frozenset[Capability] = DATA_CAPABILITIES


@attrs.frozen
class Route:
    id: RouteId
    app_id: AppId
    method: str
    path: str
    script_id: ScriptId
    dispatch_mode: DispatchMode = DispatchMode.SYNC
    registered_by: UserId | None = None


@attrs.frozen
class RouteTarget:
    """What the user-route orchestrator needs to dispatch one route.

    ``path`` is the route's template, with ``{name}`` segments for path params.
    """

    route_id: RouteId
    app_id: AppId
    app_name: str
    method: str
    path: str
    dispatch_mode: DispatchMode
    script_id: ScriptId
    timeout_seconds: int

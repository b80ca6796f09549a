"""picloud's settings, read once from ``PICLOUD_*`` environment variables.

``Settings.from_env(os.environ)`` is the only reader; nothing happens at import time.
An invalid value raises ``ValueError`` naming the variable; so does a value past its
upper bound (``MAX_*`` below: what a real deployment never needs to exceed, and what
the node can still honour). ``PICLOUD_*`` variables it does not know are kept in
``Settings.unknown`` (typos: ``Settings.unknown_warning`` says so in one line).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
import platformdirs

from picloud_shared.limits import MAX_TIMEOUT_SECONDS, MIN_TOKEN_CHARS

__all__ = ["Settings"]

T = TypeVar("T")

ENV_PREFIX = "PICLOUD_"
# ``PICLOUD_*`` variables read elsewhere, not settings: never reported as unknown.
# ``PICLOUD_TEST_*`` belong to the test harness and ./dev (PICLOUD_TEST_DATABASE_URL,
# PICLOUD_TEST_WORKERS).
OTHER_VARIABLES = frozenset({"PICLOUD_ALEMBIC_DIR"})  # migrations.ALEMBIC_DIR_ENV
OTHER_PREFIXES = ("PICLOUD_TEST_",)

MAX_RETENTION_DAYS = 36500  # PICLOUD_EXECUTION_RETENTION_DAYS, at most a century
MAX_STORAGE_QUOTA_MB = 1024**3  # PICLOUD_APP_STORAGE_QUOTA_MB, at most a PiB
MAX_QUEUED_EXECUTIONS_PER_APP = 10_000_000
# A claimed row's lease; renewed every third of it. Under 3 s a node's pauses (a long
# collection, a slow disk) would let another node take rows it is still running.
MIN_LEASE_SECONDS = 3
MAX_LEASE_SECONDS = 3600
# The execution gate: the dispatcher runs two tasks per slot, and each execution in
# flight may hold a database connection (the engine's overflow is capacity + 4).
MAX_CONCURRENT_EXECUTIONS = 1024
# Open HTTP connections: each is a file descriptor (RLIMIT_NOFILE must allow them).
MAX_CONNECTIONS = 65536
# Waiting longer for a slot than the longest script may run helps no caller.
MAX_SYNC_ADMISSION_WAIT_MS = MAX_TIMEOUT_SECONDS * 1000
MAX_TRIGGER_DEPTH = 100
# The poll is a fallback (commits on this node wake the dispatcher at once), but it
# is how due retries and other nodes' rows are found: at most a minute late.
MAX_DISPATCH_POLL_INTERVAL_MS = 60_000
# A claim is further capped at half the gate's capacity.
MAX_DISPATCH_BATCH_SIZE = 1024
# Each worker runs as its own uid, claimed machine-wide out of 20000
# (executor_core.uids.SEARCH_SPAN) that every pool on the machine shares.
MAX_EXECUTOR_WORKERS = 1024
MAX_EXECUTIONS_PER_WORKER = 1_000_000
MAX_EXECUTOR_IDLE_TTL_SECONDS = 86400  # a day
MAX_EMBEDDED_PG_RESTARTS = 100  # within ten minutes
# PostgreSQL's default max_connections, what the embedded server runs with.
MAX_DB_POOL_SIZE = 100
MAX_DB_OUTBOX_POOL_SIZE = 100
# What one node may open on the embedded server (max_connections 100, a few kept for
# its LISTEN connection and for ``picloud admin`` beside it): the engine's pool and
# overflow (DB_POOL_SIZE + MAX_CONCURRENT_EXECUTIONS + 4) and DB_OUTBOX_POOL_SIZE.
EMBEDDED_PG_CONNECTIONS = 90


_DECIMAL = re.compile(r"-?[0-9]+")


def _int_in(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """A parser for integers in ``low..high``; ``what`` explains a special value."""

    def parse(value: str) -> int:
        number = _decimal(value)
        if number < low:
            if low > 1:
                raise ValueError(f"must be at least {low}")
            raise ValueError(
                "must be a positive integer" if low == 1 else "must be a non-negative integer"
            )
        if number > high:
            raise ValueError(f"must be at most {high}{what}")
        return number

    return parse


def _admin_token(value: str) -> str:
    token = _non_empty(value)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters")
    return token


def _decimal(value: str) -> int:
    """ASCII digits, with an optional leading ``-`` (for its range to refuse) and
    spaces around; not what else ``int()`` takes (``1_0``, ``+3``, other scripts'
    digits)."""
    if not _DECIMAL.fullmatch(value.strip()):
        raise ValueError("must be a whole number in ASCII digits")
    return int(value)


def _port(value: str) -> int:
    number = _decimal(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a TCP port (0-65535; 0 picks a free one)")
    return number


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


_SWITCH = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}


def _switch(value: str) -> bool:
    try:
        return _SWITCH[value.strip().lower()]
    except KeyError:
        raise ValueError("must be on or off") from None


def _database_url(value: str) -> str:
    value = value.strip()
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme in ("postgresql", "postgres"):
        value = "postgresql+psycopg://" + value.split("://", 1)[1]
    elif scheme != "postgresql+psycopg":
        raise ValueError("must be a postgresql:// (or postgresql+psycopg://) URL")
    from sqlalchemy.engine import make_url  # only when a URL is set: the start needs it

    try:
        port = make_url(value).port
    except ValueError:
        port = -1
    except Exception:  # sqlalchemy's ArgumentError and friends
        raise ValueError("is not a database URL") from None
    if port is not None and not 0 <= port <= 65535:
        raise ValueError("its port must be a number (0-65535)")
    return value


def masked_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@``, ``password=…``) shown as ``***``."""
    # Everything up to the last @ goes: a password's unescaped @ / ? # are masked too.
    scheme = r"[^:/?#@]*://" if "://" in url else ""
    url = re.sub(rf"^({scheme}[^/?#:@]*:).*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url, flags=re.IGNORECASE)


@attrs.frozen(kw_only=True)
class Settings:
    """Every ``PICLOUD_*`` setting, with its default."""

    #: ``PICLOUD_DATABASE_URL``; ``None`` runs the embedded PostgreSQL in ``data_dir/pg``.
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = attrs.field(factory=lambda: Path(platformdirs.user_data_dir("picloud")))
    #: Token of the instance admin created on first start (generated when unset).
    admin_token: str | None = None
    max_concurrent_executions: int = 16
    #: Open HTTP connections (and requests in progress) at once; past it, a 503.
    max_connections: int = 1000
    #: How long a sync request may wait for a free execution slot before its 503.
    sync_admission_wait_ms: int = 1000
    max_trigger_depth: int = 8
    dispatch_poll_interval_ms: int = 100
    dispatch_batch_size: int = 64
    #: How long a row this node claimed stays its own without a renewal: after a
    #: crash, its executions run again (elsewhere or after a restart) this much later.
    lease_seconds: int = 60
    executor_max_workers: int = 8
    executor_max_executions_per_worker: int = 1000
    executor_idle_ttl_seconds: int = 300
    #: Finished execution records are deleted this many days after they finished;
    #: ``0`` keeps them for ever.
    execution_retention_days: int = 14
    #: What one app may store (KV entries and documents), in MiB; ``0``: unlimited.
    app_storage_quota_mb: int = 1024
    #: Executions one app may have in the outbox before its async routes answer 503
    #: (``manager_core.backlog``); ``0``: unlimited.
    max_queued_executions_per_app: int = 10_000
    #: How often the embedded PostgreSQL is started again after it died, within ten
    #: minutes, before the node gives up and stops; ``0``: the node stops at once.
    embedded_pg_restarts: int = 5
    db_pool_size: int = 20
    #: Plain psycopg connections for the outbox's hot single statements.
    db_outbox_pool_size: int = 8
    #: One line per HTTP request on the ``picloud.access`` logger (``access_log.py``).
    access_log: bool = False
    #: ``PICLOUD_*`` variables in the environment that are no setting (sorted names).
    unknown: tuple[str, ...] = ()

    @property
    def app_storage_quota_bytes(self) -> int | None:
        """``app_storage_quota_mb`` in bytes; ``None`` when unlimited."""
        return self.app_storage_quota_mb * 1024 * 1024 or None

    @property
    def embedded_pg_dir(self) -> Path:
        """Where the embedded PostgreSQL cluster lives."""
        return self.data_dir / "pg"

    @property
    def database_connections(self) -> int:
        """Connections this node may open at once: the engine's pool and overflow,
        and the outbox pool."""
        return self.db_pool_size + self.max_concurrent_executions + 4 + self.db_outbox_pool_size

    def unknown_warning(self) -> str | None:
        """One line naming the unknown ``PICLOUD_*`` variables (never their values);
        ``None`` when there are none."""
        if not self.unknown:
            return None
        return (
            f"picloud: warning: ignoring unknown variable{'s' if len(self.unknown) > 1 else ''}"
            f" {', '.join(self.unknown)} (not a setting; see the README's Settings)"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read the settings from ``environ``; unset or empty variables keep the default."""
        read: set[str] = set()

        def get(
            name: str,
            parse: Callable[[str], T],
            *,
            secret: bool = False,
            show: Callable[[str], str] = repr,
        ) -> T | None:
            variable = ENV_PREFIX + name
            read.add(variable)
            raw = environ.get(variable)
            if raw is None or raw.strip() == "":
                return None
            try:
                return parse(raw)
            except ValueError as exc:
                reason = str(exc) if "invalid literal" not in str(exc) else "must be an integer"
                shown = "(not shown)" if secret else show(raw)
                raise ValueError(f"{variable}={shown}: {reason}") from None

        values = {
            "database_url": get(
                "DATABASE_URL", _database_url, show=lambda raw: repr(masked_url(raw))
            ),
            "host": get("HOST", _non_empty),
            "port": get("PORT", _port),
            "data_dir": get("DATA_DIR", lambda v: Path(v).expanduser()),
            "admin_token": get("ADMIN_TOKEN", _admin_token, secret=True),
            "max_concurrent_executions": get(
                "MAX_CONCURRENT_EXECUTIONS", _int_in(1, MAX_CONCURRENT_EXECUTIONS)
            ),
            "max_connections": get("MAX_CONNECTIONS", _int_in(1, MAX_CONNECTIONS)),
            "sync_admission_wait_ms": get(
                "SYNC_ADMISSION_WAIT_MS", _int_in(0, MAX_SYNC_ADMISSION_WAIT_MS)
            ),
            "max_trigger_depth": get("MAX_TRIGGER_DEPTH", _int_in(0, MAX_TRIGGER_DEPTH)),
            "dispatch_poll_interval_ms": get(
                "DISPATCH_POLL_INTERVAL_MS", _int_in(1, MAX_DISPATCH_POLL_INTERVAL_MS)
            ),
            "dispatch_batch_size": get("DISPATCH_BATCH_SIZE", _int_in(1, MAX_DISPATCH_BATCH_SIZE)),
            "lease_seconds": get("LEASE_SECONDS", _int_in(MIN_LEASE_SECONDS, MAX_LEASE_SECONDS)),
            "executor_max_workers": get("EXECUTOR_MAX_WORKERS", _int_in(1, MAX_EXECUTOR_WORKERS)),
            "executor_max_executions_per_worker": get(
                "EXECUTOR_MAX_EXECUTIONS_PER_WORKER", _int_in(1, MAX_EXECUTIONS_PER_WORKER)
            ),
            "executor_idle_ttl_seconds": get(
                "EXECUTOR_IDLE_TTL_SECONDS", _int_in(1, MAX_EXECUTOR_IDLE_TTL_SECONDS)
            ),
            "execution_retention_days": get(
                "EXECUTION_RETENTION_DAYS",
                _int_in(0, MAX_RETENTION_DAYS, " (0 keeps records for ever)"),
            ),
            "app_storage_quota_mb": get(
                "APP_STORAGE_QUOTA_MB", _int_in(0, MAX_STORAGE_QUOTA_MB, " (0 is unlimited)")
            ),
            "max_queued_executions_per_app": get(
                "MAX_QUEUED_EXECUTIONS_PER_APP",
                _int_in(0, MAX_QUEUED_EXECUTIONS_PER_APP, " (0 is unlimited)"),
            ),
            "embedded_pg_restarts": get(
                "EMBEDDED_PG_RESTARTS", _int_in(0, MAX_EMBEDDED_PG_RESTARTS)
            ),
            "db_pool_size": get("DB_POOL_SIZE", _int_in(1, MAX_DB_POOL_SIZE)),
            "db_outbox_pool_size": get("DB_OUTBOX_POOL_SIZE", _int_in(1, MAX_DB_OUTBOX_POOL_SIZE)),
            "access_log": get("ACCESS_LOG", _switch),
        }
        unknown = tuple(
            sorted(
                name
                for name in environ
                if name.startswith(ENV_PREFIX)
                and name not in read
                and name not in OTHER_VARIABLES
                and not name.startswith(OTHER_PREFIXES)
            )
        )
        settings = cls(
            **{name: value for name, value in values.items() if value is not None},
            unknown=unknown,
        )
        if settings.database_url is None and settings.database_connections > (
            EMBEDDED_PG_CONNECTIONS
        ):
            raise ValueError(
                "PICLOUD_DB_POOL_SIZE + PICLOUD_MAX_CONCURRENT_EXECUTIONS + 4"
                f" + PICLOUD_DB_OUTBOX_POOL_SIZE = {settings.database_connections}: the"
                f" embedded PostgreSQL takes at most {EMBEDDED_PG_CONNECTIONS} connections"
                " from a node (lower them, or set PICLOUD_DATABASE_URL)"
            )
        return settings

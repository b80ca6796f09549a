"""picloud's settings, read once from ``PICLOUD_*`` environment variables.

``Settings.from_env(os.environ)`` is the only reader; nothing happens at import time.
An invalid value raises ``ValueError`` naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
import platformdirs

from picloud_shared.limits import MIN_TOKEN_CHARS

__all__ = ["Settings"]

T = TypeVar("T")

ENV_PREFIX = "PICLOUD_"
MAX_RETENTION_DAYS = 36500  # PICLOUD_EXECUTION_RETENTION_DAYS, at most a century
MAX_STORAGE_QUOTA_MB = 1024**3  # PICLOUD_APP_STORAGE_QUOTA_MB, at most a PiB


def _positive_int(value: str) -> int:
    number = int(value.strip())
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def _retention_days(value: str) -> int:
    number = _non_negative_int(value)
    if number > MAX_RETENTION_DAYS:
        raise ValueError(f"must be at most {MAX_RETENTION_DAYS} (0 keeps records for ever)")
    return number


def _storage_quota_mb(value: str) -> int:
    number = _non_negative_int(value)
    if number > MAX_STORAGE_QUOTA_MB:
        raise ValueError(f"must be at most {MAX_STORAGE_QUOTA_MB} (0 is unlimited)")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value.strip())
    if number < 0:
        raise ValueError("must be a non-negative integer")
    return number


def _admin_token(value: str) -> str:
    token = _non_empty(value)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters")
    return token


def _port(value: str) -> int:
    number = int(value.strip())
    if not 0 <= number <= 65535:
        raise ValueError("must be a TCP port (0-65535; 0 picks a free one)")
    return number


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _database_url(value: str) -> str:
    value = value.strip()
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if scheme != "postgresql+psycopg":
        raise ValueError("must be a postgresql:// (or postgresql+psycopg://) URL")
    return value


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
    executor_max_workers: int = 8
    executor_max_executions_per_worker: int = 1000
    executor_idle_ttl_seconds: int = 300
    #: Finished execution records are deleted this many days after they finished;
    #: ``0`` keeps them for ever.
    execution_retention_days: int = 14
    #: What one app may store (KV entries and documents), in MiB; ``0``: unlimited.
    app_storage_quota_mb: int = 1024
    #: How often the embedded PostgreSQL is started again after it died, within ten
    #: minutes, before the node gives up and stops; ``0``: the node stops at once.
    embedded_pg_restarts: int = 5
    db_pool_size: int = 20
    #: Plain psycopg connections for the outbox's hot single statements.
    db_outbox_pool_size: int = 8

    @property
    def app_storage_quota_bytes(self) -> int | None:
        """``app_storage_quota_mb`` in bytes; ``None`` when unlimited."""
        return self.app_storage_quota_mb * 1024 * 1024 or None

    @property
    def embedded_pg_dir(self) -> Path:
        """Where the embedded PostgreSQL cluster lives."""
        return self.data_dir / "pg"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read the settings from ``environ``; unset or empty variables keep the default."""

        def get(name: str, parse: Callable[[str], T], *, secret: bool = False) -> T | None:
            variable = ENV_PREFIX + name
            raw = environ.get(variable)
            if raw is None or raw.strip() == "":
                return None
            try:
                return parse(raw)
            except ValueError as exc:
                reason = str(exc) if "invalid literal" not in str(exc) else "must be an integer"
                shown = "(not shown)" if secret else repr(raw)
                raise ValueError(f"{variable}={shown}: {reason}") from None

        values = {
            "database_url": get("DATABASE_URL", _database_url),
            "host": get("HOST", _non_empty),
            "port": get("PORT", _port),
            "data_dir": get("DATA_DIR", lambda v: Path(v).expanduser()),
            "admin_token": get("ADMIN_TOKEN", _admin_token, secret=True),
            "max_concurrent_executions": get("MAX_CONCURRENT_EXECUTIONS", _positive_int),
            "max_connections": get("MAX_CONNECTIONS", _positive_int),
            "sync_admission_wait_ms": get("SYNC_ADMISSION_WAIT_MS", _non_negative_int),
            "max_trigger_depth": get("MAX_TRIGGER_DEPTH", _non_negative_int),
            "dispatch_poll_interval_ms": get("DISPATCH_POLL_INTERVAL_MS", _positive_int),
            "dispatch_batch_size": get("DISPATCH_BATCH_SIZE", _positive_int),
            "executor_max_workers": get("EXECUTOR_MAX_WORKERS", _positive_int),
            "executor_max_executions_per_worker": get(
                "EXECUTOR_MAX_EXECUTIONS_PER_WORKER", _positive_int
            ),
            "executor_idle_ttl_seconds": get("EXECUTOR_IDLE_TTL_SECONDS", _positive_int),
            "execution_retention_days": get("EXECUTION_RETENTION_DAYS", _retention_days),
            "app_storage_quota_mb": get("APP_STORAGE_QUOTA_MB", _storage_quota_mb),
            "embedded_pg_restarts": get("EMBEDDED_PG_RESTARTS", _non_negative_int),
            "db_pool_size": get("DB_POOL_SIZE", _positive_int),
            "db_outbox_pool_size": get("DB_OUTBOX_POOL_SIZE", _positive_int),
        }
        return cls(**{name: value for name, value in values.items() if value is not None})

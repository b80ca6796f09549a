"""SQLAlchemy Core schema of picloud: the single source alembic compares against.

Every enum-like column is TEXT with a CHECK constraint listing its wire values
(the same strings ``picloud_shared`` enums use). Constraint names follow
``metadata.naming_convention`` so migrations can refer to them by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

__all__ = [
    "BACKOFFS",
    "CAPABILITIES",
    "DEAD_LETTER_RESOLUTIONS",
    "DISPATCH_MODES",
    "DOCS_OPS",
    "EXECUTION_STATUSES",
    "KV_OPS",
    "OUTBOX_SOURCE_KINDS",
    "TRIGGER_KINDS",
    "abandoned_executions",
    "app_members",
    "app_storage",
    "app_storage_deltas",
    "apps",
    "dead_letter_trigger_details",
    "dead_letters",
    "docs_trigger_details",
    "documents",
    "executions",
    "kv_entries",
    "kv_trigger_details",
    "metadata",
    "outbox",
    "routes",
    "scripts",
    "triggers",
    "users",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Wire values (kept in sync with picloud_shared's enums by tests over both).
DISPATCH_MODES = ("sync", "async")
TRIGGER_KINDS = ("kv", "docs", "dead_letter")
OUTBOX_SOURCE_KINDS = ("kv", "docs", "dead_letter", "http")
EXECUTION_STATUSES = (
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "dead_lettered",
    "skipped",
)
BACKOFFS = ("exponential", "linear", "constant")
DEAD_LETTER_RESOLUTIONS = ("handled", "handler_failed", "resolved", "replayed")
KV_OPS = ("set", "delete")
DOCS_OPS = ("insert", "update", "delete")
CAPABILITIES = (
    "app_read",
    "app_delete",
    "app_manage_members",
    "app_manage_scripts",
    "app_manage_routes",
    "app_manage_triggers",
    "app_write_data",
    "app_read_data",
    "app_manage_dead_letters",
)
DATA_CAPABILITIES = ("app_read_data", "app_write_data")

MAX_SCRIPT_SOURCE_BYTES = 256 * 1024
MAX_KV_KEY_BYTES = 512
MAX_GLOB_CHARS = 256


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _one_of(column: str, values: Iterable[str], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({_sql_list(values)})", name=name)


def _subset_of(column: str, values: Iterable[str], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} <@ ARRAY[{_sql_list(values)}]::text[]", name=name)


def _id() -> Column:
    return Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )


def _created_at() -> Column:
    return Column(
        "created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")
    )


def _updated_at() -> Column:
    return Column(
        "updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")
    )


def _app_id(*, primary_key: bool = False) -> Column:
    return Column(
        "app_id",
        UUID(as_uuid=True),
        ForeignKey("apps.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


def _retry_columns() -> list[Column | CheckConstraint]:
    """The retry policy a trigger declares and each outbox row carries."""
    return [
        Column("retry_backoff", Text, nullable=False, server_default=text("'exponential'")),
        Column("retry_base_delay_ms", Integer, nullable=False, server_default=text("1000")),
        Column("retry_max_delay_ms", Integer, nullable=False, server_default=text("300000")),
        Column("retry_max_attempts", Integer, nullable=False, server_default=text("5")),
        Column("retry_jitter", Double, nullable=False, server_default=text("0.2")),
        _one_of("retry_backoff", BACKOFFS, "retry_backoff"),
        CheckConstraint("retry_base_delay_ms >= 0", name="retry_base_delay_ms"),
        CheckConstraint("retry_max_delay_ms >= retry_base_delay_ms", name="retry_max_delay_ms"),
        CheckConstraint("retry_max_attempts BETWEEN 1 AND 100", name="retry_max_attempts"),
        CheckConstraint("retry_jitter >= 0 AND retry_jitter <= 1", name="retry_jitter"),
    ]


users = Table(
    "users",
    metadata,
    _id(),
    Column("name", Text, nullable=False, unique=True),
    Column("token_hash", LargeBinary, nullable=False, unique=True),  # sha256(token)
    Column("is_instance_admin", Boolean, nullable=False, server_default=text("false")),
    _created_at(),
    CheckConstraint("octet_length(token_hash) = 32", name="token_hash_sha256"),
)

apps = Table(
    "apps",
    metadata,
    _id(),
    Column("name", Text, nullable=False, unique=True),
    Column("created_by", UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL")),
    _created_at(),
    CheckConstraint("name ~ '^[a-z0-9-]{1,63}$'", name="name"),
)

app_members = Table(
    "app_members",
    metadata,
    _app_id(primary_key=True),
    Column(
        "user_id",
        UUID(as_uuid=True),
        ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("capabilities", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    _subset_of("capabilities", CAPABILITIES, "capabilities"),
    Index("ix_app_members_user_id", "user_id"),
)

scripts = Table(
    "scripts",
    metadata,
    _id(),
    _app_id(),
    Column("name", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("timeout_seconds", Integer, nullable=False, server_default=text("10")),
    Column("memory_limit_mb", Integer, nullable=False, server_default=text("128")),
    # The data capabilities of the user who saved this version: its executions get no
    # more of them than that (``picloud_shared.principals.DATA_CAPABILITIES``).
    Column(
        "data_capabilities",
        ARRAY(Text),
        nullable=False,
        server_default=text(f"ARRAY[{_sql_list(DATA_CAPABILITIES)}]::text[]"),
    ),
    _created_at(),
    _updated_at(),
    UniqueConstraint("app_id", "name"),
    _subset_of("data_capabilities", DATA_CAPABILITIES, "data_capabilities"),
    CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,63}$'", name="name"),
    CheckConstraint(f"octet_length(source) <= {MAX_SCRIPT_SOURCE_BYTES}", name="source_size"),
    CheckConstraint("version >= 1", name="version"),
    CheckConstraint("timeout_seconds BETWEEN 1 AND 300", name="timeout_seconds"),
    CheckConstraint("memory_limit_mb BETWEEN 16 AND 2048", name="memory_limit_mb"),
)

routes = Table(
    "routes",
    metadata,
    _id(),
    _app_id(),
    Column("method", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column(
        "script_id",
        UUID(as_uuid=True),
        ForeignKey("scripts.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    Column("registered_by", UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL")),
    _created_at(),
    # Added by migration 0002 (non-breaking: every existing route is sync).
    Column("dispatch_mode", Text, nullable=False, server_default=text("'sync'")),
    UniqueConstraint("app_id", "method", "path"),
    CheckConstraint("method ~ '^[A-Z]{1,16}$'", name="method"),
    CheckConstraint("path ~ '^/'", name="path"),
    _one_of("dispatch_mode", DISPATCH_MODES, "dispatch_mode"),
    Index("ix_routes_script_id", "script_id"),
)

kv_entries = Table(
    "kv_entries",
    metadata,
    _app_id(primary_key=True),
    Column("key", Text, primary_key=True),
    Column("value", JSONB, nullable=False),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    _created_at(),
    _updated_at(),
    CheckConstraint(f"octet_length(key) BETWEEN 1 AND {MAX_KV_KEY_BYTES}", name="key_size"),
    CheckConstraint("version >= 1", name="version"),
    # Prefix listing (`key LIKE 'prefix%'`) works under any collation with text_pattern_ops.
    Index(
        "ix_kv_entries_app_id_key_pattern",
        "app_id",
        "key",
        postgresql_ops={"key": "text_pattern_ops"},
    ),
)

documents = Table(
    "documents",
    metadata,
    _app_id(primary_key=True),
    Column("collection", Text, primary_key=True),
    Column("id", Text, primary_key=True),
    Column("data", JSONB, nullable=False),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    _created_at(),
    _updated_at(),
    CheckConstraint("collection ~ '^[A-Za-z0-9_-]{1,63}$'", name="collection"),
    CheckConstraint("char_length(id) BETWEEN 1 AND 128", name="id_length"),
    CheckConstraint("jsonb_typeof(data) = 'object'", name="data_object"),
    CheckConstraint("version >= 1", name="version"),
)

# An app's stored bytes (``manager_core.storage``): what the compactor folded in,
# plus the deltas every KV/document write appends in its own transaction (appends
# never conflict, so concurrent writers of one app do not serialize on a counter).
app_storage = Table(
    "app_storage",
    metadata,
    _app_id(primary_key=True),
    Column("bytes", BigInteger, nullable=False),
)

app_storage_deltas = Table(
    "app_storage_deltas",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    _app_id(),
    Column("bytes", BigInteger, nullable=False),
    Index("ix_app_storage_deltas_app_id", "app_id"),
)

triggers = Table(
    "triggers",
    metadata,
    _id(),
    _app_id(),
    Column("kind", Text, nullable=False),
    Column(
        "script_id",
        UUID(as_uuid=True),
        ForeignKey("scripts.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    # SET NULL: a vanished principal is detected (and failed cleanly) at dispatch time.
    Column(
        "registered_by_principal",
        UUID(as_uuid=True),
        ForeignKey("users.id", ondelete="SET NULL"),
    ),
    *_retry_columns(),
    _created_at(),
    # The literal prefix of a kv/docs trigger's glob (``glob_literal_prefix``), written
    # with the details row; NULL for dead-letter triggers. Matching a key of length L
    # probes the L+1 prefixes of the key through the index below (NULL rows are always
    # candidates), instead of scanning every trigger of the app.
    Column("match_prefix", Text),
    _one_of("kind", TRIGGER_KINDS, "kind"),
    Index("ix_triggers_app_id_kind_match_prefix", "app_id", "kind", "match_prefix"),
    Index("ix_triggers_script_id", "script_id"),
)


def _trigger_id() -> Column:
    return Column(
        "trigger_id",
        UUID(as_uuid=True),
        ForeignKey("triggers.id", ondelete="CASCADE"),
        primary_key=True,
    )


kv_trigger_details = Table(
    "kv_trigger_details",
    metadata,
    _trigger_id(),
    Column("key_glob", Text, nullable=False),
    Column("ops", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    CheckConstraint(f"char_length(key_glob) BETWEEN 1 AND {MAX_GLOB_CHARS}", name="key_glob"),
    _subset_of("ops", KV_OPS, "ops"),
)

docs_trigger_details = Table(
    "docs_trigger_details",
    metadata,
    _trigger_id(),
    Column("collection_glob", Text, nullable=False),
    Column("ops", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    CheckConstraint(
        f"char_length(collection_glob) BETWEEN 1 AND {MAX_GLOB_CHARS}", name="collection_glob"
    ),
    _subset_of("ops", DOCS_OPS, "ops"),
)

dead_letter_trigger_details = Table(
    "dead_letter_trigger_details",
    metadata,
    _trigger_id(),
    Column("source_kinds", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    _subset_of("source_kinds", OUTBOX_SOURCE_KINDS, "source_kinds"),
)

executions = Table(
    "executions",
    metadata,
    _id(),
    _app_id(),
    Column("source_kind", Text, nullable=False),
    Column("trigger_id", UUID(as_uuid=True), ForeignKey("triggers.id", ondelete="SET NULL")),
    Column("route_id", UUID(as_uuid=True), ForeignKey("routes.id", ondelete="SET NULL")),
    Column("script_id", UUID(as_uuid=True), ForeignKey("scripts.id", ondelete="SET NULL")),
    Column("status", Text, nullable=False, server_default=text("'queued'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("trigger_depth", Integer, nullable=False, server_default=text("0")),
    Column("error_kind", Text),
    Column("error_message", Text),
    # The script's own traceback (ExecError.traceback), for an uncaught exception only.
    Column("error_traceback", Text),
    Column("logs", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("result", JSONB),
    _created_at(),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    _one_of("source_kind", OUTBOX_SOURCE_KINDS, "source_kind"),
    _one_of("status", EXECUTION_STATUSES, "status"),
    CheckConstraint("attempts >= 0", name="attempts"),
    CheckConstraint("trigger_depth >= 0", name="trigger_depth"),
    # No index holds the status, so status updates can be heap-only (HOT); the listing
    # has its own index (ix_executions_app_id_created_at_id, below).
    Index("ix_executions_trigger_id", "trigger_id"),
    Index("ix_executions_route_id", "route_id"),
    Index("ix_executions_script_id", "script_id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "execution_id",
        UUID(as_uuid=True),
        ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    _app_id(),
    Column("source_kind", Text, nullable=False),
    # No foreign keys: the row must survive trigger/route/script deletion and fail cleanly.
    Column("trigger_id", UUID(as_uuid=True)),
    Column("route_id", UUID(as_uuid=True)),
    Column("script_id", UUID(as_uuid=True)),
    Column("payload", JSONB, nullable=False),
    Column("reply_to", UUID(as_uuid=True)),  # inbox id of a waiting sync HTTP caller
    Column("reply_node", Text),
    Column("is_dead_letter_handler", Boolean, nullable=False, server_default=text("false")),
    Column("dead_letter_id", UUID(as_uuid=True)),
    Column("trigger_depth", Integer, nullable=False, server_default=text("0")),
    Column("attempt_count", Integer, nullable=False, server_default=text("0")),
    *_retry_columns(),
    Column("run_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("claimed_by", Text),
    Column("claimed_until", DateTime(timezone=True)),
    _created_at(),
    _one_of("source_kind", OUTBOX_SOURCE_KINDS, "source_kind"),
    CheckConstraint("attempt_count >= 0", name="attempt_count"),
    CheckConstraint("trigger_depth >= 0", name="trigger_depth"),
    # Claims walk it app by app, each app's due rows oldest first (fair claims).
    Index(
        "ix_outbox_app_due",
        "app_id",
        "run_at",
        "id",
        postgresql_where=text("claimed_until IS NULL"),
    ),
    Index(
        "ix_outbox_leased",
        "claimed_until",
        postgresql_where=text("claimed_until IS NOT NULL"),
    ),
    Index("ix_outbox_execution_id", "execution_id"),
    Index("ix_outbox_app_id", "app_id"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    _id(),
    _app_id(),
    Column("execution_id", UUID(as_uuid=True), nullable=False),
    Column("source_kind", Text, nullable=False),
    Column("trigger_id", UUID(as_uuid=True)),
    Column("route_id", UUID(as_uuid=True)),
    Column("script_id", UUID(as_uuid=True)),
    Column("payload", JSONB, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("trigger_depth", Integer, nullable=False, server_default=text("0")),
    Column("error_kind", Text),
    Column("error_message", Text),
    # The script's own traceback (ExecError.traceback), for an uncaught exception only.
    Column("error_traceback", Text),
    Column("resolution", Text),
    Column("resolved_at", DateTime(timezone=True)),
    _created_at(),
    _one_of("source_kind", OUTBOX_SOURCE_KINDS, "source_kind"),
    _one_of("resolution", DEAD_LETTER_RESOLUTIONS, "resolution"),
    Index("ix_dead_letters_execution_id", "execution_id"),
)

# Newest-first keyset pagination: ORDER BY created_at DESC, id DESC.
Index(
    "ix_executions_app_id_created_at_id",
    executions.c.app_id,
    executions.c.created_at.desc(),
    executions.c.id.desc(),
)
Index(
    "ix_dead_letters_app_id_created_at_id",
    dead_letters.c.app_id,
    dead_letters.c.created_at.desc(),
    dead_letters.c.id.desc(),
)

abandoned_executions = Table(
    "abandoned_executions",
    metadata,
    Column("execution_id", UUID(as_uuid=True), primary_key=True),
    _app_id(),
    Column("inbox_id", UUID(as_uuid=True), nullable=False),
    Column("reason", Text, nullable=False),
    Column("result", JSONB),
    _created_at(),
    Index("ix_abandoned_executions_app_id", "app_id"),
)

"""Initial schema: users, apps, scripts, routes, data stores, Layout-E triggers, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 21:00:14.238880
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column(
            "is_instance_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "octet_length(token_hash) = 32", name=op.f("ck_users_token_hash_sha256")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_users_token_hash")),
    )
    op.create_table(
        "apps",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("name ~ '^[a-z0-9-]{1,63}$'", name=op.f("ck_apps_name")),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_apps_created_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apps")),
        sa.UniqueConstraint("name", name=op.f("uq_apps_name")),
    )
    op.create_table(
        "abandoned_executions",
        sa.Column("execution_id", sa.UUID(), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("inbox_id", sa.UUID(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_abandoned_executions_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", name=op.f("pk_abandoned_executions")),
    )
    op.create_index(
        "ix_abandoned_executions_app_id", "abandoned_executions", ["app_id"], unique=False
    )
    op.create_table(
        "app_members",
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column(
            "capabilities",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "capabilities <@ ARRAY['app_read', 'app_delete', 'app_manage_members', "
            "'app_manage_scripts', 'app_manage_routes', 'app_manage_triggers', "
            "'app_write_data', 'app_read_data', 'app_manage_dead_letters']::text[]",
            name=op.f("ck_app_members_capabilities"),
        ),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_app_members_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_app_members_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("app_id", "user_id", name=op.f("pk_app_members")),
    )
    op.create_index("ix_app_members_user_id", "app_members", ["user_id"], unique=False)
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("execution_id", sa.UUID(), nullable=False),
        sa.Column("source_kind", sa.Text(), nullable=False),
        sa.Column("trigger_id", sa.UUID(), nullable=True),
        sa.Column("route_id", sa.UUID(), nullable=True),
        sa.Column("script_id", sa.UUID(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("trigger_depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error_kind", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "resolution IN ('handled', 'handler_failed', 'resolved', 'replayed')",
            name=op.f("ck_dead_letters_resolution"),
        ),
        sa.CheckConstraint(
            "source_kind IN ('kv', 'docs', 'dead_letter', 'http')",
            name=op.f("ck_dead_letters_source_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_dead_letters_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        "ix_dead_letters_app_id_created_at_id",
        "dead_letters",
        ["app_id", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index("ix_dead_letters_execution_id", "dead_letters", ["execution_id"], unique=False)
    op.create_table(
        "documents",
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("collection", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "collection ~ '^[A-Za-z0-9_-]{1,63}$'", name=op.f("ck_documents_collection")
        ),
        sa.CheckConstraint("jsonb_typeof(data) = 'object'", name=op.f("ck_documents_data_object")),
        sa.CheckConstraint(
            "char_length(id) BETWEEN 1 AND 128", name=op.f("ck_documents_id_length")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_documents_version")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_documents_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("app_id", "collection", "id", name=op.f("pk_documents")),
    )
    op.create_table(
        "kv_entries",
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "octet_length(key) BETWEEN 1 AND 512", name=op.f("ck_kv_entries_key_size")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_kv_entries_version")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_kv_entries_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("app_id", "key", name=op.f("pk_kv_entries")),
    )
    op.create_index(
        "ix_kv_entries_app_id_key_pattern",
        "kv_entries",
        ["app_id", "key"],
        unique=False,
        postgresql_ops={"key": "text_pattern_ops"},
    )
    op.create_table(
        "scripts",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), server_default=sa.text("10"), nullable=False),
        sa.Column("memory_limit_mb", sa.Integer(), server_default=sa.text("128"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("name ~ '^[A-Za-z0-9_-]{1,63}$'", name=op.f("ck_scripts_name")),
        sa.CheckConstraint(
            "memory_limit_mb BETWEEN 16 AND 2048", name=op.f("ck_scripts_memory_limit_mb")
        ),
        sa.CheckConstraint("octet_length(source) <= 262144", name=op.f("ck_scripts_source_size")),
        sa.CheckConstraint(
            "timeout_seconds BETWEEN 1 AND 300", name=op.f("ck_scripts_timeout_seconds")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_scripts_version")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_scripts_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scripts")),
        sa.UniqueConstraint("app_id", "name", name=op.f("uq_scripts_app_id_name")),
    )
    op.create_table(
        "routes",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("script_id", sa.UUID(), nullable=False),
        sa.Column("registered_by", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("method ~ '^[A-Z]{1,16}$'", name=op.f("ck_routes_method")),
        sa.CheckConstraint("path ~ '^/'", name=op.f("ck_routes_path")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_routes_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["registered_by"],
            ["users.id"],
            name=op.f("fk_routes_registered_by_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["script_id"],
            ["scripts.id"],
            name=op.f("fk_routes_script_id_scripts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routes")),
        sa.UniqueConstraint("app_id", "method", "path", name=op.f("uq_routes_app_id_method_path")),
    )
    op.create_index("ix_routes_script_id", "routes", ["script_id"], unique=False)
    op.create_table(
        "triggers",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("script_id", sa.UUID(), nullable=False),
        sa.Column("registered_by_principal", sa.UUID(), nullable=True),
        sa.Column(
            "retry_backoff", sa.Text(), server_default=sa.text("'exponential'"), nullable=False
        ),
        sa.Column(
            "retry_base_delay_ms", sa.Integer(), server_default=sa.text("1000"), nullable=False
        ),
        sa.Column(
            "retry_max_delay_ms", sa.Integer(), server_default=sa.text("300000"), nullable=False
        ),
        sa.Column("retry_max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("retry_jitter", sa.Double(), server_default=sa.text("0.2"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("match_prefix", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('kv', 'docs', 'dead_letter')", name=op.f("ck_triggers_kind")),
        sa.CheckConstraint(
            "retry_backoff IN ('exponential', 'linear', 'constant')",
            name=op.f("ck_triggers_retry_backoff"),
        ),
        sa.CheckConstraint(
            "retry_base_delay_ms >= 0", name=op.f("ck_triggers_retry_base_delay_ms")
        ),
        sa.CheckConstraint(
            "retry_jitter >= 0 AND retry_jitter <= 1", name=op.f("ck_triggers_retry_jitter")
        ),
        sa.CheckConstraint(
            "retry_max_attempts BETWEEN 1 AND 100", name=op.f("ck_triggers_retry_max_attempts")
        ),
        sa.CheckConstraint(
            "retry_max_delay_ms >= retry_base_delay_ms", name=op.f("ck_triggers_retry_max_delay_ms")
        ),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_triggers_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["registered_by_principal"],
            ["users.id"],
            name=op.f("fk_triggers_registered_by_principal_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["script_id"],
            ["scripts.id"],
            name=op.f("fk_triggers_script_id_scripts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triggers")),
    )
    op.create_index(
        "ix_triggers_app_id_kind_match_prefix",
        "triggers",
        ["app_id", "kind", "match_prefix"],
        unique=False,
    )
    op.create_index("ix_triggers_script_id", "triggers", ["script_id"], unique=False)
    op.create_table(
        "dead_letter_trigger_details",
        sa.Column("trigger_id", sa.UUID(), nullable=False),
        sa.Column(
            "source_kinds",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "source_kinds <@ ARRAY['kv', 'docs', 'dead_letter', 'http']::text[]",
            name=op.f("ck_dead_letter_trigger_details_source_kinds"),
        ),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name=op.f("fk_dead_letter_trigger_details_trigger_id_triggers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trigger_id", name=op.f("pk_dead_letter_trigger_details")),
    )
    op.create_table(
        "docs_trigger_details",
        sa.Column("trigger_id", sa.UUID(), nullable=False),
        sa.Column("collection_glob", sa.Text(), nullable=False),
        sa.Column(
            "ops",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "ops <@ ARRAY['insert', 'update', 'delete']::text[]",
            name=op.f("ck_docs_trigger_details_ops"),
        ),
        sa.CheckConstraint(
            "char_length(collection_glob) BETWEEN 1 AND 256",
            name=op.f("ck_docs_trigger_details_collection_glob"),
        ),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name=op.f("fk_docs_trigger_details_trigger_id_triggers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trigger_id", name=op.f("pk_docs_trigger_details")),
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("source_kind", sa.Text(), nullable=False),
        sa.Column("trigger_id", sa.UUID(), nullable=True),
        sa.Column("route_id", sa.UUID(), nullable=True),
        sa.Column("script_id", sa.UUID(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("trigger_depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error_kind", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "logs",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "source_kind IN ('kv', 'docs', 'dead_letter', 'http')",
            name=op.f("ck_executions_source_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'retrying', 'succeeded', 'failed', "
            "'dead_lettered', 'skipped')",
            name=op.f("ck_executions_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_executions_attempts")),
        sa.CheckConstraint("trigger_depth >= 0", name=op.f("ck_executions_trigger_depth")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_executions_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["route_id"],
            ["routes.id"],
            name=op.f("fk_executions_route_id_routes"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["script_id"],
            ["scripts.id"],
            name=op.f("fk_executions_script_id_scripts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name=op.f("fk_executions_trigger_id_triggers"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
    )
    op.create_index(
        "ix_executions_app_id_created_at_id",
        "executions",
        ["app_id", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index("ix_executions_app_id_status", "executions", ["app_id", "status"], unique=False)
    op.create_index("ix_executions_route_id", "executions", ["route_id"], unique=False)
    op.create_index("ix_executions_script_id", "executions", ["script_id"], unique=False)
    op.create_index("ix_executions_trigger_id", "executions", ["trigger_id"], unique=False)
    op.create_table(
        "kv_trigger_details",
        sa.Column("trigger_id", sa.UUID(), nullable=False),
        sa.Column("key_glob", sa.Text(), nullable=False),
        sa.Column(
            "ops",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "ops <@ ARRAY['set', 'delete']::text[]", name=op.f("ck_kv_trigger_details_ops")
        ),
        sa.CheckConstraint(
            "char_length(key_glob) BETWEEN 1 AND 256", name=op.f("ck_kv_trigger_details_key_glob")
        ),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name=op.f("fk_kv_trigger_details_trigger_id_triggers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trigger_id", name=op.f("pk_kv_trigger_details")),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("execution_id", sa.UUID(), nullable=False),
        sa.Column("app_id", sa.UUID(), nullable=False),
        sa.Column("source_kind", sa.Text(), nullable=False),
        sa.Column("trigger_id", sa.UUID(), nullable=True),
        sa.Column("route_id", sa.UUID(), nullable=True),
        sa.Column("script_id", sa.UUID(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("reply_to", sa.UUID(), nullable=True),
        sa.Column("reply_node", sa.Text(), nullable=True),
        sa.Column(
            "is_dead_letter_handler", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("dead_letter_id", sa.UUID(), nullable=True),
        sa.Column("trigger_depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempt_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "retry_backoff", sa.Text(), server_default=sa.text("'exponential'"), nullable=False
        ),
        sa.Column(
            "retry_base_delay_ms", sa.Integer(), server_default=sa.text("1000"), nullable=False
        ),
        sa.Column(
            "retry_max_delay_ms", sa.Integer(), server_default=sa.text("300000"), nullable=False
        ),
        sa.Column("retry_max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("retry_jitter", sa.Double(), server_default=sa.text("0.2"), nullable=False),
        sa.Column(
            "run_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "retry_backoff IN ('exponential', 'linear', 'constant')",
            name=op.f("ck_outbox_retry_backoff"),
        ),
        sa.CheckConstraint(
            "source_kind IN ('kv', 'docs', 'dead_letter', 'http')",
            name=op.f("ck_outbox_source_kind"),
        ),
        sa.CheckConstraint("attempt_count >= 0", name=op.f("ck_outbox_attempt_count")),
        sa.CheckConstraint("retry_base_delay_ms >= 0", name=op.f("ck_outbox_retry_base_delay_ms")),
        sa.CheckConstraint(
            "retry_jitter >= 0 AND retry_jitter <= 1", name=op.f("ck_outbox_retry_jitter")
        ),
        sa.CheckConstraint(
            "retry_max_attempts BETWEEN 1 AND 100", name=op.f("ck_outbox_retry_max_attempts")
        ),
        sa.CheckConstraint(
            "retry_max_delay_ms >= retry_base_delay_ms", name=op.f("ck_outbox_retry_max_delay_ms")
        ),
        sa.CheckConstraint("trigger_depth >= 0", name=op.f("ck_outbox_trigger_depth")),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_outbox_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_outbox_execution_id_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index("ix_outbox_app_id", "outbox", ["app_id"], unique=False)
    op.create_index(
        "ix_outbox_due",
        "outbox",
        ["run_at", "id"],
        unique=False,
        postgresql_where=sa.text("claimed_until IS NULL"),
    )
    op.create_index("ix_outbox_execution_id", "outbox", ["execution_id"], unique=False)
    op.create_index(
        "ix_outbox_leased",
        "outbox",
        ["claimed_until"],
        unique=False,
        postgresql_where=sa.text("claimed_until IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("kv_trigger_details")
    op.drop_table("executions")
    op.drop_table("docs_trigger_details")
    op.drop_table("dead_letter_trigger_details")
    op.drop_table("triggers")
    op.drop_table("routes")
    op.drop_table("scripts")
    op.drop_table("kv_entries")
    op.drop_table("documents")
    op.drop_table("dead_letters")
    op.drop_table("app_members")
    op.drop_table("abandoned_executions")
    op.drop_table("apps")
    op.drop_table("users")

"""Settings.from_env: defaults, every PICLOUD_* variable, and clear errors."""

from __future__ import annotations

from pathlib import Path

import attrs
import platformdirs
import pytest

from picloud.settings import Settings


def test_defaults_when_environment_is_empty() -> None:
    """Without PICLOUD_* variables every setting has its documented default."""
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.data_dir == Path(platformdirs.user_data_dir("picloud"))
    assert settings.embedded_pg_dir == settings.data_dir / "pg"
    assert settings.admin_token is None
    assert settings.max_concurrent_executions == 16
    assert settings.max_trigger_depth == 8
    assert settings.dispatch_poll_interval_ms == 100
    assert settings.dispatch_batch_size == 64
    assert settings.executor_max_workers == 8
    assert settings.executor_max_executions_per_worker == 1000
    assert settings.executor_idle_ttl_seconds == 300
    assert settings.db_pool_size == 20
    assert settings.execution_retention_days == 14
    assert settings.app_storage_quota_mb == 1024
    assert settings.app_storage_quota_bytes == 1024 * 1024 * 1024
    assert settings.embedded_pg_restarts == 5
    assert settings.max_queued_executions_per_app == 10_000
    assert settings.lease_seconds == 60
    assert settings.access_log is False


def test_every_variable_is_read() -> None:
    """Each PICLOUD_* variable sets its field."""
    settings = Settings.from_env(
        {
            "PICLOUD_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/picloud",
            "PICLOUD_HOST": "0.0.0.0",
            "PICLOUD_PORT": "9000",
            "PICLOUD_DATA_DIR": "/srv/picloud",
            "PICLOUD_ADMIN_TOKEN": "s3cret-s3cret-s3cret",
            "PICLOUD_MAX_CONCURRENT_EXECUTIONS": "4",
            "PICLOUD_MAX_CONNECTIONS": "50",
            "PICLOUD_SYNC_ADMISSION_WAIT_MS": "0",
            "PICLOUD_MAX_TRIGGER_DEPTH": "3",
            "PICLOUD_DISPATCH_POLL_INTERVAL_MS": "250",
            "PICLOUD_DISPATCH_BATCH_SIZE": "10",
            "PICLOUD_EXECUTOR_MAX_WORKERS": "2",
            "PICLOUD_EXECUTOR_MAX_EXECUTIONS_PER_WORKER": "50",
            "PICLOUD_EXECUTOR_IDLE_TTL_SECONDS": "60",
            "PICLOUD_DB_POOL_SIZE": "5",
            "PICLOUD_DB_OUTBOX_POOL_SIZE": "3",
            "PICLOUD_EXECUTION_RETENTION_DAYS": "30",
            "PICLOUD_APP_STORAGE_QUOTA_MB": "64",
            "PICLOUD_EMBEDDED_PG_RESTARTS": "0",
            "PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP": "0",
            "PICLOUD_LEASE_SECONDS": "15",
            "PICLOUD_ACCESS_LOG": "on",
            "UNRELATED": "ignored",
        }
    )
    assert settings == Settings(
        database_url="postgresql+psycopg://u:p@db:5432/picloud",
        host="0.0.0.0",
        port=9000,
        data_dir=Path("/srv/picloud"),
        admin_token="s3cret-s3cret-s3cret",
        max_concurrent_executions=4,
        max_connections=50,
        sync_admission_wait_ms=0,
        max_trigger_depth=3,
        dispatch_poll_interval_ms=250,
        dispatch_batch_size=10,
        executor_max_workers=2,
        executor_max_executions_per_worker=50,
        executor_idle_ttl_seconds=60,
        db_pool_size=5,
        db_outbox_pool_size=3,
        execution_retention_days=30,
        app_storage_quota_mb=64,
        embedded_pg_restarts=0,
        max_queued_executions_per_app=0,
        lease_seconds=15,
        access_log=True,
    )


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgres_urls_use_psycopg(scheme: str) -> None:
    """A plain postgresql:// URL is read as postgresql+psycopg://."""
    settings = Settings.from_env({"PICLOUD_DATABASE_URL": f"{scheme}://u@h/db"})
    assert settings.database_url == "postgresql+psycopg://u@h/db"


def test_empty_variables_keep_defaults() -> None:
    """An empty variable counts as unset."""
    assert Settings.from_env({"PICLOUD_PORT": "", "PICLOUD_DATABASE_URL": " "}) == Settings(
        data_dir=Settings.from_env({}).data_dir
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PICLOUD_PORT", "http"),
        ("PICLOUD_PORT", "70000"),
        ("PICLOUD_MAX_CONCURRENT_EXECUTIONS", "0"),
        ("PICLOUD_MAX_TRIGGER_DEPTH", "-1"),
        ("PICLOUD_DISPATCH_POLL_INTERVAL_MS", "1.5"),
        ("PICLOUD_DISPATCH_BATCH_SIZE", "many"),
        ("PICLOUD_EXECUTOR_MAX_WORKERS", "-2"),
        ("PICLOUD_EXECUTOR_MAX_EXECUTIONS_PER_WORKER", "0"),
        ("PICLOUD_EXECUTOR_IDLE_TTL_SECONDS", "x"),
        ("PICLOUD_DB_POOL_SIZE", "0"),
        ("PICLOUD_SYNC_ADMISSION_WAIT_MS", "-1"),
        ("PICLOUD_DB_OUTBOX_POOL_SIZE", "0"),
        ("PICLOUD_DATABASE_URL", "mysql://u@h/db"),
        ("PICLOUD_EXECUTION_RETENTION_DAYS", "-1"),
        ("PICLOUD_EXECUTION_RETENTION_DAYS", "36501"),
        ("PICLOUD_EXECUTION_RETENTION_DAYS", "1.5"),
        ("PICLOUD_APP_STORAGE_QUOTA_MB", "-1"),
        ("PICLOUD_APP_STORAGE_QUOTA_MB", "1.5"),
        ("PICLOUD_APP_STORAGE_QUOTA_MB", "lots"),
        ("PICLOUD_APP_STORAGE_QUOTA_MB", str(1024**3 + 1)),
        ("PICLOUD_MAX_CONCURRENT_EXECUTIONS", "1_0"),
        ("PICLOUD_PORT", "+80"),
        ("PICLOUD_MAX_TRIGGER_DEPTH", "\uff18"),  # a full-width 8
        ("PICLOUD_DB_POOL_SIZE", "\u0661\u0662"),  # Arabic-Indic 12
        ("PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP", "-1"),
        ("PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP", "10000001"),
        ("PICLOUD_ACCESS_LOG", "maybe"),
        ("PICLOUD_ACCESS_LOG", "2"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    """An invalid value raises ValueError naming the variable and the value."""
    with pytest.raises(ValueError, match=variable) as info:
        Settings.from_env({variable: value})
    assert repr(value) in str(info.value)


def test_numbers_may_have_spaces_around_them() -> None:
    """What an env file's stray space adds is not a new number: ``" 8 "`` is 8."""
    assert Settings.from_env({"PICLOUD_MAX_TRIGGER_DEPTH": " 8 "}).max_trigger_depth == 8


def test_a_short_admin_token_is_refused_without_showing_it() -> None:
    """PICLOUD_ADMIN_TOKEN must have 16 characters (what the database would refuse
    after starting and migrating it); the error does not echo the would-be secret."""
    with pytest.raises(ValueError, match="at least 16 characters") as info:
        Settings.from_env({"PICLOUD_ADMIN_TOKEN": "fifteen-chars!!"})
    assert "fifteen" not in str(info.value)
    assert Settings.from_env({"PICLOUD_ADMIN_TOKEN": "sixteen-chars!!!"}).admin_token


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after construction."""
    settings = Settings.from_env({})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_from_env_reads_only_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env never falls back to os.environ."""
    monkeypatch.setenv("PICLOUD_PORT", "1234")
    assert Settings.from_env({}).port == 8080


@pytest.mark.parametrize(("raw", "days"), [("0", 0), ("1", 1), ("36500", 36500)])
def test_retention_days_at_its_edges(raw: str, days: int) -> None:
    """0 (keep for ever) up to 36500 days are accepted."""
    assert (
        Settings.from_env({"PICLOUD_EXECUTION_RETENTION_DAYS": raw}).execution_retention_days
        == days
    )


@pytest.mark.parametrize(
    ("raw", "quota"), [("0", None), ("1", 1024 * 1024), ("2048", 2048 * 1024 * 1024)]
)
def test_app_storage_quota_in_bytes_and_zero_is_unlimited(raw: str, quota: int | None) -> None:
    """PICLOUD_APP_STORAGE_QUOTA_MB is MiB; 0 means no quota."""
    settings = Settings.from_env({"PICLOUD_APP_STORAGE_QUOTA_MB": raw})
    assert settings.app_storage_quota_mb == int(raw)
    assert settings.app_storage_quota_bytes == quota


BOUNDS = [
    ("PICLOUD_MAX_CONCURRENT_EXECUTIONS", "max_concurrent_executions", 1024),
    ("PICLOUD_MAX_CONNECTIONS", "max_connections", 65536),
    ("PICLOUD_SYNC_ADMISSION_WAIT_MS", "sync_admission_wait_ms", 300_000),
    ("PICLOUD_MAX_TRIGGER_DEPTH", "max_trigger_depth", 100),
    ("PICLOUD_DISPATCH_POLL_INTERVAL_MS", "dispatch_poll_interval_ms", 60_000),
    ("PICLOUD_DISPATCH_BATCH_SIZE", "dispatch_batch_size", 1024),
    ("PICLOUD_EXECUTOR_MAX_WORKERS", "executor_max_workers", 1024),
    ("PICLOUD_EXECUTOR_MAX_EXECUTIONS_PER_WORKER", "executor_max_executions_per_worker", 10**6),
    ("PICLOUD_EXECUTOR_IDLE_TTL_SECONDS", "executor_idle_ttl_seconds", 86400),
    ("PICLOUD_EXECUTION_RETENTION_DAYS", "execution_retention_days", 36500),
    ("PICLOUD_APP_STORAGE_QUOTA_MB", "app_storage_quota_mb", 1024**3),
    ("PICLOUD_MAX_QUEUED_EXECUTIONS_PER_APP", "max_queued_executions_per_app", 10_000_000),
    ("PICLOUD_LEASE_SECONDS", "lease_seconds", 3600),
    ("PICLOUD_EMBEDDED_PG_RESTARTS", "embedded_pg_restarts", 100),
    ("PICLOUD_DB_POOL_SIZE", "db_pool_size", 100),
    ("PICLOUD_DB_OUTBOX_POOL_SIZE", "db_outbox_pool_size", 100),
]
# The pools and the gate of a node on the embedded PostgreSQL must fit in it together
# (tests/app/test_settings_bounds.py); alone, each bound holds for any server.
EXTERNAL = {"PICLOUD_DATABASE_URL": "postgresql://u@db.example/picloud"}


def test_every_numeric_setting_has_a_bound() -> None:
    """Each integer setting is in BOUNDS (a new one needs its bound too)."""
    numeric = {f.name for f in attrs.fields(Settings) if f.type in (int, "int")} - {"port"}
    assert numeric == {field for _, field, _ in BOUNDS}


@pytest.mark.parametrize(("variable", "field", "bound"), BOUNDS)
def test_each_bound_at_its_edge(variable: str, field: str, bound: int) -> None:
    """The bound itself is accepted; one more is refused, saying the bound."""
    settings = Settings.from_env({**EXTERNAL, variable: str(bound)})
    assert getattr(settings, field) == bound
    with pytest.raises(ValueError, match=f"must be at most {bound}") as info:
        Settings.from_env({**EXTERNAL, variable: str(bound + 1)})
    assert str(info.value).startswith(f"{variable}='{bound + 1}': ")
    with pytest.raises(ValueError, match=f"must be at most {bound}"):
        Settings.from_env({**EXTERNAL, variable: "99999999999999999999"})


@pytest.mark.parametrize(
    ("raw", "on"),
    [("on", True), ("OFF", False), (" true ", True), ("False", False), ("1", True), ("0", False)],
)
def test_access_log_is_a_switch(raw: str, on: bool) -> None:
    """PICLOUD_ACCESS_LOG takes on/off, true/false or 1/0, in any case."""
    assert Settings.from_env({"PICLOUD_ACCESS_LOG": raw}).access_log is on


def test_a_lease_is_at_least_three_seconds() -> None:
    """Shorter, a node's pauses would hand rows it still runs to another node."""
    assert Settings.from_env({"PICLOUD_LEASE_SECONDS": "3"}).lease_seconds == 3
    with pytest.raises(ValueError, match=r"^PICLOUD_LEASE_SECONDS='2': must be at least 3$"):
        Settings.from_env({"PICLOUD_LEASE_SECONDS": "2"})

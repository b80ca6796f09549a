"""Settings past their bounds are refused with the settings, before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor_core.uids import SEARCH_SPAN
from picloud import migrations, settings
from picloud.settings import Settings

PICLOUD = Path(sys.executable).parent / "picloud"
EXTERNAL = {"PICLOUD_DATABASE_URL": "postgresql://u@db.example/picloud"}


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    data_dir = tmp_path / "data"
    return subprocess.run(
        [str(PICLOUD), "serve", "--port", "0", "--data-dir", str(data_dir)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PICLOUD_MAX_CONCURRENT_EXECUTIONS", "99999999999999999999"),
        ("PICLOUD_MAX_CONCURRENT_EXECUTIONS", "10000000"),
        ("PICLOUD_EXECUTOR_MAX_WORKERS", "999999"),
        ("PICLOUD_DB_POOL_SIZE", "999999"),
    ],
)
def test_serve_refuses_a_huge_setting_before_starting_anything(
    tmp_path: Path, variable: str, value: str
) -> None:
    """picloud serve with a value past its bound exits 2 at once with one line naming
    it: no PostgreSQL started, no runner tasks, no hang (it used to hang or fail late)."""
    result = _serve(tmp_path, **{variable: value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"picloud: {variable}='{value}': must be at most ")
    assert not (tmp_path / "data").exists()


def test_the_worker_bound_fits_the_uid_range() -> None:
    """Every worker of a pool at the bound gets its own uid out of the shared range,
    with room left for other pools on the machine."""
    assert settings.MAX_EXECUTOR_WORKERS * 4 <= SEARCH_SPAN


def test_the_embedded_connection_budget_fits_its_server() -> None:
    """The embedded PostgreSQL runs with PostgreSQL's default max_connections (100;
    embedded_pg sets none outside the tests): a node's budget leaves room under it,
    and the defaults fit in it."""
    assert settings.EMBEDDED_PG_CONNECTIONS < 100
    assert settings.MAX_DB_POOL_SIZE <= 100
    assert settings.MAX_DB_OUTBOX_POOL_SIZE <= 100
    assert Settings().database_connections <= settings.EMBEDDED_PG_CONNECTIONS


@pytest.mark.parametrize(
    ("env", "allowed"),
    [
        ({"PICLOUD_MAX_CONCURRENT_EXECUTIONS": "58"}, True),  # 20 + 58 + 4 + 8 = 90
        ({"PICLOUD_MAX_CONCURRENT_EXECUTIONS": "59"}, False),
        ({"PICLOUD_DB_POOL_SIZE": "62"}, True),  # 62 + 16 + 4 + 8 = 90
        ({"PICLOUD_DB_POOL_SIZE": "63"}, False),
        ({"PICLOUD_DB_OUTBOX_POOL_SIZE": "50"}, True),  # 20 + 16 + 4 + 50 = 90
        ({"PICLOUD_DB_OUTBOX_POOL_SIZE": "51"}, False),
    ],
)
def test_the_embedded_server_takes_the_connections_a_node_may_open(
    env: dict[str, str], allowed: bool
) -> None:
    """Without PICLOUD_DATABASE_URL, the pools and the gate together must fit in the
    embedded PostgreSQL's connections; with it, only each bound applies."""
    if allowed:
        assert Settings.from_env(env).database_connections == 90
    else:
        with pytest.raises(ValueError, match="embedded PostgreSQL takes at most 90") as info:
            Settings.from_env(env)
        assert "PICLOUD_DATABASE_URL" in str(info.value)
        assert "\n" not in str(info.value)
    Settings.from_env({**env, **EXTERNAL})


def test_a_database_url_is_shown_without_its_password() -> None:
    """An invalid PICLOUD_DATABASE_URL is echoed with *** for its password, in the
    user:password@ part or as a password= parameter."""
    for raw, shown in [
        (
            "mysql://dbuser:S3cretPassw0rd@db.example:3306/x",
            "mysql://dbuser:***@db.example:3306/x",
        ),
        ("mysql://dbuser:p@ss:w/rd@db.example/x", "mysql://dbuser:***@db.example/x"),
        (
            "mysql://db.example/x?user=u&password=S3cretPassw0rd",
            "mysql://db.example/x?user=u&password=***",
        ),
        ("host=db password=S3cretPassw0rd", "host=db password=***"),
        ("mysql://dbuser@db.example/x", "mysql://dbuser@db.example/x"),
    ]:
        with pytest.raises(ValueError, match="must be a postgresql://") as info:
            Settings.from_env({"PICLOUD_DATABASE_URL": raw})
        assert str(info.value).startswith(f"PICLOUD_DATABASE_URL={shown!r}: ")
        assert "S3cret" not in str(info.value)


def test_serve_does_not_echo_a_bad_database_urls_password(tmp_path: Path) -> None:
    """The audit's repro: the one error line masks the password."""
    url = "mysql://dbuser:S3cretPassw0rd@db.example:3306/x"
    result = _serve(tmp_path, PICLOUD_DATABASE_URL=url)
    assert result.returncode == 2
    assert "S3cret" not in result.stderr
    assert "dbuser:***@db.example" in result.stderr


def test_unknown_picloud_variables_are_named_not_their_values() -> None:
    """Unknown PICLOUD_* names (typos) are collected, sorted; the warning names them,
    never their values. Variables read elsewhere are not unknown."""
    found = Settings.from_env(
        {
            "PICLOUD_MAX_WORKERS": "4",
            "PICLOUD_PROT": "9000",
            "PICLOUD_PORT": "9001",
            "PICLOUD_ALEMBIC_DIR": "/srv/alembic",
            "PICLOUD_TEST_DATABASE_URL": "postgresql://u:p@h/db",
            "PICLOUD_TEST_WORKERS": "4",
            "PICLOUD_EMBEDDED_PG_RESTARTS": "2",
            "OTHER_MAX_WORKERS": "1",
        }
    )
    assert found.unknown == ("PICLOUD_MAX_WORKERS", "PICLOUD_PROT")
    warning = found.unknown_warning()
    assert warning is not None
    assert "\n" not in warning
    assert "PICLOUD_MAX_WORKERS, PICLOUD_PROT" in warning
    assert "9000" not in warning
    assert Settings.from_env({"PICLOUD_PORT": "1"}).unknown == ()
    assert Settings.from_env({"PICLOUD_PORT": "1"}).unknown_warning() is None


def test_the_variables_read_elsewhere_are_the_ones_settings_spares() -> None:
    """migrations reads PICLOUD_ALEMBIC_DIR itself; settings knows it."""
    assert migrations.ALEMBIC_DIR_ENV in settings.OTHER_VARIABLES

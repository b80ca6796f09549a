"""`picloud migrate` as users run it: a subprocess of the installed entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, pool, text

from picloud import migrations
from picloud.embedded_pg import EmbeddedPostgres

PICLOUD = Path(sys.executable).parent / "picloud"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    return subprocess.run(
        [str(PICLOUD), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _version(url: str) -> str | None:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def test_migrate_database_url(empty_db_url: str) -> None:
    """With PICLOUD_DATABASE_URL, `picloud migrate` brings that database to head."""
    result = _run("migrate", PICLOUD_DATABASE_URL=empty_db_url)
    assert result.returncode == 0, result.stderr
    assert (_version(empty_db_url),) == migrations.heads()
    again = _run("migrate", PICLOUD_DATABASE_URL=empty_db_url)
    assert again.returncode == 0, again.stderr


def test_migrate_embedded(pg_data_dir: Path) -> None:
    """Without a URL, it starts the embedded server in DATA_DIR/pg, migrates, stops."""
    result = _run("migrate", PICLOUD_DATA_DIR=str(pg_data_dir))
    assert result.returncode == 0, result.stderr
    assert (pg_data_dir / "pg" / "PG_VERSION").exists()
    assert not (pg_data_dir / "pg" / "postmaster.pid").exists(), "server left running"
    with EmbeddedPostgres(pg_data_dir / "pg") as pg:
        assert (_version(pg.url("picloud")),) == migrations.heads()


def test_invalid_setting_exits_2_naming_the_variable() -> None:
    """A bad PICLOUD_* value is reported, not a traceback."""
    result = _run("migrate", PICLOUD_DB_POOL_SIZE="lots")
    assert result.returncode == 2
    assert "PICLOUD_DB_POOL_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_is_the_installed_package_version() -> None:
    """`picloud --version` prints the version pyproject.toml declares, and touches no
    database."""
    import tomllib

    declared = tomllib.loads(
        (Path(__file__).parents[2] / "packages/picloud/pyproject.toml").read_text()
    )["project"]["version"]
    done = _run("--version", PICLOUD_DATABASE_URL="postgresql://nobody@nowhere.invalid/x")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"picloud {declared}\n", "")

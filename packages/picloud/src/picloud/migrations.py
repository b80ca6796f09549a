"""Run picloud's alembic migrations programmatically.

The migration scripts live in the repository root's ``alembic/`` directory (next to
``alembic.ini``); ``PICLOUD_ALEMBIC_DIR`` overrides where to find them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

__all__ = ["alembic_config", "alembic_dir", "downgrade", "heads", "upgrade"]

ALEMBIC_DIR_ENV = "PICLOUD_ALEMBIC_DIR"


class AlembicDirNotFoundError(FileNotFoundError):
    """The alembic migrations directory could not be found; set PICLOUD_ALEMBIC_DIR."""


def alembic_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding ``env.py`` and ``versions/``."""
    env = os.environ if environ is None else environ
    override = env.get(ALEMBIC_DIR_ENV)
    if override:
        path = Path(override)
        if not (path / "env.py").is_file():
            raise AlembicDirNotFoundError(f"{ALEMBIC_DIR_ENV}={override} has no env.py")
        return path
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "alembic"
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise AlembicDirNotFoundError(AlembicDirNotFoundError.__doc__)


def alembic_config(environ: Mapping[str, str] | None = None) -> Config:
    """An alembic ``Config`` pointing at our scripts (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(alembic_dir(environ)))
    return config


def heads() -> tuple[str, ...]:
    """The head revision(s) of the migration scripts."""
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def _normalise(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _run(url: str, action: str, revision: str) -> None:
    config = alembic_config()
    engine = create_engine(_normalise(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (in one transaction)."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops everything)."""
    _run(url, "downgrade", revision)

"""`picloud admin delete-user` and `rotate-token` as operators run them (a subprocess of
the installed entry point), what the next start does with the bootstrap `admin`, and
`picloud admin` refusing a data directory that holds no database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from manager_core import tables as t
from manager_core.db import make_engine
from manager_core.postgres.users import PostgresUserRepo
from picloud.runtime import ADMIN_NAME, StartupError, bootstrap_admin
from picloud.settings import Settings
from tests.app.tokens import token_holder

PICLOUD = Path(sys.executable).parent / "picloud"
ADMIN_TOKEN = "bootstrap-admin-token-0123456789"


def _admin(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``picloud admin ARGS`` on ``db_url``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    return subprocess.run(
        [str(PICLOUD), "admin", *args],
        env={**clean, "PICLOUD_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _admin_on_data_dir(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``picloud admin ARGS --data-dir DATA_DIR``, no ``PICLOUD_DATABASE_URL``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    return subprocess.run(
        [str(PICLOUD), "admin", *args, "--data-dir", str(data_dir)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _created(db_url: str, name: str, *flags: str) -> str:
    made = _admin(db_url, "create-user", name, *flags)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_rotate_token_prints_a_new_token_and_the_old_one_stops_working(db_url: str) -> None:
    """Exit 0, the new token alone on stdout; it authenticates, the old one does not."""
    old = _created(db_url, "ann")
    result = _admin(db_url, "rotate-token", "ann")
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip()
    assert new.startswith("pc_")
    assert new != old
    assert (token_holder(db_url, old), token_holder(db_url, new)) == (None, "ann")


def test_delete_user_removes_the_user_and_their_token(db_url: str) -> None:
    """Exit 0; the token stops working, and deleting again is exit 1 "no user"."""
    token = _created(db_url, "ann")
    result = _admin(db_url, "delete-user", "ann")
    assert result.returncode == 0, result.stderr
    assert "deleted user 'ann'" in result.stderr
    assert token_holder(db_url, token) is None
    again = _admin(db_url, "delete-user", "ann")
    assert again.returncode == 1
    assert "no user named 'ann'" in again.stderr


@pytest.mark.parametrize("command", ["delete-user", "rotate-token"])
def test_an_unknown_name_is_exit_1_without_a_traceback(db_url: str, command: str) -> None:
    """Exit 1 naming the user, nothing on stdout."""
    result = _admin(db_url, command, "nobody")
    assert result.returncode == 1
    assert (result.stdout, "no user named 'nobody'" in result.stderr) == ("", True)
    assert "Traceback" not in result.stderr


def test_the_last_instance_admin_cannot_be_deleted(db_url: str) -> None:
    """Exit 1 "last instance admin" and the admin's token still works; with a second
    instance admin the delete goes through."""
    token = _created(db_url, "root", "--instance-admin")
    refused = _admin(db_url, "delete-user", "root")
    assert refused.returncode == 1
    assert "last instance admin" in refused.stderr
    assert token_holder(db_url, token) == "root"
    _created(db_url, "ops", "--instance-admin")
    assert _admin(db_url, "delete-user", "root").returncode == 0


def test_a_deleted_bootstrap_admin_is_not_recreated_while_another_admin_exists(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`admin` deleted (another instance admin exists): a start with the same
    PICLOUD_ADMIN_TOKEN creates no `admin` and the token stays revoked; `admin` is only
    created by a start that finds no instance admin at all."""
    settings = Settings(database_url=db_url, admin_token=ADMIN_TOKEN)
    bootstrap_admin(db_url, settings)
    assert token_holder(db_url, ADMIN_TOKEN) == ADMIN_NAME
    _created(db_url, "ops", "--instance-admin")
    assert _admin(db_url, "delete-user", ADMIN_NAME).returncode == 0
    capsys.readouterr()
    bootstrap_admin(db_url, settings)
    said = capsys.readouterr().err
    assert said.startswith("picloud: PICLOUD_ADMIN_TOKEN is not used: there is no instance admin")
    assert said.count("\n") == 1
    assert ADMIN_TOKEN not in said
    assert token_holder(db_url, ADMIN_TOKEN) is None


def test_a_start_with_the_admin_token_setting_undoes_a_rotation_of_admin(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rotate-token admin` works until the next start with PICLOUD_ADMIN_TOKEN, which
    gives `admin` that token again: rotate `admin` by changing the setting."""
    settings = Settings(database_url=db_url, admin_token=ADMIN_TOKEN)
    bootstrap_admin(db_url, settings)
    rotated = _admin(db_url, "rotate-token", ADMIN_NAME).stdout.strip()
    assert (token_holder(db_url, ADMIN_TOKEN), token_holder(db_url, rotated)) == (None, ADMIN_NAME)
    capsys.readouterr()
    bootstrap_admin(db_url, settings)
    assert "is now PICLOUD_ADMIN_TOKEN" in capsys.readouterr().err
    assert (token_holder(db_url, ADMIN_TOKEN), token_holder(db_url, rotated)) == (ADMIN_NAME, None)


def test_create_user_admin_needs_instance_admin(db_url: str) -> None:
    """`admin` is the bootstrap instance admin's name: `create-user admin` alone is
    exit 1 and creates nothing; with --instance-admin it is created."""
    refused = _admin(db_url, "create-user", ADMIN_NAME)
    assert refused.returncode == 1
    assert "the name 'admin' is the bootstrap instance admin's" in refused.stderr
    assert refused.stdout == ""
    assert _admin(db_url, "rotate-token", ADMIN_NAME).returncode == 1  # no such user
    token = _created(db_url, ADMIN_NAME, "--instance-admin")
    assert token_holder(db_url, token) == ADMIN_NAME


def test_a_plain_user_named_admin_stops_the_first_start_with_one_line(db_url: str) -> None:
    """No instance admin, and a user who is not one holds the name `admin` (made
    before the command line and the API refused it, or demoted in the database):
    `picloud serve` exits 1 with one line saying what to do, no traceback; after
    `delete-user admin` the start creates `admin`."""

    async def plain_admin() -> None:
        engine = make_engine(db_url, pool_size=1, max_overflow=0)
        try:
            user, _ = await PostgresUserRepo(engine).create_user(ADMIN_NAME, True)
            async with engine.begin() as conn:
                await conn.execute(
                    sa.update(t.users)
                    .where(t.users.c.id == user.id)
                    .values(is_instance_admin=False)
                )
        finally:
            await engine.dispose()

    anyio.run(plain_admin)
    with pytest.raises(StartupError, match="picloud admin delete-user admin"):
        bootstrap_admin(db_url, Settings(database_url=db_url, admin_token=ADMIN_TOKEN))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PICLOUD_")}
    served = subprocess.run(
        [str(PICLOUD), "serve", "--port", "0"],
        env={**clean, "PICLOUD_DATABASE_URL": db_url, "PICLOUD_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert served.returncode == 1
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith("picloud serve: there is no instance admin, and the bootstrap")
    assert "Traceback" not in served.stderr
    assert ADMIN_TOKEN not in served.stderr
    assert _admin(db_url, "delete-user", ADMIN_NAME).returncode == 0
    bootstrap_admin(db_url, Settings(database_url=db_url, admin_token=ADMIN_TOKEN))
    assert token_holder(db_url, ADMIN_TOKEN) == ADMIN_NAME


def test_an_admin_token_setting_it_cannot_apply_is_said_once(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An instance admin `root` made before the first start: a start with
    PICLOUD_ADMIN_TOKEN creates no `admin` and says in one line that the setting is
    not used (never the token); without the setting it says nothing."""
    _created(db_url, "root", "--instance-admin")
    bootstrap_admin(db_url, Settings(database_url=db_url, admin_token=ADMIN_TOKEN))
    said = capsys.readouterr().err
    assert said.startswith("picloud: PICLOUD_ADMIN_TOKEN is not used:")
    assert said.count("\n") == 1
    assert ADMIN_TOKEN not in said
    assert token_holder(db_url, ADMIN_TOKEN) is None
    bootstrap_admin(db_url, Settings(database_url=db_url))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exists", [True, False], ids=["empty", "missing"])
@pytest.mark.parametrize(
    "args", [("create-user", "dave"), ("rotate-token", "dave"), ("delete-user", "dave")]
)
def test_admin_on_a_data_dir_with_no_database_is_exit_2_and_creates_nothing(
    tmp_path: Path, args: tuple[str, str], exists: bool
) -> None:
    """No PICLOUD_DATABASE_URL and no cluster in the data directory: exit 2 in one line
    saying which --data-dir to pass, no token; the directory stays as it was (no
    database nobody serves is made)."""
    data_dir = tmp_path / "x"
    if exists:
        data_dir.mkdir()
    result = _admin_on_data_dir(data_dir, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"picloud admin {args[0]}: no picloud database in {data_dir} (start `picloud serve"
        f" --data-dir {data_dir}` once first, or pass the --data-dir or PICLOUD_DATABASE_URL"
        " your serve uses)\n"
    )
    if exists:
        assert list(data_dir.iterdir()) == []
    else:
        assert not data_dir.exists()

"""The README cannot rot: its commands are what they say, and its walkthrough runs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.app.server import ROOT, serving
from tests.pg import PgServer

README = (ROOT / "README.md").read_text()


def walkthrough() -> str:
    section = README.split("## Walkthrough", 1)[1]
    (block,) = re.findall(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return block


def test_readme_names_exactly_the_two_commands_and_ci_runs_the_test_one() -> None:
    """The two commands are ./dev serve and ./dev test, and .ci/run runs ./dev test."""
    section = README.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./dev serve", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./dev test\n" in ci


def test_walkthrough_runs_against_a_real_server(pg_server: PgServer, tmp_path: Path) -> None:
    """Paste the walkthrough into bash against picloud serve: every command succeeds."""
    name = pg_server.create_database(template=pg_server.template)
    try:
        with serving(pg_server.url(name), tmp_path / "picloud.log") as server:
            script = "set -euo pipefail\n" + walkthrough()
            done = subprocess.run(
                ["bash", "-c", script],
                env={**os.environ, "PICLOUD": server.base_url, "TOKEN": server.token},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stdout + done.stderr + server.log()
            again = subprocess.run(  # as README says: the name is taken, and it shows
                ["bash", "-c", "set -euo pipefail\n" + walkthrough()],
                env={**os.environ, "PICLOUD": server.base_url, "TOKEN": server.token},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert again.returncode != 0
            assert "app name 'hello' is taken" in again.stdout + again.stderr, again
    finally:
        pg_server.drop_database(name)
    out = done.stdout
    assert '{"hello":"world"}' in out
    assert '"source_kind":"kv"' in out
    assert '"key":"last:again"' in out
    assert out.rstrip().endswith("}")
    final = out.strip().splitlines()[-1]
    assert '"status":"succeeded"' in final
    assert '"got":{"n":1}' in final.replace("\\", "")


@pytest.mark.parametrize("line", ["./dev serve", "./dev test"])
def test_dev_script_knows_the_readme_commands(line: str) -> None:
    """./dev dispatches both README commands (and nothing is left to do by hand)."""
    dev = (ROOT / "dev").read_text()
    sub = line.split()[1]
    assert f"  {sub})" in dev

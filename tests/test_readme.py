"""The README is the front door: it must stay true to the CLI and to CI."""
from __future__ import annotations

import re

import click

from pipeline import cli
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_flag_of_every_command_is_documented():
    missing = []
    for name, command in cli.commands.items():
        assert f"#### `{name}`" in README, f"command {name} has no section"
        for param in command.params:
            if isinstance(param, click.Option):
                missing += [f"{name} {opt}" for opt in param.opts + param.secondary_opts if f"`{opt}`" not in README]
    assert not missing, f"flags missing from README.md: {missing}"


def test_quickstart_is_two_commands_and_ci_runs_the_readme_test_command():
    block = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2 and commands[1] == "bash .ci/run"
    ci = (REPO / ".ci" / "run").read_text()
    test_command = re.search(r"^python -m pytest .*$", ci, re.M).group(0)
    assert f"`{test_command}`" in README

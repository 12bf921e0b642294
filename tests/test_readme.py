"""Every command the README shows parses and passes the flag checks: the README and the CLI agree."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import main as cli
from pipeline.config import config_from_flags
from pipeline.modes import check_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SWITCHES = {s for a in cli.build_parser()._actions if a.nargs == 0 for s in a.option_strings}


def readme_commands() -> list[str]:
    """main.py's arguments in each command the README shows: code blocks, the modes table (a row
    starting '...' continues the row above it) and the flags table's examples."""
    found: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        found += [m.split("#")[0] for m in re.findall(r"python main\.py([^\n&|]*)", block)]
    last = ""
    for cell in re.findall(r"^\| `([^`]+)` \|", README, re.M):
        if cell.startswith("python main.py"):
            last = cell.removeprefix("python main.py")
            found.append(last)
        elif cell.startswith("..."):
            found.append(last + cell.removeprefix("..."))
    for row in re.findall(r"^\| `(--[\w-]+)`[^|]*\| [^|]* \| (.*) \|$", README, re.M):  # flag | default | example
        found += [ex for ex in re.findall(r"`(--[^`]+)`", row[1]) if " " in ex or ex in SWITCHES]  # not prose mentions
    return [c.strip() for c in found]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_accepted(command, monkeypatch):
    """Each flag combination the README shows is accepted; the paths it names are the reader's (a
    path where there is nothing is refused, tested in test_main)."""
    monkeypatch.setattr("pipeline.modes._missing_path", lambda cfg: None)
    argv = shlex.split(command)
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_flags(vars(args), cli.explicit_options(parser, argv))
    assert check_config(cfg, lambda dests: ", ".join(sorted(dests))) is None


def test_the_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) > 40 and "--serve --host 0.0.0.0" in commands and "" in commands

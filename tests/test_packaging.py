"""The console entry point named in pyproject.toml is main.main, the same function as python main.py."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import main as cli


def test_fashion_search_entry_point_is_main(capsys):
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    module, _, name = project["scripts"]["fashion-search"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert entry is cli.main
    assert entry(["--top-k", "0"]) == 2 and "--top-k: must be >= 1" in capsys.readouterr().err

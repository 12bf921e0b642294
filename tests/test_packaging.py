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


def test_the_wheel_carries_the_pages_templates_and_the_type_marker(tmp_path):
    """pip install . brings the report's templates and py.typed: without the marker, mypy and
    pyright skip the installed package's annotations, and every Catalog and Hit is Any to them."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt", "main.py"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist()
    assert "pipeline/py.typed" in names and "main.py" in names
    assert {"pipeline/templates/report.html", "pipeline/templates/search.html"} <= set(names)

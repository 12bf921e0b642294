"""Fashion visual search: a catalogue of photos into CLIP embeddings, look-alike items, person crops
and the items worn by people in a video. `main.py` is the command line; `Catalog` the Python API
(`from pipeline import Catalog`); see README "How it fits together" for the stage each module holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PipelineError, UsageError  # what the API raises: every error it says is a PipelineError

if TYPE_CHECKING:
    from .catalog import Catalog, QueryResult
    from .searcher import Hit

__all__ = ["Catalog", "Hit", "PipelineError", "QueryResult", "UsageError"]


def __getattr__(name: str) -> Any:
    """The API's names load on first use, so `main.py --help` imports no search code."""
    if name in ("Catalog", "QueryResult"):
        from . import catalog

        return getattr(catalog, name)
    if name == "Hit":
        from . import searcher

        return searcher.Hit
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

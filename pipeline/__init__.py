"""Fashion visual search: a catalogue of photos into CLIP embeddings, look-alike items, person crops
and the items worn by people in a video. `main.py` is the command line; `Catalog` the Python API
(`from pipeline import Catalog`); see README "How it fits together" for the stage each module holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# what the API raises: every error it says is a PipelineError; what a request got wrong a UsageError
# (FilterError among them) or an ImageDecodeError, the service's own faults the others (CacheMismatchError)
from .errors import CacheMismatchError, PipelineError, UsageError

if TYPE_CHECKING:
    from .catalog import Catalog, QueryResult
    from .filters import FilterError
    from .images import ImageDecodeError
    from .searcher import Hit

__all__ = ["CacheMismatchError", "Catalog", "FilterError", "Hit", "ImageDecodeError", "PipelineError", "QueryResult",
           "UsageError"]


def __getattr__(name: str) -> Any:
    """The API's names load on first use, so `main.py --help` imports no search code."""
    if name in ("Catalog", "QueryResult"):
        from . import catalog

        return getattr(catalog, name)
    if name == "Hit":
        from . import searcher

        return searcher.Hit
    if name == "ImageDecodeError":
        from . import images

        return images.ImageDecodeError
    if name == "FilterError":
        from . import filters

        return filters.FilterError
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

"""Outputs other runs made from a gallery's store: a query run's results and pictures, a video run's
matches. Each report section of theirs records the store it was made on (`made_on`: the store
folder's name and its sidecar's embeddings and manifest sha256). A gallery run that leaves the
store changed (built afresh, updated) retires the ones made on the earlier store, files and report
section: their rows, files and pictures named photos that may be gone or hold other rows now, and
"photos the dataset no longer holds leave nothing behind". The run's summary says which went and
how to make them again. A query run's table also holds the catalogue's values (a price) of each
match: its section records the store's metadata too (`metadata`: metadata.parquet's sha256), and a
run that changed those values alone retires it as well.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from .errors import CacheMismatchError
from .report import RunSummary
from .store import manifest_sha256, store_sha256
from .webreport import REPORT_DIR, drop_section, read_section

log = logging.getLogger(__name__)

QUERY_PICTURE = re.compile(r"q\d{3,}_.+\.jpg")  # a query run's pictures, q000_<label>.jpg
QUERY_TABLE = "query_results.csv"
# A video run's outputs in its clip's folder (a new run of the clip replaces them all)
VIDEO_OUTPUTS = ("frame_*.jpg", "track_*.jpg", "annotated.*", "results.jsonl", "tracks.json")


def made_on(store_dir: Path, output_dir: Path, folder: Path, values: bool = False) -> dict[str, str]:
    """What a derived section records: the store it was made on and the folder of its files
    (relative to the output folder); {} when there is no complete store. values: the outputs hold
    the catalogue's values too (a query's table): the store's metadata is recorded ("" for none)."""
    try:
        stamp = {"store": store_sha256(store_dir), "manifest": manifest_sha256(store_dir)}
    except CacheMismatchError:
        return {}
    if values:
        stamp["metadata"] = _metadata_sha256(store_dir)
    return {"gallery": store_dir.name, **stamp, "folder": folder.relative_to(output_dir).as_posix()}


def _metadata_sha256(store_dir: Path) -> str:
    from .fileio import sha256_file_once
    from .metadata import METADATA_FILE

    path = store_dir / METADATA_FILE
    return sha256_file_once(path) if path.is_file() else ""


def video_outputs(folder: Path) -> list[Path]:
    """A video run's output files in its clip's folder."""
    return [p for pattern in VIDEO_OUTPUTS for p in folder.glob(pattern) if p.is_file()]


def query_pictures(folder: Path) -> list[Path]:
    """A query run's pictures in its folder (QUERY_PICTURE names only)."""
    return [p for p in folder.glob("q*.jpg") if QUERY_PICTURE.fullmatch(p.name)]


def query_outputs(folder: Path) -> list[Path]:
    """A query run's pictures and table in its folder."""
    return query_pictures(folder) + [p for p in [folder / QUERY_TABLE] if p.is_file()]


def retire_stale(store_dir: Path, output_dir: Path, plots_dir: Path, summary: RunSummary,
                 output_url: str | None = None) -> list[str]:
    """Remove the query and video outputs made on an earlier state of the store at `store_dir` (see
    the module docstring), and their report sections; returns the folders they were in. With the
    outputs at `output_url`, the files there stay (a run sends what it writes, it deletes nothing
    there but pictures), which the note says. A section written before sections recorded their store
    is left as it is."""
    now = made_on(store_dir, output_dir, store_dir, values=True)
    sections = plots_dir / REPORT_DIR / "sections"
    if not now or not sections.is_dir():
        return []
    retired: list[str] = []
    values_alone: list[str] = []
    for path in sorted(sections.glob("*.js")):
        section = read_section(plots_dir, path.stem) or {}
        data = section.get("data")
        stamp: Any = data.get("made_on") if isinstance(data, dict) else None
        if not isinstance(stamp, dict) or stamp.get("gallery") != now["gallery"]:
            continue  # another store's, or written before sections recorded their store
        photos = (stamp.get("store"), stamp.get("manifest")) == (now["store"], now["manifest"])
        if photos and stamp.get("metadata", now["metadata"]) == now["metadata"]:  # none recorded: photos alone
            continue
        folder = (output_dir / str(stamp.get("folder", ""))).resolve()
        if not folder.is_relative_to(output_dir.resolve()):
            continue  # a hand-edited section: never delete outside the output folder
        files = query_outputs(folder) if section.get("kind") == "query" else (
            video_outputs(folder) if section.get("kind") == "video" else [])
        for f in files:
            f.unlink(missing_ok=True)
        drop_section(plots_dir, path.stem)
        where = folder.relative_to(output_dir.resolve()).as_posix()
        (values_alone if photos else retired).append(where)
        log.info("%s: %d file(s) made on the gallery before this run removed", where, len(files))
    at_url = (f" (here and from the report: their files at {output_url} stay, remove them there)"
              if output_url else "")
    if retired:
        summary.notes.append(
            f"results made on the gallery before this run removed{at_url}, with their report sections "
            f"({', '.join(retired)}): their rows and pictures named its photos; run those queries or videos again")
    if values_alone:
        summary.notes.append(
            f"query results made before this run removed{at_url}, with their report sections "
            f"({', '.join(values_alone)}): they held the catalogue's values as they were (a price, say), which "
            "changed; run those queries again")
    return retired + values_alone

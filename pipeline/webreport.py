"""The HTML report: outputs/report.html, a page a person opens to look at a run's results.

Every gallery, query, evaluation and video run writes its own section (report/sections/<id>.js) and
re-writes report.html, which shows every section present, so a later run adds to the page instead of
replacing it. The page is static: vanilla JavaScript, relative links only, no CDN, so it works from
file:// and from any static server. Big galleries stay fast: items are written as data pages
(report/<section>/page_NNNN.js, PAGE_SIZE items each, loaded when shown) with one thumbnail sprite
per page (JPEG, loaded lazily), and a compact index of names for the filter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .fileio import atomic_write_bytes, atomic_write_text, read_json_dict, unlink_quietly
from .images import encode_jpeg
from .plots import THUMB_SIZE
from .report import RunSummary, peak_rss_mib

PAGE_SIZE = 120
SPRITE_COLUMNS = 12  # a page's thumbnails in a 12 x 10 sprite
SPRITE_QUALITY = 80  # in full colour (4:4:4): halved colour bled a line of each cell into the next (a third larger)
REPORT_HTML = "report.html"
REPORT_DIR = "report"


def _js(callback: str, payload: Any) -> str:
    """A data file the page loads with a <script> tag (file:// forbids fetch): it calls a callback."""
    return f"window.__report.{callback}({json.dumps(payload, separators=(',', ':'), allow_nan=False)});\n"


def _read_js(path: Path, callback: str) -> Any:
    """The payload of a data file _js wrote, or None when it is missing or not one."""
    head = f"window.__report.{callback}("
    try:
        text = path.read_text(encoding="utf-8").rstrip()
    except OSError:
        return None
    if not (text.startswith(head) and text.endswith(");")):
        return None
    try:
        return json.loads(text[len(head) : -2])
    except json.JSONDecodeError:
        return None


def count_of(n: int, one: str, many: str | None = None) -> str:
    """"1 item", "2 items", "1,000 items"."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def shown_value(v: Any) -> str:
    """A metadata value as the report's item details show it (JavaScript's String() of its JSON), so
    that the grid's filter finds what a reader sees: 61.42, 20 (for 20.0), true."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isfinite(v):
        if v.is_integer() and abs(v) < 1e21:
            return str(int(v))
        text = repr(v)
        if "e" in text:  # JavaScript writes 1e-6 <= |v| < 1e21 out (0.00001), and exponents without padding
            if 1e-6 <= abs(v) < 1e21:
                return format(Decimal(text), "f")
            mantissa, exponent = text.split("e")
            return f"{mantissa}e{'-' if exponent[0] == '-' else '+'}{int(exponent[1:])}"
        return text
    return str(v)


def relative_link(path: Path, report_dir: Path) -> str:
    """How report.html (in report_dir) links to a file of the output folder: relative, so the folder
    works from file:// and from any static server; a URL path, so a name with a space, '#' or '%' (a
    clip's) names its file, not a fragment."""
    from urllib.parse import quote

    return quote(Path(os.path.relpath(path, report_dir)).as_posix(), safe="/")


def summary_payload(summary: RunSummary) -> dict[str, Any]:
    """What the report shows of a run's summary."""
    return {
        "mode": summary.mode,
        "model": summary.model,  # what made the vectors the run used, as the printed summary says
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": round(time.perf_counter() - summary.started, 2),
        "peak_mib": round(peak_rss_mib()),
        "counts": summary.counts,
        "stages": [
            {"name": name, "label": label, "depth": depth, "s": round(v, 2)}
            for name, label, depth, v in summary.stage_rows()
        ],
        "notes": summary.notes,
        "outputs": summary.outputs,
        "failures": [{"item": item, "reason": reason} for item, reason in summary.failures],
    }


@dataclass
class Section:
    """One run's part of the report. `data` is the kind's own payload (see the page's renderers)."""

    id: str
    kind: str  # gallery | query | evaluation | video
    title: str
    summary: RunSummary
    data: dict[str, Any] = field(default_factory=dict)


def sprite_image(tiles: Sequence[np.ndarray]) -> Image.Image:
    """A page's thumbnails (uint8 (T, T, 3) each, T = THUMB_SIZE) in rows of SPRITE_COLUMNS on white,
    laid out in one array: the pixels a Pillow paste per tile gives, in less time (the README's
    update figures). A tile of another size sits at its cell's top left, cut to the cell."""
    t = THUMB_SIZE
    cells = np.full((-(-len(tiles) // SPRITE_COLUMNS) * SPRITE_COLUMNS, t, t, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        tile = np.asarray(tile)[:t, :t]
        cells[k, : tile.shape[0], : tile.shape[1]] = tile
    rows = len(cells) // SPRITE_COLUMNS
    grid = cells.reshape(rows, SPRITE_COLUMNS, t, t, 3).transpose(0, 2, 1, 3, 4)
    return Image.fromarray(np.ascontiguousarray(grid).reshape(rows * t, SPRITE_COLUMNS * t, 3))


def write_gallery_pages(
    folder: Path, section_id: str, files: Sequence[str], rows: Sequence[int], neighbours: Any, thumbnail: Any,
    meta: Any = None, tile_keys: Sequence[str] | None = None, sources: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A gallery's items as data pages and thumbnail sprites.

    Args:
        folder: outputs/report.
        files, rows: per embedded item (embedding order), its file name and manifest line.
        neighbours: retrieval.Neighbours of the gallery (top-k other items per item).
        thumbnail: item -> uint8 (T, T, 3).
        meta: item -> its metadata values, JSON-ready (metadata.Metadata.json_values), or None.
        tile_keys: per item, a string its thumbnail is a function of: a page's sprite whose items'
            keys are those recorded for it (SPRITES_FILE) is kept, not drawn and encoded again
            (after an update most pages are the same). None: every sprite is drawn.
        sources, names: per item, what the user knows its photo by (manifest.csv's `source`) and
            its caption (store.shown_name: a relative path's folder and name, any other source's last part, a
            crop's person); the name is
            shown, the source and file on hover, and the filter searches sources and file names,
            and the item's metadata values as its details show them (shown_value).
    Returns:
        the section's gallery data: item count, page count, k, and where the pages are.
    """
    out = folder / section_id
    out.mkdir(parents=True, exist_ok=True)
    n = len(files)
    pages = -(-n // PAGE_SIZE)
    wanted = {f"page_{p:04d}.jpg": _sprite_key(tile_keys, p * PAGE_SIZE, min(n, (p + 1) * PAGE_SIZE))
              for p in range(pages)}
    before = read_json_dict(out / SPRITES_FILE)
    unlink_quietly(out / SPRITES_FILE)  # written again once the sprites are: a killed run redraws, never trusts
    for old in out.glob("page_*"):
        if old.suffix != ".jpg" or wanted.get(old.name) is None or wanted[old.name] != before.get(old.name):
            old.unlink()
    nearest, values = [], []
    for p in range(pages):
        start, stop = p * PAGE_SIZE, min(n, (p + 1) * PAGE_SIZE)
        items = []
        for i in range(start, stop):
            nb = [
                [int(j), round(float(d), 4), files[int(j)],
                 *([names[int(j)], sources[int(j)]] if names is not None and sources is not None else [])]
                for j, d in zip(neighbours.indices[i], neighbours.distances[i])
                if j >= 0
            ]
            item = {"i": i, "file": files[i], "row": int(rows[i]), "nb": nb}
            if sources is not None:
                item["src"] = sources[i]
            if names is not None:
                item["name"] = names[i]
            if meta is not None:
                item["meta"] = held = meta(i)
                values.append(" ".join(shown_value(v) for v in held.values() if v is not None))
            items.append(item)
            nearest.append(nb[0][1] if nb else None)
        atomic_write_text(out / f"page_{p:04d}.js", _js("page", {"section": section_id, "page": p, "items": items}))
        if (out / f"page_{p:04d}.jpg").is_file():  # the same items' thumbnails as when it was drawn
            continue
        sprite = sprite_image([thumbnail(i) for i in range(start, stop)])
        atomic_write_bytes(out / f"page_{p:04d}.jpg", encode_jpeg(sprite, quality=SPRITE_QUALITY, full_colour=True))
    listing: dict[str, Any] = {"section": section_id, "files": list(files), "nearest": nearest}
    if sources is not None:
        listing["sources"] = list(sources)
    if names is not None:
        listing["names"] = list(names)
    if meta is not None:
        listing["values"] = values
    atomic_write_text(out / "names.js", _js("names", listing))
    atomic_write_text(out / SPRITES_FILE, json.dumps({k: v for k, v in wanted.items() if v is not None}))
    return {
        "items": n,
        "pages": pages,
        "page_size": PAGE_SIZE,
        "columns": SPRITE_COLUMNS,
        "thumb": THUMB_SIZE,
        "k": int(neighbours.indices.shape[1]) if n else 0,
        "folder": f"{REPORT_DIR}/{section_id}",
        "values": meta is not None,  # the filter searches metadata values too
    }


SPRITES_FILE = "sprites.json"  # per page sprite, the key of the thumbnails drawn in it


def _sprite_key(tile_keys: Sequence[str] | None, start: int, stop: int) -> str | None:
    if tile_keys is None:
        return None
    h = hashlib.sha256(f"{THUMB_SIZE} {SPRITE_COLUMNS} {SPRITE_QUALITY}".encode())
    for key in tile_keys[start:stop]:
        h.update(key.encode() + b"\n")
    return h.hexdigest()


def read_section(plots_dir: Path, section_id: str) -> dict[str, Any] | None:
    """The payload an earlier run wrote for a section (id, kind, title, summary, data), or None."""
    found = _read_js(plots_dir / REPORT_DIR / "sections" / f"{section_id}.js", "section")
    return found if isinstance(found, dict) else None


def build_summary(plots_dir: Path, section_id: str, store: str) -> dict[str, Any] | None:
    """The report's summary of the run that built the store `store` (its embeddings' sha256), so that
    a run which reuses the store (--use-embeddings) shows the build's counts and stage times beside
    its own instead of replacing them: the earlier section's own summary when that run built the
    store, or the build summary it carried. None when the section is of another store."""
    old = read_section(plots_dir, section_id) or {}
    data = old.get("data")
    if not isinstance(data, dict) or not store or data.get("store") != store:
        return None
    return old.get("summary") if data.get("built") else data.get("build")


def write_section(plots_dir: Path, section: Section) -> Path:
    """Write one section and re-write the page with every section present; returns report.html."""
    folder = plots_dir / REPORT_DIR
    (folder / "sections").mkdir(parents=True, exist_ok=True)
    payload = {
        "id": section.id,
        "kind": section.kind,
        "title": section.title,
        "summary": summary_payload(section.summary),
        "data": section.data,
        "written": time.time(),
    }
    atomic_write_text(folder / "sections" / f"{section.id}.js", _js("section", payload))
    _write_index(folder)
    page = plots_dir / REPORT_HTML
    atomic_write_text(page, PAGE)
    section.summary.report_section = section.id
    return page


def rewrite_summary(plots_dir: Path, summary: RunSummary) -> None:
    """Give the report section this run wrote the summary as it ends: the notes said once the mode
    has returned, and the outputs as a URL --output-dir holds them (not in the working copy)."""
    found = read_section(plots_dir, summary.report_section) if summary.report_section else None
    if found is None:
        return
    found["summary"] = summary_payload(summary)
    atomic_write_text(plots_dir / REPORT_DIR / "sections" / f"{summary.report_section}.js", _js("section", found))


def drop_section(plots_dir: Path, section_id: str) -> None:
    """Take an earlier run's section out of the report (a run that replaces its files drops it first,
    so that a run stopped midway leaves no section naming files that are gone)."""
    folder = plots_dir / REPORT_DIR
    path = folder / "sections" / f"{section_id}.js"
    if not path.is_file():
        return
    path.unlink()
    _write_index(folder)


def _write_index(folder: Path) -> None:
    """sections.js: the sections present, in the report's order."""
    ids = sorted((p.stem for p in (folder / "sections").glob("*.js")), key=_section_order)
    atomic_write_text(folder / "sections.js", _js("sections", ids))


def _section_order(section_id: str) -> tuple[int, str]:
    order = ("gallery", "gallery_segment", "query", "evaluation")
    return (order.index(section_id), section_id) if section_id in order else (len(order), section_id)


TEMPLATES = Path(__file__).parent / "templates"


def template(name: str) -> str:
    """A page of templates/ with the scripts it shares inlined where "// @include NAME.js" stands
    (the report opens from file://, where a page loads no script of another folder)."""
    page = (TEMPLATES / name).read_text(encoding="utf-8")
    return re.sub(r"^// @include ([\w.-]+\.js)$",
                  lambda m: (TEMPLATES / m.group(1)).read_text(encoding="utf-8").rstrip(), page, flags=re.MULTILINE)


PAGE = template("report.html")

"""Embedding store format: the manifest, the sidecar, resumable shards, and the checks a cache must
pass before it is reused.

Layout of one store folder (`embeddings/` or `embeddings_segment/`):
    embeddings.npy    float32 (N_ok, D), L2-normalized; row r belongs to the manifest line whose
                      embedding_row == r
    manifest.csv      one line per dataset row (or per crop / per row without crops), see ManifestRow
    thumbnails.npy    uint8 (N_ok, T, T, 3) RGB thumbnails, row-aligned with embeddings.npy; after an
                      update that added photos, the first rows only: the rest follow in
    thumbnails-<16 hex>.npy  segments (named by their sha256) the sidecar lists in order, so that an
                      update writes only its new photos' thumbnails (see ThumbnailParts)
    embeddings.json   the sidecar; written last, so its presence means the store is complete
    .partial/         shards of an unfinished run (removed when the run completes)
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from .backends import ONNXRUNTIME
from .errors import CacheMismatchError, PipelineError
from .fileio import (
    atomic_write_bytes,
    atomic_write_npy_chunks,
    atomic_write_text,
    npy_bytes,
    read_json_dict,
    sha256_bytes,
    sha256_file,
    unlink_quietly,
)
from .identity import ABSENT, STORE_FORMAT, GallerySource, VectorIdentity, describe_differences, differences, said_value
from .machine import cpu_info

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.csv"
THUMBNAILS_FILE = "thumbnails.npy"
THUMBNAIL_SEGMENT = re.compile(r"thumbnails-[0-9a-f]{16}\.npy")
# An update appends a segment; past this many, the segments are joined into one (the base file
# stays), and once the segments hold more thumbnails than the base, everything is written as a new
# base: each thumbnail is then rewritten O(1) times on average, however many updates there are.
MAX_THUMBNAIL_SEGMENTS = 8
SIDECAR_FILE = "embeddings.json"
PARTIAL_DIR = ".partial"
UPDATE_DIR = ".update"  # --update's staging, in the store folder and in the image folder
NEW_PART_DIR = "new"  # in the store's UPDATE_DIR: the store of the update's new photos, built as a part
NEXT_DIR = "next"  # in the store's UPDATE_DIR: the staged store an update switches in
SWITCH_FILE = "SWITCH"  # in the store's UPDATE_DIR: the staged store is complete, to be moved into place
SWITCH_STOPPED = ("an update of {store} was interrupted in the middle of its switch: run the update's command "
                  "(with --update) to finish it")
RUN_FILE = "run.json"
# Image files (and thumbnails.npy) this store has hashed and found as recorded, with their size and
# modification time then: a file whose size and time are unchanged is not hashed again (git's index
# does the same).
VERIFIED_FILE = "images.verified.json"


# ----------------------------------------------------------------------------- manifest
@dataclass
class ManifestRow:
    """One line of manifest.csv.

    index is the line number; source_row the row of the dataset it came from. For person crops,
    person is the crop's number within its source row and the box is xyxy in source pixels.
    status is "ok", "failed" or "no_person"; embedding_row is -1 when the item has no embedding.
    """

    index: int
    file: str
    source_row: int
    source: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    status: str = "ok"
    error: str = ""
    note: str = ""
    embedding_row: int = -1
    person: int = -1
    box_x1: float | str = ""
    box_y1: float | str = ""
    box_x2: float | str = ""
    box_y2: float | str = ""
    mask_area: int | str = ""
    confidence: float | str = ""
    # What --update knows a photo by: the --id-column value ("" without one) and the sha256 of the
    # dataset cell's bytes (the photo as it came, before any re-encoding; "" when the row had none).
    item_id: str = ""
    source_sha256: str = ""
    # What duplicates.py finds copies by ("" where there was no picture): the hash of the item's
    # decoded pixels at full size, and its look signature (duplicates.look_text).
    pixel_hash: str = ""
    look: str = ""

    @property
    def shown_name(self) -> str:
        return shown_name(self.source, self.file, person=self.person)


_ROW_SOURCE = re.compile(r"\[\d+\]$")  # "<dataset>[row]": a cell without a path of its own


def shown_name(source: str, file: str, lasting: bool = False, person: int = -1) -> str:
    """What the user knows an item's photo by, for captions: a relative path (a file of the dataset
    folder, a parquet cell's relative path) by its folder and name (`SKU1001/front.jpg` of
    `women/dresses/SKU1001/front.jpg`: a shop's folder per product names every photo front.jpg, and
    the folder tells them apart; the whole path on hover), the last part of any other source (a
    file by its absolute path, `<dataset>[row]`; `cat[12]` of `./cat/[12]` too), and a person crop's
    number as query labels write it (`p01.jpg#p0`); the gallery's file where there is no source.
    lasting: for a caption kept across runs (the result pictures), the file instead of a row
    number, which an update that removes or inserts rows before it changes."""
    row = _ROW_SOURCE.search(source)
    if not source or (lasting and row):
        return file
    path = source[: row.start()] if row else source
    relative = not row and not re.match(r"([\\/]|[A-Za-z]:[\\/]|\.\.?[\\/])", path)
    parts = re.split(r"[\\/]", path.rstrip("\\/"))
    name = "/".join(parts[-2:]) if relative else parts[-1] + (row.group(0) if row else "")
    return f"{name or file}#p{person}" if person >= 0 else name or file


MANIFEST_FIELDS = [f.name for f in fields(ManifestRow)]
# Columns a manifest may lack: stores made before --update or before duplicates (format 2 all the
# same) read with them empty.
OPTIONAL_FIELDS = ("item_id", "source_sha256", "pixel_hash", "look")


def manifest_to_csv(rows: Iterable[ManifestRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    values = attrgetter(*MANIFEST_FIELDS)  # the fields' values in column order (asdict deep-copies: 10x slower)
    writer.writerows(values(row) for row in rows)
    return buf.getvalue()


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse manifest.csv; raises CacheMismatchError naming the line when it is malformed."""
    return parse_manifest(Path(path).read_bytes(), path)


def _parse_float(v: str) -> float | str:
    return float(v) if v != "" else ""


def _parse_int_or_empty(v: str) -> int | str:
    return int(v) if v != "" else ""


# How each column's text becomes its value (plain text where a column is not named here).
_PARSERS: dict[str, Callable[[str], Any]] = {
    **{name: int for name in ("index", "source_row", "width", "height", "embedding_row", "person")},
    **{name: _parse_float for name in ("box_x1", "box_y1", "box_x2", "box_y2", "confidence")},
    "mask_area": _parse_int_or_empty,
}


def parse_manifest(data: bytes, path: str | Path) -> list[ManifestRow]:
    """Parse manifest.csv bytes already read (and hashed) by the caller; `path` names them in errors."""
    rows: list[ManifestRow] = []
    with io.StringIO(data.decode("utf-8"), newline="") as f:
        reader = csv.reader(f)
        names = next(reader, [])
        if names != MANIFEST_FIELDS and names + [f for f in OPTIONAL_FIELDS if f not in names] != MANIFEST_FIELDS:
            raise CacheMismatchError(f"{path}: unexpected columns {names}; expected {MANIFEST_FIELDS}")
        parsed = [(i, _PARSERS[name]) for i, name in enumerate(names) if name in _PARSERS]
        width, complete = len(names), names == MANIFEST_FIELDS
        for lineno, values in enumerate(reader, start=2):
            if not values:  # a blank line (csv.DictReader skipped them too)
                continue
            try:
                if len(values) != width:
                    raise ValueError(f"{len(values)} values for {width} columns")
                typed: list[Any] = values
                for i, parse in parsed:
                    typed[i] = parse(values[i])
                rows.append(ManifestRow(*typed) if complete else ManifestRow(**dict(zip(names, typed))))
            except (TypeError, ValueError) as e:
                raise CacheMismatchError(f"{path}, line {lineno}: cannot parse ({e})") from e
    return rows


def embedded_rows(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """The manifest lines that own an embedding, in embedding-row order (line k owns row k)."""
    return sorted((r for r in rows if r.embedding_row >= 0), key=lambda r: r.embedding_row)


# ----------------------------------------------------------------------------- sidecar
@dataclass
class Sidecar:
    """What a store holds and how it was made; compared field by field before reuse."""

    identity: VectorIdentity  # what made the vectors
    source: GallerySource  # what the gallery was made from
    count: int
    dim: int
    manifest_rows: int
    manifest_sha256: str
    embeddings_sha256: str
    thumbnails_sha256: str  # thumbnails.npy's
    thumbnail_size: int
    format: int = STORE_FORMAT
    # The thumbnails after thumbnails.npy's, in order: [{"file", "count", "sha256"}] (see ThumbnailParts).
    thumbnail_segments: list[dict[str, Any]] = field(default_factory=list)
    # The CPU that computed the vectors (model, int8 instruction sets): recorded, never compared.
    machine: dict[str, Any] = field(default_factory=dict)
    # The local dataset's files as the store was made from them (dataset.dataset_stamp): recorded,
    # never compared; a run that reuses the store says when they changed since (--update catches up).
    dataset_files: str | None = None

    @property
    def onnx_file(self) -> str | None:
        """The ONNX file that made the vectors, by its absolute path when the store was written
        (`machine`'s "onnx_file": a path of that machine, recorded and never compared, where versions
        before it read any key; the identity's onnx_sha256 is what counts). Where it still holds those
        bytes, a search with no --onnx finds it there (catalog.store_embedder_spec)."""
        value = self.machine.get("onnx_file")
        return value if isinstance(value, str) and value else None

    def to_json(self) -> str:
        data = {**asdict(self), "identity": self.identity.to_json(), "source": self.source.to_json()}
        if not self.thumbnail_segments:  # a store without segments stays readable by versions before them
            del data["thumbnail_segments"]
        if self.dataset_files is None:  # a hub dataset's: nothing recorded, as before
            del data["dataset_files"]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> Sidecar:
        """The sidecar at `path`; a store of another format version is refused with what to do."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheMismatchError(f"{path}: unreadable sidecar ({e})") from e
        if data.get("format") != STORE_FORMAT:
            raise CacheMismatchError(_format_message(path, data.get("format")))
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: dict[str, Any], path: Path) -> Sidecar:
        if isinstance(data.get("onnx_file"), str):  # written for an hour of 2026-12-08 at the top: in machine now
            data = {**data, "machine": {**(data.get("machine") or {}), "onnx_file": data["onnx_file"]}}
            del data["onnx_file"]
        try:
            typed = {**data, "identity": VectorIdentity.from_json(data["identity"], "identity"),
                     "source": GallerySource.from_json(data["source"], "source")}
            return cls(**typed)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CacheMismatchError(f"{path}: unreadable sidecar ({e})") from e


def _format_message(path: Path, found: Any) -> str:
    if found == 1:
        return (
            f"{path}: store format 1, made by an older version; this version reads format {STORE_FORMAT}. "
            f"Upgrade it in place (seconds, nothing is re-embedded): python -m pipeline.store upgrade {path.parent}"
        )
    return f"{path}: store format {found!r}, this version reads {STORE_FORMAT}: build the gallery again with --fresh"


def upgrade_store(root: str | Path) -> bool:
    """Rewrite a format-1 store's sidecar as format 2: the identity gains "pixels": "pil" (format 1
    stores were all made by PIL's preprocessing) and the source is checked against the typed fields.
    Returns False when the store is already current. Raises CacheMismatchError for anything else."""
    path = Path(root) / SIDECAR_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheMismatchError(f"{path}: unreadable sidecar ({e})") from e
    if data.get("format") == STORE_FORMAT:
        Sidecar.read(path)  # current, and readable: nothing to do
        return False
    if data.get("format") != 1:
        raise CacheMismatchError(_format_message(path, data.get("format")))
    data = {**data, "identity": {"pixels": "pil", **data["identity"]}, "format": STORE_FORMAT}
    Sidecar.parse(data, path)  # checked before it is written: a failed upgrade leaves format 1 as it was
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    return True


@dataclass
class GalleryCache:
    """A verified store: embeddings plus the manifest rows that own them."""

    root: Path
    images_dir: Path
    embeddings: np.ndarray  # float32 (N, D)
    rows: list[ManifestRow]  # all manifest lines
    sidecar: Sidecar

    @property
    def embedded_rows(self) -> list[ManifestRow]:
        """Manifest lines with an embedding, in embedding-row order."""
        return embedded_rows(self.rows)

    def thumbnails(self) -> ThumbnailReader:
        return ThumbnailReader.of(self.root, self.sidecar)


def load_cache(
    root: str | Path,
    images_dir: str | Path,
    identity: VectorIdentity | None,
    source: GallerySource | None = None,
    check_images: bool = True,
    images_at: tuple[str, set[str]] | None = None,
    source_fields: frozenset[str] | None = None,
) -> GalleryCache:
    """Load a store and check it against the files and against what is asked for.

    Args:
        root: the store folder (embeddings/ or embeddings_segment/).
        images_dir: the folder the manifest's file names are relative to.
        identity: the embedder identity asked for (its None fields are not compared); None skips it.
        source: what the gallery is asked to be made from, compared on `source_fields` (all when None).
        check_images: verify each image file exists and has the recorded sha256.
        images_at: (URL, names there) when the images are at a URL (--output-dir s3://...): each
            must be there; they are not hashed, which would download them.
    Raises:
        CacheMismatchError: with a message naming every difference found.
    """
    root, images_dir = Path(root), Path(images_dir)
    sidecar_path = root / SIDECAR_FILE
    if not sidecar_path.is_file():
        partial = (
            " (an unfinished run left shards in .partial/; run the command that began it again to resume)"
            if (root / PARTIAL_DIR).is_dir()
            else ""
        )
        raise CacheMismatchError(f"no complete cache in {root}: {sidecar_path.name} is missing{partial}", missing=True)
    sidecar = Sidecar.read(sidecar_path)
    problems: list[str] = []
    if identity is not None:
        problems += differences(identity, sidecar.identity)
    if source is not None:
        problems += differences(source, sidecar.source, source_fields)
    if problems:
        raise CacheMismatchError(
            f"cache in {root} was made differently from what is asked:\n  " + "\n  ".join(problems),
            differing=tuple(p.split(":", 1)[0].split(".", 1)[0] for p in problems),
            made_by=sidecar,
        )
    emb, rows = _read_verified(root, sidecar)
    if check_images:
        _check_images(root, rows, images_dir, images_at)
    return GalleryCache(root=root, images_dir=images_dir, embeddings=emb, rows=rows, sidecar=sidecar)


def _read_verified(root: Path, sidecar: Sidecar) -> tuple[np.ndarray, list[ManifestRow]]:
    """A store's embeddings and manifest, each checked against the sidecar's hashes and counts."""
    emb_path, man_path = root / EMBEDDINGS_FILE, root / MANIFEST_FILE
    parts = thumbnail_parts(sidecar)
    for p in (emb_path, man_path, *(root / part.file for part in parts)):
        if not p.is_file():
            raise CacheMismatchError(f"cache in {root} is incomplete: {p.name} is missing")
    # Manifest and embeddings are read once: hashed and parsed from the same bytes.
    man_bytes, emb_bytes = man_path.read_bytes(), emb_path.read_bytes()
    if (h := sha256_bytes(man_bytes)) != sidecar.manifest_sha256:
        raise CacheMismatchError(
            f"{man_path} was changed after the run (sha256 {h[:12]}…, sidecar says {sidecar.manifest_sha256[:12]}…)"
        )
    if (h := sha256_bytes(emb_bytes)) != sidecar.embeddings_sha256:
        raise CacheMismatchError(
            f"{emb_path} does not match the sidecar (sha256 {h[:12]}…, expected {sidecar.embeddings_sha256[:12]}…): "
            f"truncated or replaced"
        )
    for part in parts:
        if not _thumbnails_verified(root, part):
            raise CacheMismatchError(f"{root / part.file} does not match the sidecar: truncated or replaced")
    try:
        emb = np.load(io.BytesIO(emb_bytes), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CacheMismatchError(f"{emb_path}: unreadable ({e})") from e
    del emb_bytes
    if emb.dtype != np.float32 or emb.shape != (sidecar.count, sidecar.dim):
        raise CacheMismatchError(
            f"{emb_path}: shape {emb.shape} {emb.dtype}, sidecar says ({sidecar.count}, {sidecar.dim}) float32"
        )
    rows = parse_manifest(man_bytes, man_path)
    if len(rows) != sidecar.manifest_rows:
        raise CacheMismatchError(f"{man_path}: {len(rows)} lines, sidecar says {sidecar.manifest_rows}")
    emb_rows = sorted(r.embedding_row for r in rows if r.embedding_row >= 0)
    if emb_rows != list(range(sidecar.count)):
        raise CacheMismatchError(f"{man_path}: embedding_row values do not cover 0..{sidecar.count - 1} exactly once")
    return emb, rows


def _check_images(
    root: Path, rows: list[ManifestRow], images_dir: Path, images_at: tuple[str, set[str]] | None
) -> None:
    """Every embedded row's image is there (and, on a local disk, has the recorded sha256: hashed
    once, then trusted while its size and modification time stay those it had, see VERIFIED_FILE)."""
    missing, changed = [], []
    known = _verified_images(root, images_dir) if images_at is None else {}
    verified: dict[str, list] = {}
    to_hash: dict[str, list] = {}
    for r in rows:
        if r.embedding_row < 0 or not r.file:
            continue
        if images_at is not None:
            if r.file not in images_at[1]:
                missing.append(r.file)
            continue
        try:
            stamp = _stamp(images_dir / r.file, r.sha256)  # before hashing: a file changed meanwhile is hashed again
        except OSError:
            missing.append(r.file)
            continue
        if known.get(r.file) == stamp:
            verified[r.file] = stamp
        elif r.file not in to_hash:
            to_hash[r.file] = stamp
        elif to_hash[r.file] != stamp:  # two lines name one file with different bytes
            changed.append(r.file)
    names = list(to_hash)
    with ThreadPoolExecutor(max_workers=2) as pool:  # hashlib hashes without the GIL
        hashes = list(pool.map(lambda name: _file_sha256_or_none(images_dir / name), names))
    for name, h in zip(names, hashes):
        if h == to_hash[name][2]:
            verified[name] = to_hash[name]
        else:
            changed.append(name)
    if missing or changed:
        parts = []
        if missing:
            where = images_at[0] if images_at is not None else images_dir
            parts.append(f"{len(missing)} image(s) missing from {where} (e.g. {', '.join(missing[:3])})")
        if changed:
            parts.append(f"{len(changed)} image(s) changed since embedding (e.g. {', '.join(changed[:3])})")
        raise CacheMismatchError(f"cache in {root} no longer matches its images: " + "; ".join(parts))
    if images_at is None and verified != known:
        record = _read_verified_record(root)
        record.update(images=str(images_dir.resolve()), files=verified)
        _write_verified_record(root, record)


def verify_images(root: str | Path, images_dir: str | Path, rows: list[ManifestRow]) -> None:
    """Check a store's image files against its lines now (after a build or an update wrote them), so
    that the next run that loads the store hashes none of them again.

    Raises:
        CacheMismatchError: a file is missing or holds other bytes.
    """
    _check_images(Path(root), rows, Path(images_dir), None)


def _file_sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # a folder, or gone since its stat
        return None


def _thumbnails_verified(root: Path, part: ThumbnailPart) -> bool:
    """A thumbnails file has the sidecar's sha256: hashed, unless VERIFIED_FILE saw it with these
    bytes at this size and modification time (they are by far the largest files of a store)."""
    path = root / part.file
    stamp = _stamp(path, part.sha256)
    if _thumbnail_stamps(root).get(part.file) == stamp:
        return True
    if sha256_file(path) != part.sha256:
        return False
    remember_thumbnails(root, {part.file: stamp})
    return True


def _thumbnail_stamps(root: Path) -> dict[str, list]:
    found = _read_verified_record(root).get("thumbnails")
    if isinstance(found, list):  # written before segments: thumbnails.npy's alone
        return {THUMBNAILS_FILE: found}
    return found if isinstance(found, dict) else {}


def remember_thumbnails(root: Path, stamps: dict[str, list]) -> None:
    """Record in VERIFIED_FILE these thumbnails files' stamps (name -> size, time, sha256), each
    hashed when it was written or checked; stamps of files no longer in the folder are dropped."""
    known = {name: st for name, st in _thumbnail_stamps(root).items() if (root / name).is_file()}
    _remember(root, "thumbnails", {**known, **stamps})


def thumbnail_stamp(path: Path, sha256: str) -> dict[str, list]:
    """The stamp of one thumbnails file just written with this sha256, for remember_thumbnails."""
    return {path.name: _stamp(path, sha256)}


def carry_thumbnails_stamp(source: Path, root: Path, names: Iterable[str]) -> None:
    """The stamps `source` recorded for thumbnails files `names`, recorded for `root` after the files
    moved there (a rename keeps size and time; a load compares the stamp with the file before
    trusting it)."""
    stamps = _thumbnail_stamps(source)
    remember_thumbnails(root, {name: stamps[name] for name in names if name in stamps})


def _stamp(path: Path, sha256: str) -> list:
    """What VERIFIED_FILE keeps of a file: its size and modification time with the sha256 it has."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, sha256]


def _remember(root: Path, key: str, value: Any) -> None:
    record = _read_verified_record(root)
    record[key] = value
    _write_verified_record(root, record)


def _read_verified_record(root: Path) -> dict[str, Any]:
    return read_json_dict(root / VERIFIED_FILE)


def _write_verified_record(root: Path, record: dict[str, Any]) -> None:
    try:
        atomic_write_text(root / VERIFIED_FILE, json.dumps(record))
    except OSError:  # a store on a read-only disk: verified again next time
        pass


def _verified_images(root: Path, images_dir: Path) -> dict[str, list]:
    """VERIFIED_FILE's files, when it was written for this image folder."""
    record = _read_verified_record(root)
    files = record.get("files")
    return files if isinstance(files, dict) and record.get("images") == str(images_dir.resolve()) else {}


@dataclass(frozen=True)
class ThumbnailPart:
    """One file of a store's thumbnails: its name in the store folder, its rows, its sha256."""

    file: str
    count: int
    sha256: str


def thumbnail_parts(sidecar: Sidecar) -> list[ThumbnailPart]:
    """A store's thumbnails files in row order: thumbnails.npy, then the segments updates added."""
    try:
        segments = [ThumbnailPart(str(d["file"]), int(d["count"]), str(d["sha256"]))
                    for d in sidecar.thumbnail_segments]
    except (KeyError, TypeError, ValueError) as e:
        raise CacheMismatchError(f"unreadable thumbnail_segments in the sidecar ({e})") from e
    for part in segments:
        if not THUMBNAIL_SEGMENT.fullmatch(part.file) or part.count < 0:
            raise CacheMismatchError(f"the sidecar lists a thumbnails segment it cannot hold: {part}")
    base = sidecar.count - sum(part.count for part in segments)
    if base < 0:
        raise CacheMismatchError(f"the sidecar's thumbnails segments hold more rows than its {sidecar.count} vectors")
    return [ThumbnailPart(THUMBNAILS_FILE, base, sidecar.thumbnails_sha256), *segments]


def remove_unlisted_segments(root: Path, parts: Iterable[ThumbnailPart]) -> None:
    """Delete the thumbnails segments in `root` its store no longer lists (after its sidecar moved
    into place: a reader of the store before has its files open)."""
    listed = {part.file for part in parts}
    for p in root.iterdir() if root.is_dir() else []:
        if THUMBNAIL_SEGMENT.fullmatch(p.name) and p.name not in listed:
            unlink_quietly(p)


class ThumbnailReader:
    """Reads a store's thumbnails (thumbnails.npy and its segments, one row space) with plain file
    reads (no growing memory map)."""

    def __init__(self, *paths: str | Path) -> None:
        if not paths:
            raise ValueError("ThumbnailReader needs at least one file")
        self.paths = [Path(p) for p in paths]
        self.path = self.paths[0]
        self._files: list[tuple[int, int, Any]] = []  # (first row, header bytes, open file)
        total, item_shape = 0, None
        try:
            for path in self.paths:
                f = open(path, "rb")
                self._files.append((total, 0, f))
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                self._files[-1] = (total, f.tell(), f)
                if dtype != np.uint8 or len(shape) != 4 or (item_shape is not None and shape[1:] != item_shape):
                    raise CacheMismatchError(f"{path}: expected uint8 (N, T, T, 3), got {shape} {dtype}")
                item_shape = shape[1:]
                total += shape[0]
        except BaseException:
            self.close()
            raise
        assert item_shape is not None
        self.shape = (total, *item_shape)
        self.item = int(np.prod(item_shape))
        self._starts = [start for start, _, _ in self._files]

    @classmethod
    def of(cls, root: str | Path, sidecar: Sidecar | None = None) -> ThumbnailReader:
        """The thumbnails of the store at `root` (its sidecar read when not given). Given the sidecar
        a reader that holds no lock loaded earlier, the files opened are checked to be that store's:
        an update that switched in since (it moves the sidecar away first and back last; its
        compaction rewrites thumbnails.npy and removes segments) is refused, never read as the
        loaded store's thumbnails."""
        root = Path(root)
        if sidecar is None:
            return cls(*(root / part.file for part in thumbnail_parts(Sidecar.read(root / SIDECAR_FILE))))
        parts = thumbnail_parts(sidecar)
        changed = CacheMismatchError(f"the store in {root} was updated while it was opened: open it again")
        try:
            reader = cls(*(root / part.file for part in parts))
        except FileNotFoundError as e:
            raise changed from e
        try:
            try:
                now = Sidecar.read(root / SIDECAR_FILE)
            except CacheMismatchError:  # moved away by an update's switch, which puts it back last
                raise changed from None
            if thumbnail_parts(now) != parts:
                raise changed
            counts = [part.count for part in parts]
            if reader.counts() != counts:
                raise CacheMismatchError(f"the thumbnails files in {root} hold {reader.counts()} rows where its "
                                         f"sidecar lists {counts}: run the gallery build again to rewrite them")
        except BaseException:
            reader.close()
            raise
        return reader

    def __len__(self) -> int:
        return self.shape[0]

    def counts(self) -> list[int]:
        """The rows of each file, in order."""
        return [b - a for a, b in zip(self._starts, [*self._starts[1:], len(self)])]

    def _at(self, i: int) -> tuple[int, int, Any, int]:
        """(rows before its file, header bytes, open file, the row its file ends before) of the file
        holding row i."""
        k = bisect.bisect_right(self._starts, i)
        return (*self._files[k - 1], self._starts[k] if k < len(self._starts) else len(self))

    def __getitem__(self, i: int) -> np.ndarray:
        start, header, f, _ = self._at(int(i))
        f.seek(header + (int(i) - start) * self.item)
        buf = f.read(self.item)
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.shape[1:])

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Thumbnails start .. start+len(out)-1 read straight into `out` (a buffer the caller reuses,
        so that copying a store's thumbnails touches no fresh memory)."""
        view = out.reshape(-1).data.cast("B")
        done, row = 0, int(start)
        while done < view.nbytes:
            if not 0 <= row < len(self):
                raise CacheMismatchError(f"{self.path}: ends before thumbnail {start + len(out) - 1}")
            first, header, f, end = self._at(row)
            want = min(view.nbytes - done, (end - row) * self.item)
            f.seek(header + (row - first) * self.item)
            got = f.readinto(view[done : done + want])
            if got != want:
                raise CacheMismatchError(f"{self.path}: ends before thumbnail {start + len(out) - 1}")
            done += want
            row += want // self.item
        return out

    def close(self) -> None:
        for _, _, f in self._files:
            f.close()


# ----------------------------------------------------------------------------- shards
@dataclass
class Shard:
    """One completed shard: source rows [start, stop) and what they produced."""

    number: int
    start: int
    stop: int
    embeddings: np.ndarray  # float32 (n, D)
    rows: list[ManifestRow]  # embedding_row is local to the shard here
    thumbnails: np.ndarray | None = None  # uint8 (n, T, T, 3); only set on shards being written


def unfinished_run(root: str | Path) -> dict[str, Any] | None:
    """What the run file of an unfinished run in <root>/.partial records (its flags and identity);
    None when there is none, or it cannot be read (ShardStore says which when it resumes)."""
    try:
        params = json.loads((Path(root) / PARTIAL_DIR / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return params if isinstance(params, dict) else None


def unfinished_pixels(root: str | Path) -> str | None:
    """The pixels (identity "pixels") an unfinished run in <root>/.partial made its shards with;
    None when there is none, it completed no shard, or its run file says nothing."""
    if not any((Path(root) / PARTIAL_DIR).glob("shard_*.done")):
        return None
    params = unfinished_run(root)
    identity = params.get("identity") if params is not None else None
    pixels = identity.get("pixels") if isinstance(identity, dict) else None
    return pixels if isinstance(pixels, str) else None


class ShardStore:
    """Writes shards of an unfinished run into <root>/.partial and finds them again on resume.

    A shard is complete only when its .done marker exists and the hashes in it match the files;
    the marker is written last, so a kill at any moment leaves at worst an ignored half shard.
    """

    def __init__(self, root: str | Path, run_params: dict[str, Any], fresh: bool) -> None:
        self.root = Path(root)
        self.dir = self.root / PARTIAL_DIR
        self.run_params = run_params
        run_file = self.dir / RUN_FILE
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                old = None
            asked = run_params
            if isinstance(old, dict):
                old, asked = _without_recorded_later(old, asked)
            if old != asked and not any(self.dir.glob("shard_*.done")):
                log.info("discarding an unfinished run in %s that completed no shard", self.dir)
                shutil.rmtree(self.dir)
            elif not isinstance(old, dict):
                raise PipelineError(
                    f"{self.dir} holds shards of an unfinished run whose {RUN_FILE} is damaged (unreadable): what "
                    "made them cannot be known, so they are not resumed. Add --fresh to start over."
                )
            elif old != asked:
                # what the run on disk recorded and this one does not (a weights file no longer at its path) too
                diffs = describe_differences(asked, old) + _recorded_only_there(old, asked)
                if any(d.startswith("source.seg_weights:") for d in diffs):  # one change of the weights, said once
                    diffs = [d for d in diffs if not d.startswith("segmenter_weights:")]
                if diffs and all(d.startswith("dataset_files:") for d in diffs):
                    raise PipelineError(
                        f"{self.dir} holds shards of an unfinished run on the dataset as it was:\n  {diffs[0]}\n"
                        "The dataset's files changed since that run started: its shards may hold photos the dataset "
                        "no longer has. Add --fresh to start over."
                    )
                # the same flags over files whose bytes changed (weights retrained in place, another ONNX
                # file at the same path): no argument gives the old files back
                files = [d for d in diffs if re.match(r"(identity\.(model|onnx)_sha256|segmenter_weights|"
                                                      r"source\.seg_weights):", d)]
                what = ("different arguments, or files whose bytes changed since it started (a model's weights or an "
                        "ONNX file replaced in place)" if files else "different arguments")
                made = old.get("identity")
                ran_on = made.get("runtime", ONNXRUNTIME) if isinstance(made, dict) else ONNXRUNTIME
                runtime = (f" (it ran on {ran_on}: --onnx-runtime {ran_on})"
                           if any(d.startswith("identity.runtime:") for d in diffs) else "")
                raise PipelineError(
                    f"{self.dir} holds shards of an unfinished run with {what}:\n  " + "\n  ".join(diffs)
                    + f"\nRun with the same arguments and files to resume it{runtime}, or add --fresh to discard it."
                )
        elif any(self.dir.glob("shard_*.done")):  # deleted by hand, or lost: nothing tells what made them
            raise PipelineError(
                f"{self.dir} holds shards of an unfinished run without its {RUN_FILE} (removed or lost): what made "
                "them cannot be known, so they are not resumed. Add --fresh to start over."
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            atomic_write_text(run_file, json.dumps(run_params, sort_keys=True))

    def _paths(self, number: int) -> dict[str, Path]:
        stem = self.dir / f"shard_{number:05d}"
        return {
            "emb": stem.with_suffix(".npy"),
            "thumbs": Path(f"{stem}.thumbs.npy"),
            "rows": stem.with_suffix(".csv"),
            "done": stem.with_suffix(".done"),
        }

    def completed(self) -> Iterator[Shard]:
        """Yield complete, verified shards in order; stops at the first missing or damaged one."""
        number = 0
        while True:
            shard = self.load(number)
            if shard is None:
                return
            yield shard
            number += 1

    def all_complete(self) -> dict[int, Shard]:
        """Every complete, verified shard by number, in any order (engines that finish shards out of
        order resume from all of them, not only from the first run of them)."""
        found = {}
        for done in sorted(self.dir.glob("shard_*.done")):
            number = int(done.stem.split("_")[1])
            if (shard := self.load(number)) is not None:
                found[number] = shard
        return found

    def load(self, number: int) -> Shard | None:
        p = self._paths(number)
        if not p["done"].is_file():
            return None
        try:
            done = json.loads(p["done"].read_text())
            data = {key: p[key].read_bytes() for key in ("emb", "rows")}  # read once: hashed, then parsed
            for key in ("emb", "thumbs", "rows"):
                if (sha256_bytes(data[key]) if key in data else sha256_file(p[key])) != done[key]:
                    log.warning("shard %d is damaged (%s changed); it will be recomputed", number, p[key].name)
                    return None
            emb = np.load(io.BytesIO(data["emb"]), allow_pickle=False)
            rows = parse_manifest(data["rows"], p["rows"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError, CacheMismatchError) as e:
            log.warning("shard %d unreadable (%s); it will be recomputed", number, e)
            return None
        return Shard(number, done["start"], done["stop"], emb, rows)

    def thumbnails(self, number: int) -> np.ndarray:
        return np.load(self._paths(number)["thumbs"], allow_pickle=False)

    def write(self, shard: Shard) -> None:
        p = self._paths(shard.number)
        if shard.thumbnails is None:
            raise ValueError("a shard is written with its thumbnails")
        payloads = {
            "emb": npy_bytes(shard.embeddings),
            "thumbs": npy_bytes(shard.thumbnails),
            "rows": manifest_to_csv(shard.rows).encode("utf-8"),
        }
        for key, data in payloads.items():
            atomic_write_bytes(p[key], data)
        # Hashed from the bytes just written, not read back.
        done: dict[str, Any] = {key: sha256_bytes(data) for key, data in payloads.items()}
        done.update(start=shard.start, stop=shard.stop)
        atomic_write_text(p["done"], json.dumps(done))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class StoreBuild:
    """One build of a store folder, whichever engine runs it: the folder made, the unfinished run's
    shards found (ShardStore: a resume with other parameters is refused), and at the end the old
    store invalidated (a half-replaced store is never read as whole), every shard joined into the
    store and the shards removed. Until then the old store stays whole: a build stopped early (a
    rebuild begun by mistake, without --use-embeddings) leaves it to be searched and served."""

    def __init__(self, store_dir: Path, params: dict[str, Any], fresh: bool) -> None:
        store_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = store_dir
        self.shards = ShardStore(store_dir, params, fresh=fresh)

    def finalize(
        self, shards: list[Shard], identity: VectorIdentity, source: GallerySource, dim: int, thumbnail_size: int,
        onnx_file: Path | None = None,
    ) -> tuple[np.ndarray, list[ManifestRow]]:
        emb, rows = finalize_store(self.store_dir, self.shards, shards, identity, source, dim, thumbnail_size,
                                   onnx_file=onnx_file)
        if "rows" in self.shards.run_params:  # a part (--update's new photos): what it was built for, kept with it
            atomic_write_text(self.store_dir / PART_FILE, json.dumps(self.shards.run_params, sort_keys=True))
        self.shards.remove()
        return emb, rows


PART_FILE = "part.json"  # beside a finished part's store: the run parameters it was built with (rows, sizes)


def finalize_store(
    root: str | Path,
    shard_store: ShardStore,
    shards: list[Shard],
    identity: VectorIdentity,
    source: GallerySource,
    dim: int,
    thumbnail_size: int,
    onnx_file: Path | None = None,
) -> tuple[np.ndarray, list[ManifestRow]]:
    """Join the run's completed shards (in order, as verified or written by this run) into the final
    files, renumbering rows; the sidecar goes last. Thumbnails are read back from `shard_store` one
    shard at a time, so memory does not grow with the gallery.

    Returns:
        (embeddings float32 (N, D), manifest rows)
    """
    root = Path(root)
    invalidate_store(root)  # the old store's sidecar first: its files are replaced from here on
    rows: list[ManifestRow] = []
    emb_parts, shard_numbers = [], []
    offset = 0
    for shard in shards:
        for r in shard.rows:
            r = replace(r, index=len(rows))
            if r.embedding_row >= 0:
                r.embedding_row += offset
            rows.append(r)
        offset += len(shard.embeddings)
        emb_parts.append(shard.embeddings)
        shard_numbers.append(shard.number)
    emb = np.concatenate(emb_parts) if emb_parts else np.zeros((0, dim), np.float32)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    thumbs = (shard_store.thumbnails(n) for n in shard_numbers)
    write_store(root, emb, rows, thumbs, identity, source, thumbnail_size,
                dataset_files=shard_store.run_params.get("dataset_files"),  # as the run began: its rows' files
                onnx_file=onnx_file)
    return emb, rows


def check_file_names(rows: Iterable[ManifestRow]) -> None:
    """Files are named by their bytes' sha256 (items.image_file_name): lines sharing a name must
    share the bytes. A clash (two contents, one name) is refused rather than one file overwriting
    the other."""
    seen: dict[str, str] = {}
    for r in rows:
        if r.file and r.sha256 and seen.setdefault(r.file, r.sha256) != r.sha256:
            raise PipelineError(
                f"two different pictures would both be stored as {r.file} (sha256 {seen[r.file][:16]}… and "
                f"{r.sha256[:16]}…): please report this; the store was not written"
            )


def write_store(
    root: Path,
    emb: np.ndarray,
    rows: list[ManifestRow],
    thumbs: Iterable[np.ndarray],
    identity: VectorIdentity,
    source: GallerySource,
    thumbnail_size: int,
    kept_thumbnails: Sequence[ThumbnailPart] = (),
    dataset_files: str | None = None,
    onnx_file: Path | None = None,
) -> None:
    """Write a store's files into `root`: the sidecar removed first and written last, from the hashes
    of the bytes written (not read back). `thumbs`: uint8 (n, T, T, 3) chunks, in embedding-row
    order, written one at a time, so memory does not grow with the gallery. dataset_files: the
    dataset's stamp (dataset.dataset_stamp) as the store was made from it. onnx_file: the ONNX file
    that made the vectors (recorded by its absolute path), None for a model's.

    kept_thumbnails: the first rows' thumbnails files, kept from the store this one replaces (an
    update: thumbnails.npy first, then segments, all in the store's folder, not `root`); `thumbs` are
    then the remaining rows, written as one new segment. Without them, `thumbs` are every row's,
    written as thumbnails.npy.
    """
    check_file_names(rows)
    unlink_quietly(root / SIDECAR_FILE)
    # written from the array itself, hashed as it is written: not a bytes copy of it (an update held the
    # old vectors, the new, and that copy: twice a gallery run's peak at 100k)
    emb_sha256 = atomic_write_npy_chunks(root / EMBEDDINGS_FILE, emb.shape, emb.dtype, [emb])
    parts = list(kept_thumbnails)
    if parts and parts[0].file != THUMBNAILS_FILE:
        raise ValueError(f"kept thumbnails start with {THUMBNAILS_FILE}, not {parts[0].file}")
    rest = len(emb) - sum(part.count for part in parts)
    written = root / (THUMBNAILS_FILE if not parts else ".thumbnails-segment.npy")
    sha = atomic_write_npy_chunks(written, (rest, thumbnail_size, thumbnail_size, 3), np.uint8, thumbs)
    if parts:
        if rest:
            segment = written.with_name(f"thumbnails-{sha[:16]}.npy")
            os.replace(written, segment)
            parts.append(ThumbnailPart(segment.name, rest, sha))
            remember_thumbnails(root, thumbnail_stamp(segment, sha))
        else:
            unlink_quietly(written)
    else:
        parts = [ThumbnailPart(THUMBNAILS_FILE, rest, sha)]
        remember_thumbnails(root, thumbnail_stamp(written, sha))  # hashed while written: not read again
    manifest_bytes = manifest_to_csv(rows).encode("utf-8")
    atomic_write_bytes(root / MANIFEST_FILE, manifest_bytes)
    sidecar = Sidecar(  # hashes of the bytes just written, not read back
        identity=identity,
        source=source,
        count=int(emb.shape[0]),
        dim=int(emb.shape[1]),
        manifest_rows=len(rows),
        manifest_sha256=sha256_bytes(manifest_bytes),
        embeddings_sha256=emb_sha256,
        thumbnails_sha256=parts[0].sha256,
        thumbnail_size=thumbnail_size,
        machine={**cpu_info(), **({"onnx_file": str(Path(onnx_file).resolve())} if onnx_file is not None else {})},
        thumbnail_segments=[asdict(part) for part in parts[1:]],
        dataset_files=dataset_files,
    )
    if not kept_thumbnails:
        # A whole store written in place: an older one's segments are not its. Removed before the sidecar is
        # written, so that a run killed here leaves no store rather than a stale file.
        remove_unlisted_segments(root, parts)
    atomic_write_text(root / SIDECAR_FILE, sidecar.to_json())


def store_sha256(root: str | Path) -> str:
    """The store's identity for things built from it (an index): its embeddings' sha256, from the
    sidecar."""
    try:
        return json.loads((Path(root) / SIDECAR_FILE).read_text())["embeddings_sha256"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CacheMismatchError(f"no complete store in {root} ({e})") from e


def manifest_sha256(root: str | Path) -> str:
    """The sha256 of the store's manifest, from the sidecar (what derived files such as the
    duplicate groups are keyed by)."""
    try:
        return json.loads((Path(root) / SIDECAR_FILE).read_text())["manifest_sha256"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CacheMismatchError(f"no complete store in {root} ({e})") from e


def invalidate_store(root: str | Path) -> None:
    """Remove the sidecar so a store being rebuilt is never taken as complete."""
    unlink_quietly(Path(root) / SIDECAR_FILE)


# What run.json holds since a later version, or only when it could be known: (section, key, both ways), section
# None for the top level. Not compared when the run.json on disk lacks it (a run of the last version, or weights
# downloaded as the first run loaded them); both ways: also when the run now cannot know it (a hub dataset).
RECORDED_LATER = ((None, "dataset_files", True), (None, "segmenter_weights", False),
                  *(("source", key, False) for key in sorted(GallerySource.RECORDED_LATER)),
                  *(("identity", key, False) for key in sorted(VectorIdentity.RECORDED_LATER)))


def _recorded_only_there(old: dict[str, Any], asked: dict[str, Any], prefix: str = "") -> list[str]:
    """What a run.json records and the run's parameters do not (a weights file no longer at its
    path; an identity of OpenVINO's against onnxruntime's, which is left out), at any depth."""
    out = []
    for key in sorted(old):
        if key not in asked:
            out.append(f"{prefix}{key}: cache has {said_value(key, old[key])}, asked for {said_value(key, ABSENT)}")
        elif isinstance(old[key], dict) and isinstance(asked[key], dict):
            out += _recorded_only_there(old[key], asked[key], f"{prefix}{key}.")
    return out


def _without_recorded_later(old: dict[str, Any], asked: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run.json and the run's parameters without what the run.json lacks and the parameters hold
    among RECORDED_LATER (and, both ways, the reverse): a run of a version that did not record it,
    or a run that could not (the hub's dataset, weights Ultralytics downloads as the first run
    loads them), is not compared on it, as it was not then. The run.json on disk stays as it is."""
    def without(d: dict[str, Any], section: str | None, key: str) -> dict[str, Any]:
        if section is None:
            return {k: v for k, v in d.items() if k != key}
        inner = d.get(section)
        return {**d, section: {k: v for k, v in inner.items() if k != key}} if isinstance(inner, dict) else d

    def has(d: dict[str, Any], section: str | None, key: str) -> bool:
        holder = d if section is None else d.get(section)
        return isinstance(holder, dict) and key in holder

    for section, key, both_ways in RECORDED_LATER:
        if not has(old, section, key) and has(asked, section, key) or (
                both_ways and has(old, section, key) and not has(asked, section, key)):
            old, asked = without(old, section, key), without(asked, section, key)
    return old, asked


def run_params(source: GallerySource, identity: VectorIdentity, batch_size: int, shard_rows: int,
               rows: frozenset[int] | None = None, dataset_files: str | None = None,
               segmenter_weights: str | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run whose shards it finds (ShardStore's run.json);
    `rows`: the dataset rows of a partial build (--update's new photos), recorded by their hash;
    `dataset_files`: the dataset's files as they were when the run started (dataset.dataset_stamp):
    a dataset changed since then may no longer hold the photos of the shards done;
    `segmenter_weights`: the sha256 of a segmented gallery's local segmenter weights (retrained
    weights saved over the same file must not crop the rest of the run)."""
    # the id column recorded even when there is none (null): a run begun without it is not resumed with it
    params = {"source": {**source.to_json(), "id_column": source.id_column}, "identity": identity.to_json(),
              "batch_size": batch_size, "shard_rows": shard_rows}
    if rows is not None:
        params["rows"] = rows_key(rows)
    if dataset_files is not None:
        params["dataset_files"] = dataset_files
    if segmenter_weights is not None:
        params["segmenter_weights"] = segmenter_weights
    return params


def rows_key(rows: frozenset[int]) -> str:
    """A partial build's dataset rows, as its run file records them."""
    return sha256_bytes(np.array(sorted(rows), np.int64).tobytes())


def main(argv: list[str] | None = None) -> int:
    """python -m pipeline.store upgrade DIR [DIR ...]: bring older stores to this format, in place."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "upgrade":
        print("usage: python -m pipeline.store upgrade STORE_DIR [STORE_DIR ...]", file=sys.stderr)
        return 2
    for folder in args[1:]:
        try:
            done = upgrade_store(folder)
        except CacheMismatchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{folder}: {'upgraded to' if done else 'already'} store format {STORE_FORMAT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

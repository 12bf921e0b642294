"""Dataset reader: a hub id, a local dataset folder or file, or a folder of images in; a stream of
`Record`s (encoded bytes of one row's image, undecoded) out, in dataset order.

Nothing here decodes pixels, so a corrupt row becomes a recorded failure downstream, not a crash.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import unicodedata
from bisect import bisect_left
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import PipelineError, UsageError, first_line
from .fileio import printable_name, read_regular_file

log = logging.getLogger(__name__)

# Listed even where Pillow cannot decode them (heic, avif, svg, jxl): such files become recorded
# failures instead of being skipped without a word.
IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".jfif",
    ".heic",
    ".heif",
    ".avif",
    ".svg",
    ".jxl",
    ".jpe",  # Pillow reads these too
    ".dib",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".ico",
    ".jp2",
    ".j2k",
}
_TABLE_SUFFIXES = {".parquet", ".arrow"}


@dataclass(frozen=True)
class Record:
    """One dataset row's image, still encoded.

    Attributes:
        source_row: the row's position in the dataset (or in the sorted folder listing).
        source: where it came from: the file's relative path, or "<dataset>[row]".
        data: the encoded bytes; None when the row has no image, with `error` saying why.
    """

    source_row: int
    source: str
    data: bytes | None
    error: str = ""
    extra: dict[str, Any] | None = None  # other columns asked for (images as bytes, or None)
    item_id: str = ""  # the --id-column value, as text ("" without one)
    linked: bool = False  # the bytes came from a file the cell names, not from the dataset itself


@dataclass(frozen=True)
class DatasetSpec:
    """What to read: `name` is a hub id, a local dataset folder/file, or a folder of images."""

    name: str = "lirus18/deepfashion"
    split: str = "train"
    config: str | None = None  # --config: a hub dataset's configuration (None: its default)
    limit: int | None = 10000
    image_column: str = "image"
    extra_columns: tuple[str, ...] = ()  # read alongside (evaluation: "cloth", "item_ID")
    id_column: str | None = None  # --id-column: what --update knows a photo by (default: its bytes' sha256)
    # what a row's source names the dataset by (`<label>[row]`) where `name` was made absolute for
    # another process (a joined Ray cluster's workers): the name as the user gave it; None: `name`
    label: str | None = None

    @property
    def columns(self) -> list[str]:
        """Every column read: the image's, the extra ones, the id column."""
        return [self.image_column, *self.extra_columns, *([self.id_column] if self.id_column else [])]

    def as_dict(self) -> dict[str, Any]:
        name = self.name
        if Path(name).exists():
            name = str(Path(name).resolve())
        return {"dataset": name, "split": self.split, "limit": self.limit, "image_column": self.image_column}


def iter_records(spec: DatasetSpec, start: int = 0, only: frozenset[int] | None = None
                 ) -> Generator[Record, None, None]:
    """Yield records for rows start .. limit-1 in dataset order.

    Args:
        spec: the dataset to read.
        start: first row to yield (rows before it are skipped without reading their images where
            the format allows).
        only: when given, just these rows (--update's new photos): a parquet dataset reads only the
            row groups that hold them, not the whole file.
    Raises:
        PipelineError: the dataset cannot be opened, or has no such split or column.
    """
    path = Path(spec.name)
    if (root := _image_folder(spec)) is not None:
        records = _iter_image_folder(root, spec, start, only)
    elif files := _local_parquet_files(path, spec.split):
        records = _iter_parquet(files, spec, start, _open_local_file, only)
    elif path.exists():
        records = _picked(_iter_hf(_open_local(path, spec), spec, start), only)
    elif is_hub_id(spec.name):
        hub = _hub_split(spec)
        if hub.parquet_files:
            records = _iter_parquet(hub.parquet_files, spec, start, _hub_file_opener(), only)
        else:
            records = _picked(_iter_hf(_open_hub(spec), spec, start), only)
    else:
        raise PipelineError(f"dataset {spec.name!r} is neither an existing path nor a hub id like 'owner/name'")
    yield from records


def _picked(records: Iterator[Record], only: frozenset[int] | None) -> Iterator[Record]:
    """A streamed dataset's records, read through, of which only `only` are kept (when given)."""
    return records if only is None else (r for r in records if r.source_row in only)


_FOOTERS: dict[str, Any] = {}  # a parquet file's footer that check_dataset read, until the run reads the file


def _footer(name: Any, source: Any):
    """The footer check_dataset kept for this file, else read now (_read_footer)."""
    return _FOOTERS.pop(str(name), None) or _read_footer(source)


def _open_parquet(name: Any, source: Any, footer: Any = None) -> Any:
    """pyarrow's ParquetFile of `source` (with its footer, when read), or a PipelineError naming the
    file when it is no parquet file or a damaged one (a copy or download cut short)."""
    import pyarrow.parquet as pq

    return _read_as_parquet(name, lambda: pq.ParquetFile(source, pre_buffer=False, metadata=footer))


def _parquet_footer(name: Any, source: Any) -> Any:
    """`source`'s parquet footer (_read_footer, or pyarrow's own read of a local file), or a
    PipelineError naming the file when it cannot be read as parquet."""
    import pyarrow.parquet as pq

    return _read_as_parquet(name, lambda: _read_footer(source) or pq.read_metadata(source))


def _read_as_parquet(name: Any, read: Callable[[], Any]) -> Any:
    """read(), or a PipelineError naming the file `name` when it failed on the file's bytes (a
    local file, or pyarrow's verdict on what was read: pyarrow's ArrowInvalid is a ValueError); a
    remote file's network error keeps its own message."""
    try:
        return read()
    except (OSError, ValueError) as e:
        if not (isinstance(e, ValueError) or Path(str(name)).is_file()):
            raise
        raise PipelineError(f"{name}: cannot be read as a parquet file ({first_line(e)}); a copy or download cut "
                            "short leaves one like this: copy or download it again") from None


def check_dataset(spec: DatasetSpec) -> int | None:
    """Open the dataset, so a wrong name, split or column fails here, before a run writes anything;
    then its rows, all of them, where cheap to know (dataset_size; capped_rows gives those --limit
    reads). Parquet files are checked by their first file's
    footer (no image is read twice); other datasets by reading their first row.

    Raises:
        PipelineError: as iter_records.
    """
    _FOOTERS.clear()  # a footer is kept from this check to the read that follows it, never longer
    path = Path(spec.name)
    parquet: list[Any] = list(_local_parquet_files(path, spec.split))
    opener: Callable[[Any], AbstractContextManager[Any]] = _open_local_file
    if not parquet and not path.exists() and is_hub_id(spec.name):
        parquet, opener = list(_hub_split(spec).parquet_files), _hub_file_opener()
    if parquet:
        with opener(parquet[0]) as source:
            footer = _parquet_footer(parquet[0], source)
        if opener is not _open_local_file:
            _FOOTERS[str(parquet[0])] = footer  # a remote footer is kept for the read that follows
        check_columns(spec, footer.schema.to_arrow_schema())
    elif _image_folder(spec) is not None:  # its split checked
        if spec.id_column:
            raise UsageError(
                f"{path} is a folder of images: --id-column takes a column of a parquet or saved dataset, and a "
                "folder's metadata.csv values are kept as metadata only (--group-by COLUMN gives one result per "
                "product). Drop the flag: without it, --update knows each photo by its content, and follows a photo "
                "renamed or moved"
            )
    else:
        records = iter_records(spec, 0)
        try:
            next(records, None)
        finally:
            records.close()
    return dataset_size(spec)


def count_rows(spec: DatasetSpec) -> int | None:
    """Number of rows that will be read (for progress bars), when it is cheap to know."""
    return capped_rows(dataset_size(spec), spec.limit)


def capped_rows(size: int | None, limit: int | None) -> int | None:
    """The rows of a dataset of `size` rows (None: not known) that --limit reads."""
    if size is None:
        return limit
    return size if limit is None else min(size, limit)


def dataset_size(spec: DatasetSpec) -> int | None:
    """The dataset's rows, whatever --limit, where cheap to know (a folder's listing, parquet
    footers, the hub's dataset card); None otherwise."""
    path = Path(spec.name)
    n: int | None = None
    if (root := _image_folder(spec)) is not None:
        n = len(list_pictures(root))
    elif files := _local_parquet_files(path, spec.split):
        n = sum(_parquet_footer(f, f).num_rows for f in files)
    elif not path.exists() and is_hub_id(spec.name):
        n = _hub_split(spec).num_rows  # from the dataset card: no shard is opened to count
    return n


def is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "/"))


# ----------------------------------------------------------------------------- image folders
def _is_image_folder(path: Path) -> bool:
    # The name is checked before the file system: one stat per table-named entry, not per image.
    has_tables = any(p.suffix in _TABLE_SUFFIXES and p.name not in FOLDER_METADATA_FILES and p.is_file()
                     for p in path.rglob("*"))  # an ImageFolder's metadata.parquet is its pictures' metadata
    return not has_tables and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file()


# The folder names the Hugging Face ImageFolder takes for a split (datasets' split keywords), at the top
SPLIT_FOLDERS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                 "test": ("test", "testing", "eval", "evaluation")}


def _split_folders(path: Path) -> tuple[dict[str, Path], list[os.DirEntry]]:
    """split -> its top-level subfolder of an image folder laid out by split (`train/`, `test/`, ...),
    and the folder's top-level entries (hidden ones aside), listed once for what belongs to no split."""
    with os.scandir(path) as listing:
        entries = [e for e in listing if not e.name.startswith(".")]
    names = {e.name: Path(e.path) for e in entries if e.is_dir()}
    found = {}
    for split, keywords in SPLIT_FOLDERS.items():
        for keyword in keywords:
            if keyword in names:
                found[split] = names[keyword]
                break
    return found, entries


def _image_folder(spec: DatasetSpec) -> Path | None:
    """The folder an image-folder dataset's pictures are read from: its split's subfolder where it is
    laid out by split (as the Hugging Face ImageFolder reads it: each split's pictures, labels and
    metadata.csv under `train/`, `test/`, ...), else the folder itself, all "train". None when
    --dataset is not an image folder. PipelineError for a split it does not have."""
    path = Path(spec.name)
    if not (path.is_dir() and _is_image_folder(path)):
        return None
    splits, entries = _split_folders(path)
    if spec.split in splits:
        if (str(path), spec.split) not in _SAID:
            _say_once(path, spec.split, _outside_splits(entries, splits))
        return splits[spec.split]
    if splits:
        folders = ", ".join(sorted(f"{p.name}/" for p in splits.values()))
        raise PipelineError(f"{path} has splits {sorted(splits)} (its subfolders {folders}), not {spec.split!r}; "
                            "choose one with --split")
    if spec.split != "train" and (str(path), spec.split) not in _SAID:  # read whole, as before splits were read
        named = ", ".join(f"{k[0]}/" for k in SPLIT_FOLDERS.values())
        _say_once(path, spec.split, f"has no split subfolders ({named}): every picture is read, as split 'train' "
                                    f"would be, not split {spec.split!r} alone")
    return path


_SAID: set[tuple[str, str]] = set()


def _say_once(path: Path, split: str, said: str) -> None:
    """A warning about how an image folder is read for a split, once a process (it is opened several times)."""
    if said and (str(path), split) not in _SAID:
        _SAID.add((str(path), split))
        log.warning("%s %s", path, said)


def _outside_splits(entries: list[os.DirEntry], splits: dict[str, Path]) -> str:
    """What of a folder laid out by split (its top-level `entries`) no split reads: its top-level
    pictures and other subfolders."""
    inside = {p.name for p in splits.values()}
    loose = sum(1 for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
    others = sorted(e.name for e in entries if e.is_dir() and e.name not in inside)
    parts = ([f"{loose} picture(s) at its top"] if loose else []) + ([f"its folders {', '.join(others)}"] if others
                                                                     else [])
    return (f"is laid out by split ({', '.join(sorted(inside))}): {' and '.join(parts)} belong to none and are not "
            "read") if parts else ""


def _natural_key(rel: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", rel)]


def list_pictures(root: Path) -> list[str]:
    """The pictures of a folder as a gallery reads them (_walk): paths relative to it."""
    return _walk(root)[0]


def _walk(root: Path | str, pictures: bool = True) -> tuple[list[str], list[Path]]:
    """The pictures of a folder (paths relative to it, in natural order: img_2 before img_10
    whatever the padding; none listed without `pictures`) and its metadata files
    (FOLDER_METADATA_FILES, the root's first, then by folder), hidden folders and files aside: one
    walk of the tree for both. A linked folder is walked as a folder, once (a link back up the tree
    is not followed again)."""
    rels, metadata = [], []
    # the tree's own folders, wherever they are in it (listed once the first linked folder is met,
    # a second walk a tree without links never pays): a link to one of them (a_latest -> z/2024,
    # listed before z) does not take its pictures under its own name
    seen: set[str] | None = None
    for dirpath, dirnames, filenames in _hidden_aside(os.walk(root, followlinks=True)):
        kept = []
        for d in sorted(dirnames):
            path = os.path.join(dirpath, d)
            if os.path.islink(path):  # a linked folder: walked once, unless it is one of the tree's own
                if seen is None:
                    seen = {os.path.realpath(p) for p, _, _ in _hidden_aside(os.walk(root))}
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
            kept.append(d)
        dirnames[:] = kept
        metadata += [Path(dirpath) / file for file in FOLDER_METADATA_FILES if file in filenames]
        for name in filenames if pictures else ():
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                rels.append(os.path.relpath(os.path.join(dirpath, name), root))
    rels.sort(key=_natural_key)
    return rels, metadata


def _hidden_aside(walk: Iterator[tuple[str, list[str], list[str]]]) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk with hidden folders left out (not walked into)."""
    for dirpath, dirnames, filenames in walk:
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield dirpath, dirnames, filenames


def _iter_image_folder(root: Path, spec: DatasetSpec, start: int, only: frozenset[int] | None = None
                       ) -> Iterator[Record]:
    rels = list_pictures(root)
    if not rels:
        raise PipelineError(
            f"{root} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) and no parquet/arrow files"
        )
    stop = len(rels) if spec.limit is None else min(len(rels), spec.limit)
    for i in range(start, stop) if only is None else sorted(r for r in only if start <= r < stop):
        yield _folder_record(root, i, rels[i])


def _folder_record(root: Path, row: int, rel: str) -> Record:
    """A listed picture of an image folder as its row, named as it can be written (printable_name)."""
    try:
        return Record(row, printable_name(rel), read_regular_file(root / rel))
    except OSError as e:
        return Record(row, printable_name(rel), None, f"cannot read file: {e.strerror or e}")


def dataset_stamp(spec: DatasetSpec) -> str | None:
    """What a resumed build knows the dataset by: the files it reads, each one's size and
    modification time, as "N file(s), B bytes, stamp H". An image folder: the pictures it reads (the
    first --limit of its listing: one added after them changes nothing read); a local parquet
    dataset: the split's files; a saved dataset or an .arrow file: its files. None where nothing is
    stamped: a hub dataset (its commit changes with any file of the repository, a README too) and
    pictures that a dataset's cells name by path."""
    import hashlib

    path = Path(spec.name)
    if not path.exists():
        return None
    if path.is_file():
        files = [(path.name, path)]
    elif (root := _image_folder(spec)) is not None:
        rels = list_pictures(root)
        files = [(rel, root / rel) for rel in (rels if spec.limit is None else rels[: spec.limit])]
    elif parquet := local_parquet_files(spec):
        files = [(str(f.relative_to(path)), f) for f in parquet]
    else:
        files = sorted((str(f.relative_to(path)), f) for f in path.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    digest, total = hashlib.sha256(), 0
    for rel, f in files:
        try:
            st = f.stat()
        except OSError as e:  # gone since it was listed, or a broken link: its row records the failure when read
            digest.update(f"{rel}\0unreadable {e.errno}\n".encode("utf-8", "surrogateescape"))
            continue
        total += st.st_size
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return f"{len(files)} file(s), {total:,} bytes, stamp {digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- local parquet
def _local_parquet_files(path: Path, split: str) -> list[Path]:
    """The parquet files of `split` in a local dataset (Hugging Face layout: files or folders named
    after the split; a folder with unnamed files is all "train"). [] when this is not one."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if not path.is_dir() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return []
    files = sorted((f for f in path.rglob("*.parquet") if f.name not in FOLDER_METADATA_FILES),  # an ImageFolder's
                   key=lambda f: _natural_key(str(f.relative_to(path))))
    if not files or next(path.rglob("*.arrow"), None) is not None:
        return []
    split_re = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    named = [f for f in files if split_re.search(str(f.relative_to(path)))]
    known = re.compile(r"(^|[/_.-])(train|test|validation|valid|dev)([/_.-]|$)")
    if named:
        return named
    if split == "train" and not any(known.search(str(f.relative_to(path))) for f in files):
        return files
    raise PipelineError(f"{path} has no parquet files for split {split!r}; choose one with --split")


def local_parquet_files(spec: DatasetSpec) -> list[Path]:
    """The parquet files iter_records reads this dataset from, in order, when it is a local parquet
    dataset; [] for any other kind (an image folder, a saved dataset, the hub)."""
    path = Path(spec.name)
    if path.is_dir() and _is_image_folder(path):
        return []
    return _local_parquet_files(path, spec.split)


def iter_parquet_file(spec: DatasetSpec, path: Path) -> Iterator[Record]:
    """Every row of one local parquet file, numbered from 0 within it (whatever spec's limit)."""
    return _iter_parquet([path], replace(spec, limit=None), 0, _open_local_file)


def hash_parquet_group(spec: DatasetSpec, pf: Any, group: int, first: int) -> list[tuple[Record, str]]:
    """The rows of one row group of an open local parquet file (pyarrow's ParquetFile; the group's
    first row numbered `first`), each as a Record without its bytes, with the sha256 of its bytes
    ("" without a picture): the sha256, item_id, error and linked that hashed(iter_parquet_file(...))
    gives for those rows, and as source the cell's own path ("" where it has none; no extra
    columns). A cell's bytes are hashed where pyarrow read them, 64 rows at a time, never copied
    into Python bytes, so that two threads can each take groups (pyarrow's read and hashlib let go
    of the GIL; figures in the README, "Reading the dataset"). Any other cell (no bytes: a path,
    nothing) is read as iter_parquet_file reads it."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    check_columns(spec, pf.schema_arrow)
    columns = [spec.image_column] + ([spec.id_column] if spec.id_column else [])
    out: list[tuple[Record, str]] = []
    row = first
    for batch in pf.iter_batches(batch_size=64, columns=columns, row_groups=[group], use_threads=False):
        image = batch.column(spec.image_column)
        cells, paths = image, None  # paths: each cell's own, its source in a build
        if pa.types.is_struct(image.type):
            fields = dict(zip((f.name for f in image.type), image.flatten()))  # with the struct's nulls
            cells = fields.get("bytes", image)
            paths = fields["path"].to_pylist() if "path" in fields else None
        binary = len(cells) > 0 and (pa.types.is_binary(cells.type) or pa.types.is_large_binary(cells.type))
        if binary:
            width = np.dtype(np.int64 if pa.types.is_large_binary(cells.type) else np.int32)
            at = cells.offset * width.itemsize
            offsets = np.frombuffer(cells.buffers()[1], width, count=len(cells) + 1, offset=at)
            data = memoryview(cells.buffers()[2] or b"")
            valid = arrow_numpy(cells.is_valid())
        ids = batch.column(spec.id_column).to_pylist() if spec.id_column else None
        for k in range(batch.num_rows):
            item_id = "" if ids is None or ids[k] is None else str(ids[k])
            if binary and valid[k] and offsets[k + 1] > offsets[k]:
                sha = hashlib.sha256(data[offsets[k] : offsets[k + 1]]).hexdigest()
                out.append((Record(row, (paths[k] or "") if paths else "", None, item_id=item_id), sha))
            else:
                rec = _record_from_cell(row, "", image[k].as_py())
                sha = hashlib.sha256(rec.data).hexdigest() if rec.data is not None else ""
                out.append((Record(row, rec.source, None, rec.error, item_id=item_id, linked=rec.linked), sha))
            row += 1
    return out


def _open_local_file(path: str | Path) -> AbstractContextManager[Any]:
    return nullcontext(path)


def _read_footer(source: Any):
    """A parquet file's metadata, read with two exact reads (its length, then the footer) when
    `source` is a remote file object; pyarrow alone reads the last 64 KiB, often more than the
    rows a small --limit needs. Local paths: None (pyarrow reads them itself)."""
    if isinstance(source, (str, Path)):
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    source.seek(-8, os.SEEK_END)
    tail = source.read(8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise PipelineError(f"{getattr(source, 'path', source)} is not a parquet file (no PAR1 footer)")
    length = int.from_bytes(tail[:4], "little")
    source.seek(-(8 + length), os.SEEK_END)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + source.read(length) + tail))


def _iter_parquet(
    files: Sequence[Any], spec: DatasetSpec, start: int, open_file: Callable[[Any], AbstractContextManager[Any]],
    only: frozenset[int] | None = None,
) -> Iterator[Record]:
    """Parquet read with pyarrow directly: only the columns used, and only the row groups that
    hold rows start .. limit-1 (and, with `only`, one of those rows), a few rows at a time.
    `open_file` turns an entry of `files` into what pyarrow opens (a local path, or a file on the
    hub read by HTTP ranges).

    Not through datasets' streaming reader: iterating it while decoding each image grew resident
    memory with the number of rows, whereas pyarrow's iter_batches without pre-buffering stays
    flat; on the hub, that reader also downloads every row group of each shard it opens,
    whatever the limit.
    """

    stop = spec.limit
    wanted = None if only is None else sorted(only)
    row = 0  # the dataset row of the current file's first row
    for f in files:
        if stop is not None and row >= stop:
            return
        try:
            with open_file(f) as source:
                pf = _open_parquet(f, source, _footer(f, source))
                check_columns(spec, pf.schema_arrow)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                at = row
                for g, n in enumerate(sizes):
                    lo, hi = max(at, start), at + n if stop is None else min(at + n, stop)
                    if lo < hi and (wanted is None or _holds(wanted, lo, hi)):
                        yield from _group_records(pf, g, at, spec, start, stop, only)
                    at += n
        except PipelineError:
            raise
        except Exception as e:  # the hub's file read lazily, range by range: a 404, a cut or refused connection
            if not str(f).startswith("hf://"):
                raise
            raise PipelineError(
                f"reading {f} from the Hugging Face hub failed ({type(e).__name__}: {first_line(e)[:200]}); "
                "run the same command again (a build resumes from its last complete shard)"
            ) from e
        row += sum(sizes)


def _holds(wanted: list[int], lo: int, hi: int) -> bool:
    """Some of the sorted rows `wanted` lie in lo .. hi-1."""
    i = bisect_left(wanted, lo)
    return i < len(wanted) and wanted[i] < hi


def _group_records(pf: Any, group: int, first: int, spec: DatasetSpec, start: int, stop: int | None,
                   only: frozenset[int] | None) -> Iterator[Record]:
    """The records of one row group (its first row is dataset row `first`) within start .. stop-1
    and `only`, read a few rows at a time."""
    for batch in pf.iter_batches(batch_size=64, columns=spec.columns, row_groups=[group]):
        cols = {c: batch.column(c).to_pylist() for c in spec.columns}
        for k in range(batch.num_rows):
            if stop is not None and first >= stop:
                return
            if first >= start and (only is None or first in only):
                yield _row_record(spec, first, _cell_of(cols, k))
            first += 1


# ----------------------------------------------------------------------------- Hugging Face datasets
def _import_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PipelineError("reading this dataset needs the 'datasets' package: pip install datasets") from e
    # We only read encoded bytes, never tensors. Left on, datasets' streaming IterableDataset imports
    # torch (1-2 s, ~300 MiB) just to share an epoch counter with DataLoader workers, which would
    # make the torch-free ONNX path load torch anyway.
    datasets.config.TORCH_AVAILABLE = False
    return datasets


def _parquet_options(spec: DatasetSpec) -> dict[str, Any]:
    """Options for datasets' parquet reader: read only the image column, and do not pre-buffer.

    With pyarrow's default pre_buffer=True, reading a parquet file front to back keeps every column
    chunk it has read, so resident memory grows by the size of the data; with pre_buffer=False it
    stays flat whatever N.
    """
    import pyarrow.dataset as pds

    return {
        "columns": spec.columns,
        "fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False),
    }


def _load_streaming(datasets, path: str, spec: DatasetSpec, **kw):
    """load_dataset(streaming=True) with the parquet options when the builder takes them."""
    try:
        ds = datasets.load_dataset(path, streaming=True, **kw, **_parquet_options(spec))
    except (ValueError, TypeError) as e:
        if "fragment_scan_options" not in str(e) and "columns" not in str(e):
            raise
        return datasets.load_dataset(path, streaming=True, **kw)
    if ds.features is not None and any(c not in ds.features for c in spec.columns):
        # Projected onto a missing column: open it plainly so the error can list the real columns.
        return datasets.load_dataset(path, streaming=True, **kw)
    return ds


@dataclass(frozen=True)
class HubSplit:
    """A hub dataset's split as datasets resolves it (README configs, file patterns, revision).

    parquet_files: the split's shards as hf:// paths, pinned to the resolved commit, in order;
        empty when the split is not (only) parquet and datasets' streaming reader must read it.
    num_rows: the split's size from the dataset card, when it says.
    """

    parquet_files: tuple[str, ...]
    num_rows: int | None


OFFLINE_ADVICE = "Without network access"  # where a hub error's advice begins (an export's warning leaves it out)


def _hub_open_error(spec: DatasetSpec, e: BaseException) -> str:
    """Why a dataset could not be opened from the hub; a name of one word may be a local folder
    mistyped or looked for from another folder, so where it was looked for is said too."""
    said = f"cannot open dataset {spec.name!r} from the Hugging Face hub ({type(e).__name__}: {first_line(e)})"
    if "/" not in spec.name:
        said += f", and there is no folder or file {spec.name!r} in {Path.cwd()}"
    from .hub import run_hub_names  # hub.py builds on this module

    model = next((name for name in run_hub_names() if name.startswith("--model ")), None)
    also = (f"; this run's {model} comes from the hub too: pass a local one with --model DIR (a folder its "
            "save_pretrained wrote)" if model else "")
    return (said + f". {OFFLINE_ADVICE}, pass a local copy with --dataset DIR (a folder of your own pictures "
            f"will do){also}.")


@lru_cache(maxsize=8)
def _hub_split(spec: DatasetSpec) -> HubSplit:
    """Resolve the split's data files without reading any of them (cached: count and read share it)."""
    datasets = _import_datasets()
    try:
        builder = datasets.load_dataset_builder(spec.name, spec.config)
    except ValueError as e:
        if "Config name is missing" not in str(e) and "BuilderConfig" not in str(e):
            raise PipelineError(_hub_open_error(spec, e)) from e
        configs = re.search(r"available(?: configs)?: (\[[^\]]*\])", str(e), re.IGNORECASE)
        listed = f" {configs[1]}" if configs else ""
        if spec.config:  # a name it does not have
            raise PipelineError(f"dataset {spec.name!r} has no configuration {spec.config!r}; it has"
                                f"{listed or ' others'}: choose one with --config") from e
        raise PipelineError(  # the hub answered: no network advice
            f"dataset {spec.name!r} has several configurations{listed} and no default one: choose one with "
            "--config NAME"
        ) from e
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise PipelineError(_hub_open_error(spec, e)) from e
    files = (builder.config.data_files or {}).get(spec.split)
    if files is None:
        raise PipelineError(
            f"dataset {spec.name!r} has splits {sorted(builder.config.data_files or {})}, not {spec.split!r}; choose "
            f"one with --split"
        )
    splits = builder.info.splits or {}
    num_rows = splits[spec.split].num_examples if spec.split in splits and splits[spec.split].num_examples else None
    parquet = tuple(str(f) for f in files) if files and all(str(f).endswith(".parquet") for f in files) else ()
    return HubSplit(parquet, num_rows)


def _hub_file_opener() -> Callable[[str], AbstractContextManager[Any]]:
    """Open hf:// files for random access with one HTTP range request per read and no read-ahead.

    fsspec's default cache reads ahead 5 MiB per request; with cache_type "none" pyarrow's reads
    (the footer, then one column chunk per row group and column) are fetched exactly.
    """
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()

    def open_file(path: str):
        try:
            return fs.open(path, "rb", block_size=1 << 20, cache_type="none")
        except Exception as e:  # 404, auth, network
            raise PipelineError(
                f"cannot open {path} on the Hugging Face hub ({type(e).__name__}: {first_line(e)})"
            ) from e

    return open_file


def _open_hub(spec: DatasetSpec):
    """datasets' streaming reader, for hub datasets whose split is not parquet files."""
    datasets = _import_datasets()
    try:
        return _load_streaming(datasets, spec.name, spec, split=spec.split, name=spec.config)
    except ValueError as e:
        raise PipelineError(f"dataset {spec.name!r}: {e}") from e
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise PipelineError(_hub_open_error(spec, e)) from e


def _open_local(path: Path, spec: DatasetSpec):
    datasets = _import_datasets()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise PipelineError(f"{path} has splits {list(ds)}, not {spec.split!r}; choose one with --split")
                ds = ds[spec.split]
            return ds
        if path.is_file():
            kind = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
            if kind is None:
                raise PipelineError(f"{path}: expected a folder, a .parquet or an .arrow file")
            return _load_streaming(datasets, kind, spec, data_files=str(path), split="train")
        return _load_streaming(datasets, str(path), spec, split=spec.split)
    except PipelineError:
        raise
    except ValueError as e:
        raise PipelineError(f"cannot read dataset {path}: {e}. Check --split (asked for {spec.split!r}).") from e
    except Exception as e:
        raise PipelineError(f"cannot read dataset {path} ({type(e).__name__}: {e})") from e


def _iter_hf(ds, spec: DatasetSpec, start: int) -> Iterator[Record]:
    datasets = _import_datasets()
    features = ds.features
    columns = spec.columns
    if features is not None:
        check_columns(spec, features)
    for col in columns:
        if features is not None and isinstance(features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    ds = ds.select_columns(columns)
    if isinstance(ds, datasets.Dataset):
        stop = len(ds) if spec.limit is None else min(len(ds), spec.limit)
        rows = (ds[i] for i in range(start, stop))
    else:
        if spec.limit is not None:
            ds = ds.take(spec.limit)
        if start:
            ds = ds.skip(start)
        rows = iter(ds)
    for i, row in enumerate(rows, start=start):
        yield _row_record(spec, i, row.get)


def check_columns(spec: DatasetSpec, names: Any, flags: dict[str | None, str] | None = None) -> None:
    """Every column the dataset is read with is one of `names` (a file's columns: their names, a
    pyarrow schema or a datasets Features); else a PipelineError that names them (`flags`: a hint for
    a column another flag chose). Given the columns' types, the image column must be able to hold a
    picture: a column of numbers named by --image-column is refused here, not found by failing every row."""
    hints = {spec.image_column: "Choose one with --image-column.", spec.id_column: "Choose one with --id-column.",
             **(flags or {})}
    import pyarrow as pa

    typed = getattr(names, "arrow_schema", names)  # a datasets Features: its arrow schema, made once
    typed = typed if isinstance(typed, pa.Schema) else None
    names = list(typed.names if typed is not None else names)
    for col in spec.columns:
        if col not in names:
            hint = hints.get(col, "Check the evaluation column names.")
            raise PipelineError(f"dataset {spec.name!r} has no column {col!r}; its columns are {sorted(names)}. {hint}")
    held = _unpictured_type(typed, spec.image_column) if typed is not None else None
    if held is not None:
        able = [n for n in names if n != spec.image_column and _unpictured_type(typed, n) is None]
        raise PipelineError(
            f"dataset {spec.name!r}'s column {spec.image_column!r} holds {held} values, not pictures (an image, "
            f"its bytes or a path). " + (f"Columns that can hold pictures: {sorted(able)}; choose one with "
                                         "--image-column." if able else "No column of it can hold pictures.")
        )


def _unpictured_type(typed: Any, column: str) -> str | None:
    """The type of `column` in a pyarrow schema when it cannot hold a picture (as _record_from_cell
    reads one: bytes, a path, or a struct of bytes and/or path: an Image feature's), else None."""
    import pyarrow as pa

    try:
        kind = typed.field(column).type
    except KeyError:  # a name the file holds twice: its cells are read as before, each row said
        return None
    if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind) or pa.types.is_null(kind) or pa.types.is_dictionary(kind)
            or pa.types.is_fixed_size_binary(kind) or getattr(pa.types, "is_binary_view", lambda _: False)(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        return None
    if pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} & {"bytes", "path"}:
        return None
    return str(kind)


def _row_record(spec: DatasetSpec, i: int, cell: Callable[[str], Any]) -> Record:
    """Row i as a Record: its image cell, plus the extra columns asked for (`cell(column)` reads one)."""
    rec = _record_from_cell(i, f"{spec.label or spec.name}[{i}]", cell(spec.image_column))
    if spec.extra_columns:
        rec = replace(rec, extra={c: _extra_value(cell(c)) for c in spec.extra_columns})
    if spec.id_column:
        value = cell(spec.id_column)
        rec = replace(rec, item_id="" if value is None else str(value))
    return rec


def _cell_of(columns: dict[str, list[Any]], k: int) -> Callable[[str], Any]:
    """Row k's cell in a column, for _row_record (a dict per row cost 0.3 s at 10,000 rows)."""
    return lambda name: columns[name][k]


def _extra_value(cell: Any) -> Any:
    """Image cells become their bytes (None if absent); other values pass through."""
    if isinstance(cell, dict) and ("bytes" in cell or "path" in cell):
        rec = _record_from_cell(-1, "", cell)
        return rec.data
    return cell


def _record_from_cell(i: int, source: str, cell: Any) -> Record:
    """An image cell is {'bytes': ..., 'path': ...} (Image(decode=False)), raw bytes, or a path."""
    if cell is None:
        return Record(i, source, None, "row has no image (empty cell)")
    if isinstance(cell, (bytes, bytearray)):
        return Record(i, source, bytes(cell))
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:  # b"" too: an empty file, not "look at the path" (as datasets reads it)
            return Record(i, cell.get("path") or source, bytes(cell["bytes"]))
        if cell.get("path"):
            cell = cell["path"]
        else:
            return Record(i, source, None, "row has no image (no bytes and no path)")
    if isinstance(cell, str):
        try:
            return Record(i, cell, read_regular_file(cell), linked=True)
        except OSError as e:
            return Record(i, cell, None, f"cannot read {cell}: {e.strerror or e}", linked=True)
    return Record(i, source, None, f"image cell of unexpected type {type(cell).__name__}")


# ----------------------------------------------------------------------------- pieces (parallel reading)
@dataclass(frozen=True)
class Piece:
    """A part of a dataset one worker reads on its own: one parquet row group, or a run of image
    files; `first_row` is the dataset row of its first record, `rows` how many records it yields."""

    kind: str  # "parquet" | "folder"
    location: str  # parquet file (local path or hf:// path), or the image folder
    first_row: int
    rows: int
    group: int = -1  # parquet row group
    offset: int = 0  # parquet: records of the group before first_row (a piece cut inside a group)
    names: tuple[str, ...] = ()  # image files, relative to the folder

    def cut(self, start: int, stop: int) -> Piece:
        """The part of this piece that holds dataset rows start .. stop-1."""
        skip = start - self.first_row
        names = self.names[skip : skip + stop - start] if self.names else ()
        return Piece(self.kind, self.location, start, stop - start, self.group, self.offset + skip, names)


def check_pieces(spec: DatasetSpec) -> None:
    """UsageError, before a Ray build starts Ray or writes anything, for a dataset its workers cannot
    read in pieces (a save_to_disk folder, a loading script's dataset)."""
    if _image_folder(spec) is None:
        _parquet_for_pieces(spec)


def _parquet_for_pieces(spec: DatasetSpec) -> tuple[list[str], Callable[[str], AbstractContextManager[Any]]]:
    path = Path(spec.name)
    if files := _local_parquet_files(path, spec.split):
        return [str(f) for f in files], _open_local_file
    if not path.exists() and is_hub_id(spec.name) and _hub_split(spec).parquet_files:
        return list(_hub_split(spec).parquet_files), _hub_file_opener()
    raise UsageError(
        f"--engine ray reads parquet datasets (a folder or the hub) and image folders; {spec.name!r} is neither: "
        "use --engine local, or convert it to parquet (datasets' Dataset.to_parquet)"
    )


def plan_pieces(spec: DatasetSpec, rows_per_piece: int = 256) -> list[Piece]:
    """Cut rows 0 .. limit-1 into pieces that workers can read in parallel, each record keeping its
    dataset row. Parquet datasets (local or on the hub) and image folders only.

    Raises:
        UsageError: another format (a save_to_disk folder, arrow files, a hub dataset that is not
            parquet), which only the local engine reads.
    """

    stop = spec.limit
    if (root := _image_folder(spec)) is not None:
        rels = list_pictures(root)[:stop]
        return [
            Piece("folder", str(root), s, len(rels[s : s + rows_per_piece]), names=tuple(rels[s : s + rows_per_piece]))
            for s in range(0, len(rels), rows_per_piece)
        ]
    located, opener = _parquet_for_pieces(spec)
    pieces, row = [], 0
    for f in located:
        if stop is not None and row >= stop:
            break
        with opener(f) as source:
            pf = _open_parquet(f, source, _footer(f, source))
            check_columns(spec, pf.schema_arrow)
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                take = n if stop is None else max(0, min(n, stop - row))
                if take:
                    pieces.append(Piece("parquet", f, row, take, group=g))
                row += n
    return pieces


def read_piece(spec: DatasetSpec, piece: Piece) -> Iterator[Record]:
    """The records of one piece, with their dataset rows."""

    if piece.kind == "folder":
        root = Path(piece.location)
        for k, rel in enumerate(piece.names):
            yield _folder_record(root, piece.first_row + k, rel)
        return
    opener = _hub_file_opener() if piece.location.startswith("hf://") else _open_local_file
    columns = spec.columns
    with opener(piece.location) as source:
        pf = _open_parquet(piece.location, source, _read_footer(source))
        row = piece.first_row - piece.offset  # the dataset row of the group's first record
        for batch in pf.iter_batches(batch_size=64, columns=columns, row_groups=[piece.group]):
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for k in range(batch.num_rows):
                if row >= piece.first_row + piece.rows:
                    return
                if row >= piece.first_row:
                    yield _row_record(spec, row, _cell_of(cols, k))
                row += 1


# ----------------------------------------------------------------------------- metadata columns
RESERVED_META = frozenset({"source_row"})  # the metadata table's key (metadata.py): never a dataset column


def scalar_columns(schema: Any, spec: DatasetSpec) -> list[str]:
    """The columns of a dataset's arrow schema that hold one plain value per row (text, number,
    true/false, date): what a gallery keeps as metadata. Images, bytes, lists and structs are not."""
    import pyarrow as pa

    def plain(t: Any) -> bool:
        if pa.types.is_dictionary(t):
            return plain(t.value_type)
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t)
                or pa.types.is_decimal(t))

    return [f.name for f in schema if f.name != spec.image_column and f.name not in RESERVED_META and plain(f.type)]


def _chosen(available: list[str], asked: Sequence[str] | None, names: list[str], spec: DatasetSpec) -> list[str]:
    if asked is None:
        return available
    for c in asked:
        if c not in names:
            raise UsageError(
                f"--meta-columns: dataset {spec.name!r} has no column {c!r}; its columns are {sorted(names)}"
            )
        if c in RESERVED_META:
            raise UsageError(f"--meta-columns: {c!r} is the name the store keys its rows by; a dataset column "
                                "of that name cannot be kept as metadata (rename it in the dataset)")
        if c not in available:
            raise UsageError(f"--meta-columns: column {c!r} of {spec.name!r} holds no plain values (text, "
                                f"numbers, true/false, dates): it cannot be kept as metadata")
    return list(asked)


def _parquet_files(spec: DatasetSpec, folder: bool) -> tuple[list[Any], Callable[[Any], AbstractContextManager[Any]]]:
    """The dataset's parquet files (local, or on the hub) and how to open them; [] when it is not one."""
    path = Path(spec.name)
    files: list[Any] = [] if folder else list(_local_parquet_files(path, spec.split))
    opener: Callable[[Any], AbstractContextManager[Any]] = _open_local_file
    if not files and not path.exists() and is_hub_id(spec.name):
        files, opener = list(_hub_split(spec).parquet_files), _hub_file_opener()
    return files, opener


def check_meta_columns(spec: DatasetSpec, asked: Sequence[str] | None) -> Any:
    """--meta-columns names columns of plain values that the dataset has (its schema only: a
    parquet footer, or the first row of another format); PipelineError otherwise. Returns the
    schema of the columns that will be kept (None: the dataset keeps none), which a --filter is
    checked against before the build."""
    path = Path(spec.name)
    folder = path.is_dir() and _is_image_folder(path)
    files, opener = _parquet_files(spec, folder)
    if not files:
        table = read_metadata(spec, asked)  # not parquet: the same check, by reading the columns
        return None if table is None else table.schema
    import pyarrow as pa

    footers = _footers(files, opener, spec)
    schema = _union_schema(footers)
    kept = _agreeing(footers, _chosen(scalar_columns(schema, spec), asked, schema.names, spec), spec, asked)
    return pa.schema([schema.field(c) for c in kept])


def parquet_column_names(spec: DatasetSpec) -> list[str] | None:
    """The columns of a parquet dataset (local or on the hub), from its footers alone: what a run
    may check its column flags against before any model loads; None for another kind of dataset
    (a folder of pictures, a CSV), whose columns show when it is read."""
    path = Path(spec.name)
    files, opener = _parquet_files(spec, path.is_dir() and _is_image_folder(path))
    return _union_schema(_footers(files, opener, spec)).names if files else None


def _footers(files: list[Any], opener: Callable[[Any], AbstractContextManager[Any]], spec: DatasetSpec
             ) -> list[tuple[Any, Any]]:
    """(file, footer) of each parquet file a read of `spec` touches: every one, or those that hold
    rows under --limit. A remote footer is kept for the read that follows, as check_dataset does."""

    out, seen = [], 0
    for f in files:
        if spec.limit is not None and seen >= spec.limit:
            break
        with opener(f) as source:
            footer = _FOOTERS.get(str(f)) or _parquet_footer(f, source)
        if opener is not _open_local_file:
            _FOOTERS[str(f)] = footer
        out.append((f, footer))
        seen += footer.num_rows
    return out


def _union_schema(footers: list[tuple[Any, Any]]) -> Any:
    """Every column of the files, once: a column one shard lacks, or holds only nulls in (arrow's
    null type), takes its type from a shard that has values."""
    import pyarrow as pa

    fields: dict[str, Any] = {}
    for _, footer in footers:
        for f in footer.schema.to_arrow_schema():
            if f.name not in fields or pa.types.is_null(fields[f.name].type):
                fields[f.name] = f
    return pa.schema(list(fields.values()))


def _agreeing(footers: list[tuple[Any, Any]], columns: list[str], spec: DatasetSpec, asked: Sequence[str] | None,
              warn: bool = True) -> list[str]:
    """`columns` but those whose type the parquet files disagree on (int64 in one, text in another:
    no type holds both), each left out with a warning (warn); one of them asked by --meta-columns
    is refused (PipelineError), before the build."""
    import pyarrow as pa

    out = []
    schemas = [(f, footer.schema.to_arrow_schema()) for f, footer in footers]  # once a file, not a column
    for c in columns:
        fields = [(f, sch.field(c)) for f, sch in schemas if c in sch.names and not pa.types.is_null(sch.field(c).type)]
        try:
            pa.unify_schemas([pa.schema([field]) for _, field in fields], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kinds: dict[str, list[str]] = {}
            for f, field in fields:
                kinds.setdefault(str(field.type), []).append(Path(str(f)).name)
            said = "; ".join(f"{ty} in {', '.join(names[:2])}{', ...' if len(names) > 2 else ''}"
                             for ty, names in kinds.items())
            if asked is not None:
                raise PipelineError(f"--meta-columns: the parquet files of {spec.name!r} disagree on the type of "
                                    f"{c!r} ({said}); rewrite them with one schema, or keep other columns") from None
            if warn:
                log.warning("%s: the parquet files disagree on the type of the column %r (%s): it is left out of the "
                            "metadata; rewrite them with one schema to keep it", spec.name, c, said)
            continue
        out.append(c)
    return out


def read_metadata(spec: DatasetSpec, asked: Sequence[str] | None = None, warn: bool = True) -> Any:
    """The dataset's metadata columns (all plain ones, or those asked), rows 0 .. limit-1, as a
    pyarrow Table with a leading `source_row` column; None for a hub dataset that is not parquet
    and a folder of images with nothing to keep (`folder_metadata`). Only these columns are read."""
    import pyarrow as pa

    path = Path(spec.name)
    root = _image_folder(spec)  # an image folder's split folder (checked), else None
    folder = root is not None
    files, opener = _parquet_files(spec, folder)
    table = None
    if files:
        table = _parquet_metadata(files, opener, spec, asked, warn)
    elif path.exists() and not folder:
        ds = _open_local(path, spec)
        if isinstance(ds, _import_datasets().Dataset):
            schema = ds.features.arrow_schema
            columns = _chosen(scalar_columns(schema, spec), asked, schema.names, spec)
            stop = len(ds) if spec.limit is None else min(len(ds), spec.limit)
            table = ds.select_columns(columns).with_format("arrow")[:stop] if columns else pa.table({})
            table = table if columns else pa.table({"source_row": int64_array(range(stop))})
    elif root is not None:
        table = folder_metadata(root, spec, asked, warn)
    if table is None:
        if asked:
            raise PipelineError(f"--meta-columns: {metadata_none_why(spec.name)}: it has no columns to keep")
        return None
    if "source_row" not in table.column_names:
        table = table.add_column(0, "source_row", int64_array(range(table.num_rows)))
    return in_one_unicode_form(table)


def in_one_unicode_form(table: Any) -> Any:
    """The table with its texts and column names in NFC: a CSV written on a Mac decomposes 'é' into
    'e' and a combining accent, one typed elsewhere composes it; the two look the same and are the
    same text to Unicode, but a filter matched one half of a category and --group-by split a product
    in two. A column whose name would become another's keeps its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [unicodedata.normalize("NFC", n) for n in table.column_names]
    if len(set(names)) < len(names):
        names = list(table.column_names)
    columns = []
    for column in table.columns:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            column = pc.utf8_normalize(column, form="NFC")
        elif pa.types.is_dictionary(kind) and (pa.types.is_string(kind.value_type)
                                               or pa.types.is_large_string(kind.value_type)):
            column = pc.utf8_normalize(column.cast(kind.value_type), form="NFC").dictionary_encode()
        columns.append(column)
    return pa.table(columns, names=names).replace_schema_metadata(table.schema.metadata)


FOLDER_COLUMN = "folder"  # an image folder's metadata: each picture's subfolder
FOLDER_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # the Hugging Face ImageFolder's


def _holds_pictures(kind: Any) -> bool:
    """A parquet column of pictures as datasets writes them: a struct with a `bytes` field."""
    import pyarrow as pa

    return bool(pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)


def folder_metadata(root: Path, spec: DatasetSpec, asked: Sequence[str] | None = None, warn: bool = True) -> Any:
    """An image folder's metadata, rows as the folder is read (its pictures in natural order, the
    first --limit), or None when it has none:

    - `folder`: each picture's subfolder relative to the root ('' at the root; `dresses/summer`),
      where the folder has subfolders: a catalogue filed by category filters on it;
    - the columns of `metadata.csv`, `metadata.jsonl` or `metadata.parquet` files, at the root or in subfolders, as the
      Hugging Face ImageFolder reads them: one line per picture, its path relative to the metadata
      file's own folder in `file_name` (`train/metadata.csv` names `images/1.jpg` for
      `train/images/1.jpg`; types inferred: numbers, true/false, dates; a code written with leading
      zeros stays text); several files' columns side by side, a column one lacks missing for its
      pictures. A picture without a line has missing values, and a line naming no picture of the
      folder is left out, each said in a warning (warn: a second read of the same folder says
      nothing again)."""
    import pyarrow as pa

    with os.scandir(root) as entries:
        flat = not any(e.is_dir() and not e.name.startswith(".") for e in entries)
    if flat and not any((root / file).is_file() for file in FOLDER_METADATA_FILES):  # no column to read: the
        return None  # folder is not listed for it
    pictures, metadata_files = _walk(root)
    every = [rel.replace(os.sep, "/") for rel in pictures]
    keys = every if spec.limit is None else every[: spec.limit]
    columns: dict[str, Any] = {}
    if any("/" in k for k in every):  # all the pictures: the columns do not change with --limit
        columns[FOLDER_COLUMN] = pa.array([k.rpartition("/")[0] for k in keys], pa.string())
    sidecars = _folder_sidecars(root, metadata_files, spec)
    if sidecars:
        at: dict[str, int] = {}  # picture -> its line among every file's, in order
        where: list[tuple[str, int]] = []  # each of those lines: (its file, its data line)
        for name, lines in sidecars:
            base = name.rpartition("/")[0]  # the file's folder, relative to the root
            for i, f in enumerate(lines.column("file_name").to_pylist()):
                try:
                    key = _relative_key(str(f)) if f is not None else ""
                except ValueError as e:
                    raise PipelineError(f"{root / name}: data line {i + 1}: {e}") from None
                if not key:
                    raise PipelineError(f"{root / name}: data line {i + 1} has no file_name")
                key = _metadata_key(f"{base}/{key}" if base else key)
                if key in at:
                    other, j = where[at[key]]
                    lines_said = (f"data lines {j} and {i + 1}" if other == name else
                                  f"{root / other} data line {j} and {root / name} data line {i + 1}")
                    raise PipelineError(f"{root / name}: {key!r} is named by two lines ({lines_said}); each "
                                        "picture takes one")
                at[key] = len(where)
                where.append((name, i + 1))
        lines = _side_by_side(root, sidecars, warn)
        line_names = [_metadata_key(k) for k in every]  # each picture as a line names it
        take = pa.array([at.get(k) for k in line_names[: len(keys)]], pa.int64())
        unknown: dict[str, list[str]] = {}  # file -> its lines' file_names that name no picture (not one past --limit)
        for key in sorted(set(at) - set(line_names)):
            name = where[at[key]][0]
            unknown.setdefault(name, []).append(key[len(name.rpartition("/")[0]) + 1:] if "/" in name else key)
        for name, named in unknown.items() if warn else ():
            log.warning("%s: %d line(s) name no picture of the folder, left out (%s)", root / name, len(named),
                        ", ".join(repr(u) for u in named[:3]) + (", ..." if len(named) > 3 else ""))
        missing = take.null_count
        if missing and warn:
            first = next(k for k in line_names[: len(keys)] if k not in at)
            said = str(root / sidecars[0][0]) if len(sidecars) == 1 else f"{len(sidecars)} metadata files of {root}"
            log.warning("%s: %d picture(s) have no line (%r first): their values are missing", said, missing, first)
        for c in lines.column_names:
            if c != "file_name":
                columns[c] = lines.column(c).take(take)
    if not columns:
        return None
    table = pa.table({"source_row": int64_array(range(len(keys))), **columns})
    available = scalar_columns(table.schema, spec)
    if asked is None and not available:  # only columns of no plain values (all missing): none to keep
        return None
    kept = _chosen(available, asked, table.column_names, spec)
    return table.select(["source_row", *kept])


def is_image_folder(spec: DatasetSpec) -> bool:
    """Whether --dataset is a folder of pictures (not a parquet, arrow or saved dataset)."""
    return _image_folder(spec) is not None


def folder_column(spec: DatasetSpec, column: str) -> dict[int, Any] | None:
    """An image folder's values of one metadata column (a metadata.csv's, or `folder`: each picture's
    subfolder) by dataset row; None for a dataset of another kind, whose records carry their columns.
    PipelineError for a column the folder does not have."""
    root = _image_folder(spec)
    if root is None:
        return None
    table = folder_metadata(root, spec, warn=False)
    if table is None or column not in table.column_names:
        have = ", ".join(c for c in (table.column_names if table is not None else []) if c != "source_row")
        why = (f"its columns with values: {have}" if have else "its metadata files hold no values"
               if folder_metadata_files(root) else "it has no metadata.csv and no subfolders")
        if column == FOLDER_COLUMN:  # each picture's subfolder: a flat folder has none
            why = f"'{FOLDER_COLUMN}' is each picture's subfolder, and its pictures are in none; " + why
        raise PipelineError(f"the image folder {spec.name} has no column {column!r} with values ({why})")
    rows = table.column("source_row").to_pylist()
    return dict(zip(rows, table.column(column).to_pylist()))


def metadata_none_why(name: str) -> str:
    """Why a dataset has no metadata to keep, for the run's note."""
    path = Path(name)
    if path.is_dir() and _is_image_folder(path):
        return (f"{name} is a folder of pictures without subfolders or a metadata.csv (.jsonl, .parquet) with "
                "columns beside file_name")
    return f"{name} is a streamed dataset"


def _metadata_key(name: str) -> str:
    """A name as a metadata line gives it: in one Unicode form (NFC: macOS writes file names
    decomposed, 'u' + a combining diaeresis, a metadata file typed elsewhere has them composed), a
    name that is not UTF-8 as the pipeline writes it (caf%E9.jpg, printable_name)."""
    return unicodedata.normalize("NFC", printable_name(name))


def _relative_key(name: str) -> str:
    """A metadata line's file_name as a picture's key, normalised as the Hugging Face ImageFolder
    does (`os.path.normpath`, '/' separators: `./a.jpg`, `shirts//a.jpg` and `x/../a.jpg` name the
    same picture as `a.jpg`); '' for an empty one. ValueError, saying why, for a URL, an absolute
    path or one that leaves the metadata file's own folder (`../a.jpg`), as that reader refuses
    them: a line names a picture under its own file's folder only."""
    if not name.strip():
        return ""
    key = name.replace("\\", "/")
    if "://" in key:
        raise ValueError(f"its file_name '{name}' is a URL; a file_name is a picture's path relative to its "
                         "metadata file's folder")
    if key.startswith("/") or re.match(r"[A-Za-z]:/", key):
        raise ValueError(f"its file_name '{name}' is an absolute path; write it relative to its metadata file's "
                         "folder")
    key = posixpath.normpath(key)
    if key == ".":
        raise ValueError(f"its file_name '{name}' names its metadata file's folder, not a picture in it")
    if key == ".." or key.startswith("../"):
        raise ValueError(f"its file_name '{name}' leaves its metadata file's folder; name that picture in a "
                         "metadata file of a folder above it (the Hugging Face ImageFolder refuses this line too)")
    return key


def folder_metadata_files(name: str | Path) -> list[Path]:
    """The metadata.csv, metadata.jsonl and metadata.parquet files of --dataset NAME, at its root or in any subfolder
    (hidden ones aside, as the pictures), the root's first, then by folder."""
    return _walk(name, pictures=False)[1]


def _folder_sidecars(root: Path, found: list[Path], spec: DatasetSpec) -> list[tuple[str, Any]]:
    """(its path relative to the root, its table) of each of the folder's metadata files `found`."""
    files = [path.relative_to(root).as_posix() for path in found]
    by_folder: dict[str, list[str]] = {}
    for name in files:
        by_folder.setdefault(name.rpartition("/")[0], []).append(name.rpartition("/")[2])
    for folder, kinds in by_folder.items():
        if len(kinds) > 1:
            raise PipelineError(f"{root / folder if folder else root} has both {' and '.join(kinds)}: keep one "
                                "(the pictures' metadata)")
    return [(name, _folder_sidecar(root, name, spec)) for name in files]


def _side_by_side(root: Path, sidecars: list[tuple[str, Any]], warn: bool = True) -> Any:
    """The metadata files' tables one after the other, a column one file lacks missing for its lines.
    A column's types are made one where its values allow: whole numbers with decimals as decimals,
    dates with date-times as date-times, whole numbers in a file where another has text as text, as
    written (a code with leading zeros is text; said in a warning, as a filter then compares text).
    Refused, naming the column and the files, where they do not (true/false and text, decimals and
    text)."""
    import pyarrow as pa

    if len(sidecars) == 1:
        return sidecars[0][1]
    names = [name for name, _ in sidecars]
    tables = [t for _, t in sidecars]
    kinds: dict[str, dict[str, Any]] = {}  # column -> file -> type
    for name, t in zip(names, tables):
        for f in t.schema:
            kinds.setdefault(f.name, {})[name] = f.type
    for column, types in kinds.items():
        casts = []  # (which files' type, to what)
        if any(pa.types.is_string(ty) for ty in types.values()) and any(
                pa.types.is_integer(ty) for ty in types.values()):
            casts.append((pa.types.is_integer, pa.string()))
            if warn:
                log.warning("%s: the column %r is whole numbers in %s and text in %s: read as text in every file",
                            root, column, ", ".join(n for n, ty in types.items() if pa.types.is_integer(ty)),
                            ", ".join(n for n, ty in types.items() if pa.types.is_string(ty)))
        stamps = [ty for ty in types.values() if pa.types.is_timestamp(ty)]
        if stamps and any(pa.types.is_date(ty) for ty in types.values()):  # a CSV's dates, a JSONL's date-times
            casts.append((pa.types.is_date, stamps[0]))
        for k, name in enumerate(names):
            for which, to in casts:
                if name in types and which(types[name]):
                    i = tables[k].schema.get_field_index(column)
                    tables[k] = tables[k].set_column(i, column, tables[k].column(i).cast(to))
    for column in kinds:
        fields = [t.schema.field(column) for t in tables if column in t.column_names]
        try:
            pa.unify_schemas([pa.schema([f]) for f in fields], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            said = ", ".join(f"{t.schema.field(column).type} in {root / n}" for n, t in zip(names, tables)
                             if column in t.column_names)
            raise PipelineError(f"the metadata files of {root} cannot be read as one table: their column "
                                f"{column!r} is {said}; write its values alike in every file") from e
    return pa.concat_tables(tables, promote_options="permissive")


def _folder_sidecar(root: Path, name: str, spec: DatasetSpec) -> Any:
    """The table of the folder's metadata file `name` (relative to the root), checked."""
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(root / name)
        else:
            table = _read_csv_keeping_codes(root / name) if name.endswith(".csv") else _read_jsonl(root / name)
    except Exception as e:  # pyarrow's ArrowInvalid: a malformed line, mixed types, a column named twice
        raise PipelineError(f"{root / name}: cannot be read as a table: {first_line(e)}") from e
    names = table.column_names
    if "file_name" not in names:
        pictures = [f.name for f in table.schema if _holds_pictures(f.type)]
        if pictures:  # a parquet dataset that happens to be named as a folder's metadata
            raise PipelineError(
                f"{root / name} holds pictures itself (column {pictures[0]!r}): it is a parquet dataset, but the "
                f"name {Path(name).name} is an image folder's metadata (the Hugging Face ImageFolder's, which reads "
                "the pictures beside it); rename it, e.g. to data/train-00000-of-00001.parquet, to read it as a "
                "dataset")
        raise PipelineError(f"{root / name} has no file_name column (each picture's path relative to "
                            f"{(root / name).parent}); its columns are {names}")
    for c in (FOLDER_COLUMN, *sorted(RESERVED_META), spec.image_column):
        if c in names:
            raise PipelineError(f"{root / name}: its column {c!r} is a name the store keeps for itself (the "
                                "pictures' subfolders, the rows' key, the --image-column); rename it")
    import pyarrow as pa

    binary = [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if binary and not name.endswith(".parquet"):  # a parquet file's bytes are bytes (kept out as no plain value)
        raise PipelineError(f"{root / name}: the column(s) {binary} are not UTF-8 text; save the file as UTF-8 "
                            "(a spreadsheet's \"CSV UTF-8\")")
    return table


# pandas' default missing values (read_csv's na_values): pyarrow's own list lacks "None" and "<NA>",
# which pandas writes for a missing value of an object or nullable column.
PANDAS_NA = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def _read_csv_keeping_codes(path: Path) -> Any:
    """A CSV with its types inferred, but a column of whole numbers any of which is written with a
    leading zero (a product code `00123`) kept as text, as written; prices (`05.99`) stay numbers.
    An empty cell is a missing value in a text column too (and `NA`, `N/A`, `null`, `None`, `<NA>`,
    as in a number column: PANDAS_NA; pandas, which the Hugging Face ImageFolder reads a CSV with,
    reads them so)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                       null_values=PANDAS_NA))
    twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if twice:
        raise ValueError(f"the column(s) {twice} are named twice; each name takes one column")
    numeric = [f.name for f in table.schema if pa.types.is_integer(f.type)]
    if not numeric:
        return table
    texts = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types=dict.fromkeys(numeric, pa.string()), strings_can_be_null=True, null_values=PANDAS_NA))
    for c in numeric:
        written = texts.column(c).to_pylist()
        digits = (v.strip().lstrip("+-") for v in written if v is not None)
        if any(len(d) > 1 and d[0] == "0" for d in digits):
            table = table.set_column(table.column_names.index(c), c, texts.column(c))
    return table


def _read_jsonl(path: Path) -> Any:
    import pyarrow.json as pajson

    return pajson.read_json(path)


def int64_array(values: Sequence[int] | Any) -> Any:
    """A pyarrow int64 array of these integers (a sequence or a numpy array), made from a copy of
    their buffer: pa.array() on anything but an Arrow-protocol object imports pandas to ask whether
    it is one (0.35 s, for nothing here). Values that are not integers are refused, as pa.array
    refuses them."""
    import numpy as np
    import pyarrow as pa

    given = np.asarray(values)
    if given.size and given.dtype.kind not in "iu":
        raise TypeError(f"int64_array takes integers, not {given.dtype}")
    data = np.array(given, dtype=np.int64)  # a copy: the Arrow array does not share the caller's memory
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def arrow_numpy(values: Any) -> Any:
    """A pyarrow Array or ChunkedArray as a numpy array, to be read, not written: numbers without
    nulls straight from their buffer (read-only, as to_numpy's zero-copy arrays), booleans without
    nulls unpacked from theirs, anything else by to_numpy.
    pyarrow's to_numpy imports pandas on its first call, even for a plain int64 array (0.3 s)."""
    import numpy as np
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 1:
            return arrow_numpy(values.chunk(0))
        return np.concatenate([arrow_numpy(c) for c in values.chunks]) if values.num_chunks else values.to_numpy()
    t = values.type
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if values.null_count or not (numeric or pa.types.is_boolean(t)) or len(values) == 0:
        return values.to_numpy(zero_copy_only=False)
    data = values.buffers()[1]
    if not numeric:  # booleans: one bit each, least significant first
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[values.offset : values.offset + len(values)].astype(bool)
    kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
    dtype = np.dtype(f"{kind}{t.bit_width // 8}")
    return np.frombuffer(data, dtype, count=len(values), offset=values.offset * dtype.itemsize)


def _parquet_metadata(files: list[Any], opener: Callable[[Any], AbstractContextManager[Any]], spec: DatasetSpec,
                      asked: Sequence[str] | None, warn: bool = True) -> Any:
    import pyarrow as pa

    # the columns of every file read (a column the first lacks is one of them), each footer read once:
    # a remote file's by two exact reads (_read_footer), not pyarrow's 64 KiB tail read
    footers = _footers(files, opener, spec)
    schema = _union_schema(footers)
    plain = scalar_columns(schema, spec)
    columns = _agreeing(footers, _chosen(plain, asked, schema.names, spec), spec, asked, warn)
    if warn and asked is None:  # said once, by name: a user looking for a column in the hits learns why it is not
        unkept = [n for n in schema.names if n not in plain and n != spec.image_column and n not in RESERVED_META]
        if unkept:
            log.info("metadata: %s not kept: a column must hold one plain value a row (text, number, true/false, "
                     "date), not a list, a struct or bytes", ", ".join(repr(n) for n in unkept))
    parts, seen = [], 0
    for f, footer in footers:
        with opener(f) as source:
            pf = _open_parquet(f, source, footer)
            n = pf.metadata.num_rows if spec.limit is None else min(pf.metadata.num_rows, spec.limit - seen)
            groups, at = [], 0  # only the row groups that hold rows < limit (a hub file is read by ranges)
            for g in range(pf.num_row_groups):
                if at < n:
                    groups.append(g)
                at += pf.metadata.row_group(g).num_rows
            here = [c for c in columns or () if c in pf.schema_arrow.names]  # a shard may lack a column: nulls
            part = pf.read_row_groups(groups, columns=here).slice(0, n) if here else None
        rows = int64_array(range(seen, seen + n))
        parts.append(part.add_column(0, "source_row", rows) if part is not None else pa.table({"source_row": rows}))
        seen += n
    if not parts:
        return pa.table({"source_row": int64_array([])})
    try:  # shards written apart: int32 in one, int64 in another; a column one lacks
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise PipelineError(
            f"{spec.name!r}: its parquet files disagree on a metadata column's type ({first_line(e)}); keep the "
            "agreeing columns with --meta-columns, or rewrite the files with one schema"
        ) from None

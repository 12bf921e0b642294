"""What --update knows of a local parquet dataset without reading it again.

Per dataset (its folder and split), one JSON file in the user's cache
(`~/.cache/fashion-visual-search/dataset-hashes/`): for each parquet file, each row's sha256, id
(`--id-column`) and no-picture reason, the file's stat (size, modification and change times,
inode), and for each row group a digest of its stored bytes (xxh3-128, row_group_digests).

- A file whose stat is the one recorded is not read at all (as git's index trusts a file whose
  stat is unchanged).
- A file whose stat changed (rewritten with rows added or removed, say) has each row group's
  stored bytes hashed: the column chunks of the columns used, exactly the byte ranges pyarrow reads
  to decode them, with their codec and type. That reads the file but decodes nothing (far less
  than decoding every picture and hashing it: figures in the README). A group whose bytes a
  recorded group had keeps that group's rows; only the other groups are decoded, two at a time.
- A fresh build of such a dataset records what it read, so the first update after it pays no more
  than the next one.

Nothing is recorded of a file that changed while it was read, or whose cells name picture files
(their changes would show in neither the file's stat nor its bytes). A cache: never part of a
store, and losing it only costs a read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

from .dataset import (
    DatasetSpec,
    Record,
    check_columns,
    hash_parquet_group,
    iter_parquet_file,
    iter_records,
    local_parquet_files,
)
from .errors import PipelineError
from .fileio import atomic_write_text, read_json_dict, sha256_bytes, user_cache_dir

HASHES_DIR = "dataset-hashes"
READ_BYTES = 16 << 20  # row_group_digests reads a column chunk this much at a time


def hashes_file(spec: DatasetSpec) -> Path:
    """Where the record of this dataset (its folder and split) is kept."""
    key = hashlib.sha256(json.dumps([str(Path(spec.name).resolve()), spec.split]).encode()).hexdigest()[:32]
    return user_cache_dir(HASHES_DIR) / f"{key}.json"


def dataset_hashes(spec: DatasetSpec) -> Iterator[tuple[Record, str]]:
    """Every record of the dataset as it is now, in order, without its bytes, with their sha256 (""
    for a row without a picture). Local parquet files are read only as far as the record (above)
    does not already say what they hold; other datasets (the hub, image folders, saved datasets) are
    read and hashed whole."""
    files = local_parquet_files(spec)
    if not files:
        for rec, sha in hashed(iter_records(spec)):
            yield replace(rec, data=None), sha
        return
    import pyarrow.parquet as pq

    columns = _columns(spec)
    where = hashes_file(spec)
    known, record, seen = read_json_dict(where), {}, set()
    groups = _KnownGroups(known, columns)
    row, stop = 0, spec.limit
    for f in files:
        if stop is not None and row >= stop:
            break
        key, stamp = str(f.resolve()), _file_stamp(f)
        seen.add(key)
        entry: dict = {"stamp": stamp, "columns": columns}
        before: Any = known.get(key)
        if _recorded_as_is(before, stamp, columns):
            rows, entry["groups"] = before["rows"], before.get("groups")
        elif stop is not None and row + pq.read_metadata(f).num_rows > stop:  # the limit ends inside: read up to it
            records = islice(iter_parquet_file(spec, f), stop - row)
            rows = [_row(spec, rec, sha) for rec, sha in hashed(records)]
            entry = {}
        else:
            rows, entry["groups"], linked = _read_file(spec, f, groups)
            if linked or _file_stamp(f) != stamp:
                entry = {}
        if entry:
            record[key] = {**entry, "rows": rows}
        for sha, item_id, error, path in rows[: None if stop is None else stop - row]:
            yield Record(row, path, None, error, item_id=item_id), sha  # a cell's own path, else "" (no name)
            row += 1
    unseen = {str(f.resolve()) for f in files} - seen  # past a --limit: kept as they were known
    _save(where, known, {**{k: v for k, v in known.items() if k in unseen}, **record})


def known_as_is(spec: DatasetSpec) -> bool:
    """Whether the dataset is local parquet files that are all recorded as they are now (size,
    times, inode, columns): comparing it with a store then reads none of them."""
    files = local_parquet_files(spec)
    known, columns = read_json_dict(hashes_file(spec)), _columns(spec)
    return bool(files) and all(_recorded_as_is(known.get(str(f.resolve())), _file_stamp(f), columns) for f in files)


def record_build(spec: DatasetSpec, stamps: dict[str, list[int]], lines: Iterable[Any], linked: set[int]) -> int:
    """After a build that read every row of a local parquet dataset: record what it read (from its
    manifest lines: the cell's sha256, id and no-picture reason) for each file that lies whole
    within the limit and holds no row that named a picture file (`linked`, source rows). Nothing
    is recorded unless the dataset's files, in order, and each one's stamp are those taken before
    the build read them (`stamps`, from file_stamps): a file changed, added or removed meanwhile
    would number the rows otherwise than the build did. Returns how many files were recorded."""
    import pyarrow.parquet as pq

    files = local_parquet_files(spec)
    if [str(f.resolve()) for f in files] != list(stamps) or any(_file_stamp(f) != stamps[str(f.resolve())]
                                                                 for f in files):
        return 0
    first: dict[int, list] = {}
    for line in lines:  # a row's first line (a segmented row has one per person; all carry the cell's hash)
        if line.source_row not in first:
            first[line.source_row] = [line.source_sha256, line.item_id, "" if line.source_sha256 else line.error,
                                      _own_path(spec, line.source, line.source_row)]
    columns = _columns(spec)
    where = hashes_file(spec)
    known, record = read_json_dict(where), {}
    row = 0
    for f in files:
        if spec.limit is not None and row >= spec.limit:
            break
        n = pq.read_metadata(f).num_rows
        span = range(row, row + n)
        row += n
        key = str(f.resolve())
        if (spec.limit is not None and span.stop > spec.limit) or any(r in linked or r not in first for r in span):
            continue
        digests = row_group_digests(f, columns)
        if _file_stamp(f) == stamps[key]:
            rows = [first[r] for r in span]
            record[key] = {"stamp": stamps[key], "columns": columns, "groups": digests, "rows": rows}
    if file_stamps(spec) != stamps:  # a file changed while this ran: the row counts above may be another's
        return 0
    _save(where, known, {**known, **record})
    return len(record)


def file_stamps(spec: DatasetSpec) -> dict[str, list[int]]:
    """The stat of each local parquet file of the dataset, in the dataset's order, taken before a
    build reads it."""
    return {str(f.resolve()): _file_stamp(f) for f in local_parquet_files(spec)}


def row_group_digests(path: Path, columns: Sequence[str]) -> list[list] | None:
    """[digest, rows] for each row group of a local parquet file: the digest covers the stored
    bytes of every leaf column under `columns` (each column chunk's byte range as pyarrow computes
    it to read the chunk, with its path, codec and size), their parquet and Arrow schema (an Arrow
    type such as a timestamp's zone changes what the same bytes decode to), so two groups with the
    same digest decode to the same cells. The digest is xxh3-128 ("xxh3:" and 32 hex digits): it
    only tells a group from the groups recorded of the same dataset, and sha256 cost more than
    reading the bytes (figures in the README). A chance collision is out of reach; a file crafted
    to collide with a recorded group is not (xxh3 is not a cryptographic hash), and would keep that
    group's recorded rows: the record trusts the catalogue it is kept for. Rows of groups decoded
    keep their photos' sha256. Read by two threads, 16 MiB at a time (pread lets go of the GIL;
    not mmap: a file truncated while mapped would kill the process). None when the file cannot be
    read as parquet, or was written by a parquet-mr older than 1.2.9 (whose chunk sizes pyarrow pads
    when it reads them, PARQUET-816)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    try:
        md = pq.read_metadata(path)
        arrow = md.schema.to_arrow_schema()
    except (OSError, pa.ArrowException):
        return None
    if _old_parquet_mr(md.created_by or ""):
        return None
    used = [c for c in columns if c]
    leaves = [i for i in range(md.num_columns)
              if any(md.schema.column(i).path == c or md.schema.column(i).path.startswith(c + ".") for c in used)]
    schema = [str(md.schema.column(i)) for i in leaves]
    schema += [str(arrow.field(c)) + repr(arrow.field(c).metadata) for c in used if c in arrow.names]
    fd = os.open(path, os.O_RDONLY)
    try:
        def digest(g: int) -> list | None:
            group = md.row_group(g)
            h = xxhash.xxh3_128(json.dumps([group.num_rows, schema]).encode())
            for i in leaves:
                chunk = group.column(i)
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < start:
                    start = chunk.dictionary_page_offset
                size = chunk.total_compressed_size
                h.update(json.dumps([chunk.path_in_schema, chunk.compression, size]).encode())
                for at in range(start, start + size, READ_BYTES):
                    data = os.pread(fd, min(READ_BYTES, start + size - at), at)
                    if len(data) != min(READ_BYTES, start + size - at):
                        return None
                    h.update(data)
            return ["xxh3:" + h.hexdigest(), group.num_rows]

        with ThreadPoolExecutor(max_workers=2) as pool:
            digests = list(pool.map(digest, range(md.num_row_groups)))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if any(d is None for d in digests) else [d for d in digests if d is not None]


def _old_parquet_mr(created_by: str) -> bool:
    """Written by parquet-mr before 1.2.9, or by a parquet-mr whose version does not parse (pyarrow
    pads such files' column chunk ranges when it reads them)."""
    name, _, version = created_by.partition(" version ")
    if name.strip() != "parquet-mr":
        return False
    parts = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return parts is None or tuple(int(v or 0) for v in parts.groups()) < (1, 2, 9)


class _KnownGroups:
    """Digest -> rows of every row group the record holds (of any file of the dataset read with the
    same columns), made on first use."""

    def __init__(self, known: dict, columns: list[str]) -> None:
        self.known, self.columns = known, columns
        self._map: dict[str, list] | None = None

    def get(self, digest: str) -> list | None:
        if self._map is None:
            self._map = self._made()
        return self._map.get(digest)

    def _made(self) -> dict[str, list]:
        made: dict[str, list] = {}
        for entry in self.known.values():
            if not (isinstance(entry, dict) and entry.get("columns") == self.columns and _rows_ok(entry)):
                continue
            at = 0
            for d, n in entry.get("groups") or ():
                made[d] = entry["rows"][at : at + n]
                at += n
        return made


def _read_file(spec: DatasetSpec, f: Path, known: _KnownGroups) -> tuple[list, list | None, bool]:
    """A file whose stat changed: (its rows, its group digests, whether a cell named a picture file).
    Groups whose digest is known keep their recorded rows; the others are read and hashed, a group
    by two threads (_hash_groups). A file whose groups have no digests is read whole."""
    digests = row_group_digests(f, _columns(spec))
    if digests is None:
        read: dict[int, list] = {}
        linked = False
        for rec, sha in hashed(iter_parquet_file(spec, f)):
            read[rec.source_row] = _row(spec, rec, sha)
            linked = linked or rec.linked
        return [read[r] for r in sorted(read)], None, linked
    if not digests:  # no row group: nothing to read, but the columns asked for must be there
        import pyarrow.parquet as pq

        check_columns(spec, pq.read_schema(f))
    kept: list[list | None] = [known.get(d) for d, _ in digests]
    firsts = [0]
    for _, n in digests:
        firsts.append(firsts[-1] + n)
    fresh = _hash_groups(spec, f, [g for g, got in enumerate(kept) if got is None], firsts)
    rows: list = []
    linked = False
    for g, got in enumerate(kept):
        if got is None:
            got, any_linked = fresh[g]
            linked = linked or any_linked
        rows.extend(got)
    return rows, digests, linked


def _hash_groups(spec: DatasetSpec, f: Path, groups: list[int], firsts: list[int]) -> dict[int, tuple[list, bool]]:
    """Row groups of a local parquet file read and hashed by two threads, each with the file open
    once: group -> (its rows as recorded, whether a cell named a picture file)."""
    import pyarrow.parquet as pq

    if not groups:
        return {}
    local, opened = threading.local(), []

    def one(g: int) -> tuple[list, bool]:
        pf = getattr(local, "pf", None)
        if pf is None:
            pf = local.pf = pq.ParquetFile(f, pre_buffer=False)
            opened.append(pf)
        got = hash_parquet_group(spec, pf, g, firsts[g])
        if len(got) != firsts[g + 1] - firsts[g]:
            raise PipelineError(f"{f}: row group {g} read {len(got)} rows where its metadata says "
                                f"{firsts[g + 1] - firsts[g]}")
        return [_row(spec, rec, sha) for rec, sha in got], any(rec.linked for rec, _ in got)

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        return dict(zip(groups, pool.map(one, groups)))
    except BaseException:  # a group that cannot be read: the rest are not read for nothing
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        for pf in opened:
            pf.close()


def hashed(records: Iterable[Record], chunk: int = 64) -> Iterator[tuple[Record, str]]:
    """Each record with the sha256 of its bytes ("" without): hashed by two threads (hashlib lets go
    of the GIL) while the dataset is read on, in order."""

    def shas(recs: list[Record]) -> list[str]:
        return [sha256_bytes(r.data) if r.data is not None else "" for r in recs]

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=2) as pool:
        batch: list[Record] = []
        for rec in records:
            batch.append(rec)
            if len(batch) == chunk:
                pending.append((batch, pool.submit(shas, batch)))
                batch = []
                while len(pending) > 4:
                    recs, fut = pending.popleft()
                    yield from zip(recs, fut.result())
        if batch:
            pending.append((batch, pool.submit(shas, batch)))
        while pending:
            recs, fut = pending.popleft()
            yield from zip(recs, fut.result())


def _columns(spec: DatasetSpec) -> list[str]:
    return [spec.image_column, spec.id_column or ""]


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _recorded_as_is(before: Any, stamp: list[int], columns: list[str]) -> bool:
    """A file's record (`before`) is of the file as it is now (`stamp`), read for these columns."""
    return (isinstance(before, dict) and {k: v for k, v in before.items() if k not in ("rows", "groups")}
            == {"stamp": stamp, "columns": columns} and _rows_ok(before))


def _row(spec: DatasetSpec, rec: Record, sha: str) -> list:
    """A row as the record keeps it: [sha256, id, no-picture reason, the cell's own path ("" for a
    cell without one, which a build names "<dataset>[row]")]."""
    return [sha, rec.item_id, rec.error, _own_path(spec, rec.source, rec.source_row)]


def _own_path(spec: DatasetSpec, source: str, row: int) -> str:
    """A parquet cell's own path from its source: "" for the name a build gives a cell without one
    ("<dataset>[row]", `row` as the source was numbered)."""
    return "" if source == f"{spec.name}[{row}]" else source


def _rows_ok(entry: dict) -> bool:
    rows, groups = entry.get("rows"), entry.get("groups")
    if not (isinstance(rows, list) and all(isinstance(r, list) and len(r) == 4 for r in rows)):  # 3 before paths
        return False
    return groups is None or (isinstance(groups, list)
                              and all(isinstance(g, list) and len(g) == 2 and isinstance(g[1], int) for g in groups)
                              and sum(g[1] for g in groups) == len(rows))


def _save(where: Path, known: dict, record: dict) -> None:
    if record != known:
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(where, json.dumps(record))
        except OSError:  # no writable cache: read again next time
            pass

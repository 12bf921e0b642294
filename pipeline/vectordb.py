"""`--export KIND:DIR`: a gallery store taken to the vector database a shop runs, with its metadata.

- `lancedb:DIR`: an embedded LanceDB database, table `gallery` (vector column `vector`, cosine);
- `qdrant:DIR`: Qdrant's local mode (no server), collection `gallery` (cosine);
- `parquet:DIR`: one table in parts (`DIR/part_00000.parquet` ...) with an `embedding` column
  (list of float32) and the metadata, as autofaiss reads it (`--file_format parquet
  --embedding_column_name embedding`) and clip-retrieval's parquet inputs.

Each row is one item: `key` (stable across updates: the sha256 of the photo's bytes, its person
number and, for byte-identical copies, which copy it is), `file` (named by content, so stable too),
`source` (the photo's own path, for an image folder or a cell that carries one; else null), `person`,
the metadata columns, and a `digest` of its vector and values. The dataset row is not
exported: it is a position, which a removal upstream shifts for every item after it, so each of
them would be written again after every update; `file` and the catalogue's own id column say which
photo and product an item is. The embedder's identity and the store's
hash are kept in DIR/_fashion_export.json (its leading underscore keeps pyarrow, pandas and DuckDB,
which read a parquet folder whole, from taking it for a part; exports made before kept it as
fashion_export.json, read still and renamed at their next export); an export of vectors from
another embedder is refused.

Incremental: a second export into the same DIR compares digests and writes only what changed:
LanceDB deletes the removed and changed keys and inserts the new rows (merge_insert), Qdrant
deletes and upserts points, parquet rewrites only the parts whose rows changed and appends a part
for new rows. Nothing is rewritten when nothing changed.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import functools
import hashlib
import json
import logging
import math
import os
import re
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import PipelineError, UsageError
from .fileio import atomic_write_text, remove_temp_leftovers, temp_file_beside, unlink_quietly, waiting_lock
from .metadata import Metadata, narrow_float_columns, prefixed_name
from .store import ManifestRow

log = logging.getLogger(__name__)

KINDS = ("lancedb", "qdrant", "parquet")
TABLE = "gallery"
EXPORT_FILE = "_fashion_export.json"
EXPORT_LOCK = ".export-lock"  # held while an export writes the folder (removed after; its readers skip dot files)
OLD_EXPORT_FILE = "fashion_export.json"  # the record's name until 2026-12-06
PART_ROWS = 10_000
QDRANT_LOCAL_POINTS = 20_000  # qdrant-client's local mode warns past this many points: a server's work beyond
QDRANT_PAYLOAD = 2  # how a Qdrant export writes its payloads: 2, a narrow float as its shortest decimal


@dataclass(frozen=True)
class ExportTarget:
    kind: str
    folder: Path

    @classmethod
    def parse(cls, text: str) -> ExportTarget:
        kind, sep, folder = text.partition(":")
        if not sep or kind not in KINDS or not folder:
            raise UsageError(f"--export {text!r}: expected KIND:DIR with KIND one of {', '.join(KINDS)} "
                             "(e.g. lancedb:./shop.lance)")
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", folder):  # a Path would make s3://b/x a local folder s3:/b/x
            raise UsageError(f"--export {text!r}: an export is written to a local folder, not a URL; export to a "
                             "folder, then copy it (LanceDB and Qdrant read their own URLs: see their docs)")
        return cls(kind, Path(folder))


@dataclass
class ExportReport:
    target: ExportTarget
    added: int
    changed: int
    removed: int
    unchanged: int

    def line(self) -> str:
        return (f"{self.target.kind} at {self.target.folder}: added {self.added}, changed {self.changed}, "
                f"removed {self.removed}, unchanged {self.unchanged}")


def item_keys(rows: Sequence[ManifestRow]) -> list[str]:
    """A stable key per item: its photo's bytes (sha256), person number, and which byte-identical
    copy it is, in dataset order; a store made before --update (no sha) is keyed by its row."""
    seen: Counter[tuple[str, int]] = Counter()
    keys = []
    for r in rows:
        base = (r.source_sha256 or f"row{r.source_row}", r.person)
        keys.append(f"{base[0][:32]}:{r.person}:{seen[base]}")
        seen[base] += 1
    return keys


def export_table(embeddings: np.ndarray, rows: Sequence[ManifestRow], meta: Metadata | None) -> Any:
    """The items as a pyarrow Table: key, file, source, person, digest, the metadata, vector (in dataset order)."""
    import pyarrow as pa

    order = sorted(range(len(rows)), key=lambda j: (rows[j].source_row, rows[j].person))
    keys = item_keys([rows[j] for j in order])
    columns: dict[str, Any] = {
        "key": keys,
        "file": [rows[j].file for j in order],
        # text even when no photo has a path of its own (a parquet dataset's cells): not Arrow's null type
        "source": pa.array([source_of(rows[j]) for j in order], pa.string()),
        "person": pa.array([rows[j].person for j in order], pa.int64()),
    }
    if meta is not None:
        import pyarrow.compute as pc

        taken = meta.table.take(pa.array(order, pa.int64()))
        for name in taken.column_names:
            column = taken.column(name)
            if pa.types.is_floating(column.type):  # a NaN is a missing value to our filters: null there too
                column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
            columns[exported_name(name)] = column
    vectors = np.ascontiguousarray(embeddings[order], np.float32)
    table = pa.table(columns)
    # each row's, a batch at a time (the whole table's to_pylist held 0.7 GB of dicts at 1M rows)
    records = (values for batch in table.to_batches(max_chunksize=65_536) for values in batch.to_pylist())
    digests = [_digest(vectors[i], values) for i, values in enumerate(records)]
    table = table.append_column("digest", pa.array(digests))
    flat = pa.array(vectors.ravel(), pa.float32())
    return table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


# The export's columns, and those LanceDB adds to a search's results (a catalogue column named so
# made every vector search of the table fail on the clash)
OWN_COLUMNS = frozenset({"key", "file", "source", "source_row", "person", "digest", "vector", "embedding",
                         "_distance", "_rowid", "_score", "_relevance_score"})


def source_of(row: ManifestRow) -> str | None:
    """Where the photo came from, when that is a name of its own (a file of an image folder, or the
    path a dataset's image cell carries); None for a cell known only by its row ("dataset[12]"),
    which a removal upstream would shift."""
    return None if not row.source or row.source.endswith(f"[{row.source_row}]") else row.source


def exported_name(column: str) -> str:
    """A metadata column's name in the export (a catalogue column called `file` or `vector` is
    `meta_file`, `meta_vector`)."""
    return prefixed_name(column, OWN_COLUMNS)


def _digest(vector: np.ndarray, values: dict[str, Any]) -> str:
    h = hashlib.sha256(vector.tobytes())
    h.update(json.dumps(values, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _check_identity(target: ExportTarget, identity: dict[str, Any],
                    catalogue: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The export's record, or None for a new one; another embedder's export is refused, and so is
    another catalogue's (`catalogue`: the store's dataset and kind; a record made before it was
    recorded is not compared) and a folder that holds data but no record (not made by --export:
    nothing there is overwritten)."""
    if target.folder.exists() and not target.folder.is_dir():
        raise PipelineError(f"--export {target.kind}:{target.folder}: {target.folder} is a file; an export is a "
                            f"folder (e.g. {target.kind}:{target.folder}.{target.kind}): name another")
    path = target.folder / EXPORT_FILE
    if not path.is_file() and (target.folder / OLD_EXPORT_FILE).is_file():
        path = target.folder / OLD_EXPORT_FILE
    if not path.is_file():
        if target.folder.is_dir() and any(p.name != EXPORT_LOCK for p in target.folder.iterdir()):
            raise PipelineError(
                f"{target.folder} already holds files but no {EXPORT_FILE}: it was not made by --export (or by an "
                "earlier version of it), and nothing there is overwritten or added to. Export to a new folder, or "
                "remove this one first"
            )
        return None
    record = json.loads(path.read_text())
    if record.get("kind", target.kind) != target.kind:
        raise PipelineError(
            f"{target.folder} holds a {record['kind']} export, not {target.kind}: one folder holds one kind; export to "
            f"another folder, or keep exporting it as {record['kind']}:{target.folder}"
        )
    from .identity import VectorIdentity

    def same(a: dict[str, Any]) -> dict[str, Any]:  # both read as a sidecar is (an old record gains family "clip")
        return VectorIdentity.from_json(dict(a), str(path)).to_json()

    if same(record.get("identity") or {}) != same(identity):
        raise PipelineError(
            f"{target.folder} holds vectors of another embedder ({record.get('identity', {}).get('model')!r}, "
            f"{record.get('identity', {}).get('backend')!r}); vectors of two models never mix: export to another "
            "folder, or remove it first"
        )
    made_from = record.get("catalogue")
    if catalogue is not None and made_from is not None and made_from != catalogue:
        # an export is brought up to date from its own store: another store's would replace it row by row
        def said(c: dict[str, Any]) -> str:
            config = f", configuration {c['config']!r}" if c.get("config") else ""
            return f"{c.get('kind')} gallery of {c.get('dataset')!r}{config}"

        raise PipelineError(
            f"{target.folder} holds the export of another catalogue ({said(made_from)}); this store is the "
            f"{said(catalogue)}, and exporting it there would replace that export: export to another folder, or "
            "remove it first"
        )
    return record


def export_store(target: ExportTarget, embeddings: np.ndarray, rows: Sequence[ManifestRow], meta: Metadata | None,
                 identity: dict[str, Any], store_sha256: str, catalogue: dict[str, Any] | None = None,
                 table: Any = None, progress: bool = True) -> ExportReport:
    """Export (or bring up to date) one target; see the module docstring. catalogue: the store's
    dataset and gallery kind, recorded, and compared with an existing export's. table: export_table's
    of these items, where the caller made it once for several targets."""
    table = export_table(embeddings, rows, meta) if table is None else table
    record = _check_identity(target, identity, catalogue)
    target.folder.mkdir(parents=True, exist_ok=True)
    made_from = {"catalogue": catalogue} if catalogue is not None else {}
    if record is None:  # claimed before the first write: an interrupted first export is finished by the next
        record = {"identity": identity, "store_sha256": "", "kind": target.kind, "rows": 0, "dim": 0, **made_from}
        atomic_write_text(target.folder / EXPORT_FILE, json.dumps(record, indent=2, sort_keys=True))
        record["new"] = True
    writer: Any = {"lancedb": _LanceDB, "qdrant": _Qdrant, "parquet": _Parquet}[target.kind](target.folder)
    writer.progress = progress
    before = writer.digests()
    now = dict(zip(table.column("key").to_pylist(), table.column("digest").to_pylist()))
    removed = [k for k in before if k not in now]
    changed = [k for k, d in now.items() if k in before and before[k] != d]
    added = [k for k in now if k not in before]
    # a column's type changed with values that read the same (int32 -> int64: the same digests): the writer
    # writes everything again in the new schema (its apply does, where its schema differs)
    restyled = bool(before) and getattr(writer, "schema_differs", lambda t: False)(table)
    # a Qdrant export whose payloads were written before floats narrower than 64 bits went out as their
    # shortest decimal (19.99, not 19.989999771118164, which a range filter on 19.99 missed): every point again
    old_payloads = bool(before) and target.kind == "qdrant" and record.get("payload") != QDRANT_PAYLOAD
    try:
        if old_payloads:
            writer.apply(table, removed, set(now))
        elif removed or changed or added or record.get("new") or restyled:
            writer.apply(table, removed + changed, set(changed) | set(added))
    finally:
        close = getattr(writer, "close", None)
        if close is not None:
            close()
    old_name = target.folder / OLD_EXPORT_FILE
    if (removed or changed or added or restyled or old_payloads or record.get("new")
            or record.get("store_sha256") != store_sha256 or old_name.is_file()
            or (catalogue is not None and record.get("catalogue") is None)):
        atomic_write_text(target.folder / EXPORT_FILE, json.dumps(
            {"identity": identity, "store_sha256": store_sha256, "kind": target.kind, "rows": len(now), **made_from,
             "dim": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
             **({"payload": QDRANT_PAYLOAD} if target.kind == "qdrant" else {})}, indent=2, sort_keys=True))
    old_name.unlink(missing_ok=True)  # renamed: a parquet reader of the folder skips it now
    return ExportReport(target, len(added), len(changed), len(removed), len(now) - len(added) - len(changed))


# ----------------------------------------------------------------------------- the three writers
class _LanceDB:
    def __init__(self, folder: Path) -> None:
        try:
            import lancedb
        except ImportError as e:
            raise UsageError(f"--export lancedb: needs LanceDB ({e}): pip install lancedb") from e
        self.db = lancedb.connect(str(folder))

    def _table(self) -> Any:
        try:
            return self.db.open_table(TABLE)
        except (FileNotFoundError, ValueError):
            return None

    def digests(self) -> dict[str, str]:
        t = self._table()
        if t is None:
            return {}
        data = t.to_arrow().select(["key", "digest"])
        return dict(zip(data.column("key").to_pylist(), data.column("digest").to_pylist()))

    def schema_differs(self, table: Any) -> bool:
        t = self._table()
        return t is not None and not t.schema.equals(table.schema)

    def apply(self, table: Any, drop: list[str], put: set[str]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = self._table()
        if t is None:
            self.db.create_table(TABLE, table)
            return
        if not t.schema.equals(table.schema):  # a column came or went: LanceDB adds rows of its own schema only
            self.db.create_table(TABLE, table, mode="overwrite")
            return
        for start in range(0, len(drop), 500):
            keys = ", ".join("'" + k.replace("'", "''") + "'" for k in drop[start : start + 500])
            t.delete(f"key IN ({keys})")
        if put:
            t.add(table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(put)))))


def _point_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "fashion-visual-search:" + key))


@contextlib.contextmanager
def _qdrant_local_quiet() -> Iterator[None]:
    """qdrant-client's own warning past 20,000 local points left out: apply says it once, with what to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Local mode is not recommended", category=UserWarning)
        yield


class _Qdrant:
    progress = True  # its bar (export_store sets it from the run's: -q shows none)

    def __init__(self, folder: Path) -> None:
        try:
            from qdrant_client import QdrantClient
        except ImportError as e:
            raise UsageError(f"--export qdrant: needs qdrant-client ({e}): pip install qdrant-client") from e
        try:
            with _qdrant_local_quiet():  # past 20,000 points: said once by apply, with what to do
                self.client = QdrantClient(path=str(folder))
        except RuntimeError as e:  # its local mode locks the folder: a notebook's client holds it
            if "already accessed by another instance" not in str(e):
                raise
            raise UsageError(f"--export qdrant:{folder}: the folder is open in another program's Qdrant client "
                             "(its local mode lets one client at a time use it): close that client (client.close(), "
                             "or end the notebook's kernel), then export again: its collection is as it was") from e

    def digests(self) -> dict[str, str]:
        if not self.client.collection_exists(TABLE):
            return {}
        out, offset = {}, None
        while True:
            points, offset = self.client.scroll(TABLE, limit=1000, offset=offset, with_payload=["key", "digest"])
            out.update({p.payload["key"]: p.payload["digest"] for p in points if p.payload})
            if offset is None:
                return out

    def apply(self, table: Any, drop: list[str], put: set[str]) -> None:
        from qdrant_client import models

        dim = table.schema.field("vector").type.list_size
        if not self.client.collection_exists(TABLE):
            self.client.create_collection(TABLE, vectors_config=models.VectorParams(size=dim,
                                                                                    distance=models.Distance.COSINE))
        if drop:
            self.client.delete(TABLE, points_selector=models.PointIdsList(points=[_point_id(k) for k in drop]))
        payload_columns = [c for c in table.column_names if c != "vector"]
        narrow = narrow_float_columns(table.schema)
        keys = table.column("key").to_pylist()
        at = [i for i, key in enumerate(keys) if key in put]
        if at and len(keys) > QDRANT_LOCAL_POINTS:  # its own warning, raw, twice: said once here, with what to do
            log.warning("Qdrant's local mode is meant for up to %s points (its own advice) and this export holds "
                        "%s: it writes each point in a transaction of its own and loads the whole collection into "
                        "memory at every open; for a catalogue this size, run a Qdrant server, or export to LanceDB",
                        f"{QDRANT_LOCAL_POINTS:,}", f"{len(keys):,}")
        if not at:
            return
        import pyarrow as pa

        chosen = table.take(pa.array(at, pa.int64()))
        values = {c: chosen.column(c).to_pylist() for c in payload_columns}  # column by column, not a cell a time
        vectors = chosen.column("vector").combine_chunks().flatten().to_numpy().reshape(len(at), -1)
        with tqdm(total=len(at), desc="export -> qdrant", unit="point",
                  disable=not self.progress or len(at) < 2048) as bar, _qdrant_local_quiet():
            for start in range(0, len(at), 512):
                batch = [models.PointStruct(id=_point_id(values["key"][j]), vector=vectors[j].tolist(),
                                            payload={c: _plain(values[c][j], narrow.get(c)) for c in payload_columns})
                         for j in range(start, min(start + 512, len(at)))]
                self.client.upsert(TABLE, points=batch)
                bar.update(len(batch))

    def close(self) -> None:
        self.client.close()  # local mode holds a lock on the folder


def _plain(v: Any, narrow: Any = None) -> Any:
    """A metadata value as a Qdrant payload value: a decimal as a number (its range filters compare
    numbers), a float of a narrow column (`narrow`: its numpy type) as the shortest decimal it is,
    as the catalogue's own filters and hits read it, a date or time in ISO 8601 (what its datetime
    range filters parse)."""
    if narrow is not None and isinstance(v, float) and math.isfinite(v):
        return float(str(narrow(v)))
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return v.isoformat()
    return str(v)


class _Parquet:
    """Parts of PART_ROWS rows, in dataset order; a part is rewritten only when one of its rows
    changed or went, new rows go into a new part."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part_*.parquet"))

    def digests(self) -> dict[str, str]:
        import pyarrow.parquet as pq

        out: dict[str, str] = {}
        for p in self.parts():
            t = pq.read_table(p, columns=["key", "digest"])
            out.update(zip(t.column("key").to_pylist(), t.column("digest").to_pylist()))
        return out

    @staticmethod
    def _as_written(table: Any) -> Any:
        import pyarrow as pa

        table = table.rename_columns([("embedding" if c == "vector" else c) for c in table.column_names])
        return table.set_column(table.column_names.index("embedding"), "embedding",
                                table.column("embedding").cast(pa.list_(pa.float32())))

    def schema_differs(self, table: Any) -> bool:
        import pyarrow.parquet as pq

        existing = self.parts()
        written = self._as_written(table).schema.remove_metadata()
        return bool(existing) and not pq.read_schema(existing[0]).remove_metadata().equals(written)

    def apply(self, table: Any, drop: list[str], put: set[str]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        remove_temp_leftovers(self.folder)  # a killed export's (this runs under the folder's lock)
        differs = self.schema_differs(table)
        table = self._as_written(table)
        gone = set(drop)
        existing = self.parts()
        if differs:
            # a column came, went or changed its type (int32 -> int64 reads the same in the digests): the parts
            # are read as one dataset, so every one is written again with the new schema
            for p in existing:
                p.unlink()
            existing, gone, put = [], set(), set(table.column("key").to_pylist())
        for p in existing:  # a part with a row that went or changed: rewritten without it (changed rows move)
            keys = pq.read_table(p, columns=["key"]).column("key").to_pylist()
            if gone.intersection(keys):
                old = pq.read_table(p)
                kept = old.filter(pc.invert(pc.is_in(old.column("key"), value_set=pa.array(sorted(gone)))))
                self._write(p, kept) if kept.num_rows else p.unlink()
        new = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(put) or [""])))
        number = int(existing[-1].stem.split("_")[1]) + 1 if existing else 0
        for start in range(0, new.num_rows, PART_ROWS):
            self._write(self.folder / f"part_{number:05d}.parquet", new.slice(start, PART_ROWS))
            number += 1

    @staticmethod
    def _write(path: Path, table: Any) -> None:
        import pyarrow.parquet as pq

        # a hidden temp name (".part_00003.parquet.<8 random>.tmp"), which readers of the folder as one
        # dataset skip: a kill before the rename leaves no second copy of the part's rows among the parts
        fd, tmp = temp_file_beside(path)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            unlink_quietly(tmp)
            raise


def _check_apart(targets: list[ExportTarget]) -> None:
    """Each --export of one command in a folder of its own, none inside another's: two into one folder
    were found to clash only after the first was written, and one inside another was written there
    without a word."""
    where = [(t, t.folder.resolve()) for t in targets]
    for i, (a, at) in enumerate(where):
        for b, bt in where[i + 1:]:
            if at == bt or at in bt.parents or bt in at.parents:
                how = "the same folder" if at == bt else "one folder inside the other"
                raise UsageError(f"--export {a.kind}:{a.folder} and --export {b.kind}:{b.folder} name {how}: "
                                 "each export is a folder of its own (e.g. shop.lance and shop-parquet); nothing was "
                                 "written")


def run_export_db(cfg: Any) -> Any:
    """--export KIND:DIR (repeatable): the run's store (embeddings/, or embeddings_segment/ with
    --use-segmentation) with its metadata, exported or brought up to date."""
    from .galleries import load_gallery_cache, store_identity_if_default
    from .metadata import load_metadata
    from .report import RunSummary

    targets = [ExportTarget.parse(t) for t in cfg.exports]  # a bad target fails before any work
    _check_apart(targets)
    summary = RunSummary(mode="export")
    with summary.stage("load store"):
        cache = load_gallery_cache(cfg, identity=store_identity_if_default(cfg))
        meta = load_metadata(cfg.store_dir, cache.embedded_rows, cache.sidecar.manifest_sha256)
    identity = cache.sidecar.identity.to_json()
    source = cache.sidecar.source
    catalogue = {"dataset": source.dataset, "kind": source.kind or "standard",
                 **({"config": source.config} if source.config else {})}  # records before --config stay alike
    for target in targets:  # every folder checked (its kind, its embedder, its catalogue) before any is written
        _check_identity(target, identity, catalogue)
    with summary.stage("items"):  # once for every target (each row's digest: 2.5 s of 3.2 a target at 100k)
        table = export_table(cache.embeddings, cache.embedded_rows, meta)
    for target in targets:
        # one export into a folder at a time: two at once renamed each other's part files away
        target.folder.mkdir(parents=True, exist_ok=True)
        lock = target.folder / EXPORT_LOCK
        said = functools.partial(log.info, "waiting for another export into %s to end", target.folder)
        with summary.stage(f"export to {target.kind}"), waiting_lock(lock, said):
            report = export_store(target, cache.embeddings, cache.embedded_rows, meta, identity,
                                  cache.sidecar.embeddings_sha256, catalogue, table, cfg.progress)
        summary.notes.append(f"export: {report.line()}")
        summary.outputs[f"{target.kind} export"] = str(target.folder)
    summary.count("items", len(cache.embeddings))
    if meta is None:
        summary.notes.append("export: the store keeps no metadata; key, file, source, person and vector were exported")
    return summary

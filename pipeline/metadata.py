"""A gallery's metadata: the dataset's plain columns (category, colour, price, ...) kept beside the
store as `metadata.parquet`, typed, one row per dataset row the store holds, keyed by `source_row`
like the manifest. Every build and update writes it (dataset.read_metadata reads only these
columns); searches read it back aligned to the embedding rows, to filter (filters.py) and to return
each hit's values.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import arrow_numpy, in_one_unicode_form, int64_array
from .errors import CacheMismatchError
from .filters import Filter
from .store import ManifestRow, manifest_sha256

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.parquet"


def keep_for_store(table: Any, rows: Sequence[ManifestRow]) -> Any:
    """The table's rows of the store's source rows, in source_row order."""
    import pyarrow.compute as pc

    wanted = int64_array(sorted({r.source_row for r in rows}))
    kept = table.filter(pc.is_in(table.column("source_row"), value_set=wanted))
    return kept.sort_by("source_row")


STORE_KEY = b"fashion.manifest_sha256"  # the parquet's key-value metadata: the store version it was written for


def write_metadata(store_dir: Path, table: Any, rows: Sequence[ManifestRow]) -> bool:
    """metadata.parquet for the store's rows, stamped with the store's manifest sha256 (so that
    a table left from before an update's switch is known); not rewritten when it already holds
    the same for this store. Returns whether it was written."""
    import pyarrow.parquet as pq

    from .fileio import atomic_write_bytes

    stamp = manifest_sha256(store_dir).encode()
    table = keep_for_store(table, rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STORE_KEY: stamp})
    path = Path(store_dir) / METADATA_FILE
    if path.is_file():
        try:
            old = _read_whole(path)
            if old.equals(table) and (old.schema.metadata or {}).get(STORE_KEY) == stamp:
                return False
        except (OSError, ValueError):
            pass
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return True


def changed_rows(old: Any, new: Any, moved: dict[int, int] | None = None) -> int | None:
    """How many of the photos both tables hold have another value in some column (a missing value,
    NaN included, equal to a missing one); None when their columns or types differ. A photo is its
    source row in both, or, with `moved` (an update's kept photos: old source row -> row now), the
    old table's rows are renumbered so first, and those it does not name left out: a photo removed
    before them moved every later row, and they were all counted as changed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [c for c in new.column_names if c != "source_row"]
    if sorted(names) != sorted(c for c in old.column_names if c != "source_row"):
        return None
    if moved is not None:
        was, now_at = int64_array(list(moved)), int64_array(list(moved.values()))
        at = pc.index_in(old.column("source_row"), value_set=was)
        old = old.filter(pc.is_valid(at))
        old = old.set_column(old.column_names.index("source_row"), "source_row", now_at.take(pc.drop_null(at)))
    at = pc.index_in(new.column("source_row"), value_set=old.column("source_row"))
    both = pc.is_valid(at)
    now, before = new.filter(both), old.take(pc.drop_null(at))
    differ = np.zeros(now.num_rows, bool)
    for c in names:
        a, b = before.column(c), now.column(c)
        if a.type != b.type:
            return None
        same = pc.or_kleene(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
        if pa.types.is_floating(a.type):
            same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False))
        differ |= ~np.asarray(arrow_numpy(same), bool)
    return int(differ.sum())


def json_value(v: Any) -> Any:
    """A metadata value as JSON has it: NaN and infinities as null (JSON has none), dates,
    decimals and the like as their text."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def narrow_float_columns(schema: Any) -> dict[str, Any]:
    """A pyarrow schema's columns of floats narrower than 64 bits (a dictionary's values), with their
    numpy type: what reads such a float as the shortest decimal it is needs."""
    import pyarrow as pa

    narrow = {pa.float32(): np.float32, pa.float16(): np.float16}
    out = {}
    for field in schema:
        t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if t in narrow:
            out[field.name] = narrow[t]
    return out


@dataclass(frozen=True)
class Metadata:
    """The metadata of a store's searchable items: `table` row j belongs to embedding row j."""

    table: Any  # pyarrow.Table, without source_row

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def values(self, j: int) -> dict[str, Any]:
        """Embedding row j's values (None where missing). A float of fewer than 64 bits as the
        shortest decimal it is (a float32 19.99, not 19.989999771118164)."""
        out = {}
        for c in self.table.column_names:
            v = self.table.column(c)[j].as_py()
            if isinstance(v, float) and math.isnan(v):
                v = None  # missing, as a filter takes it (price IS NULL)
            elif (narrow := self._narrow_floats.get(c)) is not None and isinstance(v, float) and math.isfinite(v):
                v = float(str(narrow(v)))
            out[c] = v
        return out

    @functools.cached_property
    def _narrow_floats(self) -> dict[str, Any]:
        """The columns of floats narrower than 64 bits (a dictionary's values), with their numpy type."""
        return narrow_float_columns(self.table.schema)

    def json_values(self, j: int) -> dict[str, Any]:
        """Embedding row j's values as JSON has them (json_value)."""
        return {c: json_value(v) for c, v in self.values(j).items()}

    def mask(self, text: str) -> np.ndarray:
        """bool (N,): the items a filter keeps (filters.Filter: parsed, checked, never run as code)."""
        return Filter.parse(text, self.table.schema).mask(self.table)


def prefixed_name(column: str, own: Collection[str]) -> str:
    """A metadata column's name beside a table's own columns: its own, or `meta_<name>` where the
    table uses the name itself (or `meta_<it>`), so that no value is lost or read as another."""
    return f"meta_{column}" if column in own or column.startswith("meta_") and column[5:] in own else column


def product_labels(values: Any) -> tuple[np.ndarray, int]:
    """--group-by: an int64 label per row of a metadata column (pyarrow), equal for equal values;
    a row without a value (null, NaN, or text that is empty or blank, which names no product, as
    for --eval-id-column) gets a label of its own (it stands alone). Returns the labels and how
    many rows had no value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes = np.asarray(arrow_numpy(pc.dictionary_encode(values).combine_chunks().indices))
    missing = np.asarray(arrow_numpy(values.is_null()), bool)
    if pa.types.is_floating(values.type):  # NaN is no value, as shown: it stands alone too
        missing |= np.asarray(arrow_numpy(pc.fill_null(pc.is_nan(values), False)), bool)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        missing |= np.asarray(arrow_numpy(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False)), bool)
    n_codes = int(codes[~missing].max()) + 1 if (~missing).any() else 0
    labels = np.where(missing, n_codes + np.arange(len(codes)), codes)
    return labels.astype(np.int64), int(missing.sum())


def load_metadata(store_dir: Path, embedded: Sequence[ManifestRow], manifest: str | None = None) -> Metadata | None:
    """The store's metadata aligned to its embedding rows, or None when it has none. A table that
    lacks some of the store's rows (written for another version of the store) is refused.
    manifest: the manifest sha256 of the store as it was loaded (its sidecar then), which a reader
    that holds no lock passes: an update switched in since then is refused, not joined to it."""

    path = Path(store_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        table = _read_whole(path)
    except (OSError, ValueError) as e:
        raise CacheMismatchError(f"{path}: unreadable ({e}); run the gallery build again to rewrite it") from e
    stamp = (table.schema.metadata or {}).get(STORE_KEY)
    if stamp is not None:
        written_for, now = stamp.decode(), manifest_sha256(store_dir)
        if manifest is not None and written_for != manifest and written_for == now:
            raise CacheMismatchError(f"{path} is of the store as updated since this one was loaded: search again")
        if written_for != (manifest or now):
            from .fileio import being_written

            if said := being_written(store_dir.parent):  # an update between its switch and its metadata: not stopped
                raise CacheMismatchError(f"{path} is not yet the store's{said}")
            raise CacheMismatchError(
                f"{path} was written for another version of the store (an update stopped after its switch, before "
                "the metadata was written): run the same command with --update again, or the build, to rewrite it"
            )
    keys = np.asarray(arrow_numpy(table.column("source_row")), np.int64)
    want = np.array([r.source_row for r in embedded], np.int64)
    at = np.searchsorted(keys, want)
    at = np.minimum(at, max(len(keys) - 1, 0))
    if len(want) and (len(keys) == 0 or not np.array_equal(keys[at], want)):
        missing = len(want) if len(keys) == 0 else int(np.sum(keys[at] != want))
        raise CacheMismatchError(
            f"{path} does not cover the store ({missing} of its items have no row there): it was written for "
            "another version of the store. Run the build (or --update) again to rewrite it"
        )
    # in NFC, as a filter's text is: a store whose metadata was read before texts were (a Mac's CSV) too
    return Metadata(in_one_unicode_form(table.take(int64_array(at)).drop_columns(["source_row"])))


def stored_table(store_dir: Path) -> Any | None:
    """The store's metadata.parquet as written (its source_row column with it), None when it has none."""
    path = Path(store_dir) / METADATA_FILE
    return _read_whole(path) if path.is_file() else None


def _read_whole(path: Path) -> Any:
    """A parquet file as one table, by the plain file reader: pq.read_table goes through
    pyarrow.dataset, whose import brings pandas (0.3 s)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        return pf.read()

"""The record of what a local parquet dataset holds (datarecord): row-group digests of stored bytes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.datarecord import row_group_digests


def write(path, cells: list[bytes], ids: list[str], **kw) -> None:
    pq.write_table(pa.table({"image": [{"bytes": c, "path": None} for c in cells], "item_id": ids}), path,
                   row_group_size=3, **kw)


def test_a_group_digest_follows_its_cells_not_where_it_lies(tmp_path):
    cells = [bytes([k]) * (100 + k) for k in range(9)]
    ids = [f"P{k}" for k in range(9)]
    write(tmp_path / "a.parquet", cells, ids)
    a = row_group_digests(tmp_path / "a.parquet", ["image", ""])
    assert a is not None and [n for _, n in a] == [3, 3, 3] and len({d for d, _ in a}) == 3
    grown = [cells[0] + b"x", *cells[1:]]  # the first group's bytes change size: the others move in the file
    write(tmp_path / "b.parquet", grown, ids)
    b = row_group_digests(tmp_path / "b.parquet", ["image", ""])
    assert b is not None and b[0] != a[0] and b[1:] == a[1:]
    flipped = [*cells[:4], bytes([4]) * 103 + b"\x05", *cells[5:]]  # same length, one byte differs
    write(tmp_path / "c.parquet", flipped, ids)
    c = row_group_digests(tmp_path / "c.parquet", ["image", ""])
    assert c is not None and c[1] != a[1] and [c[0], c[2]] == [a[0], a[2]]
    write(tmp_path / "d.parquet", cells, [*ids[:7], "other", ids[8]])  # an id changed: the same pictures
    assert row_group_digests(tmp_path / "d.parquet", ["image", ""]) == a  # id column not asked: not covered
    with_ids = row_group_digests(tmp_path / "d.parquet", ["image", "item_id"])
    assert with_ids is not None and with_ids[:2] == row_group_digests(tmp_path / "a.parquet", ["image", "item_id"])[:2]
    assert with_ids[2] != row_group_digests(tmp_path / "a.parquet", ["image", "item_id"])[2]
    write(tmp_path / "e.parquet", cells, ids, compression="zstd")  # other stored bytes, same cells: not matched
    e = row_group_digests(tmp_path / "e.parquet", ["image", ""])
    assert e is not None and not {d for d, _ in e} & {d for d, _ in a}
    (tmp_path / "f.parquet").write_bytes(b"not parquet")
    assert row_group_digests(tmp_path / "f.parquet", ["image", ""]) is None

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


def test_a_build_records_nothing_when_the_files_changed_while_it_read(tmp_path):
    """record_build numbers rows by the files as they are after the build: a file added (or changed)
    meanwhile would shift them, so nothing is recorded then."""
    from types import SimpleNamespace

    from pipeline.datarecord import file_stamps, hashes_file, record_build
    from pipeline.dataset import DatasetSpec

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    cells = [bytes([k]) * 50 for k in range(6)]
    write(data / "train-00000.parquet", cells[:3], ["a", "b", "c"])
    write(data / "train-00002.parquet", cells[3:], ["d", "e", "f"])
    spec = DatasetSpec(str(tmp_path / "ds"), limit=None)
    lines = [SimpleNamespace(source_row=r, source_sha256=f"{r:064x}", item_id="", error="", source=f"{spec.name}[{r}]")
             for r in range(6)]
    stamps = file_stamps(spec)
    write(data / "train-00001.parquet", cells[:1], ["x"])  # sorts between the two, appeared during the build
    assert record_build(spec, stamps, lines, set()) == 0 and not hashes_file(spec).exists()
    (data / "train-00001.parquet").unlink()
    assert record_build(spec, stamps, lines, set()) == 2
    assert record_build(spec, stamps, lines, linked={4}) == 1  # a row that named a picture file: its file left out


def test_a_chunk_is_hashed_piece_by_piece_to_the_same_digest(tmp_path, monkeypatch):
    from pipeline import datarecord

    write(tmp_path / "a.parquet", [bytes([k]) * 1000 for k in range(9)], [f"P{k}" for k in range(9)])
    whole = row_group_digests(tmp_path / "a.parquet", ["image", "item_id"])
    monkeypatch.setattr(datarecord, "READ_BYTES", 100)  # each chunk read in many pieces
    assert row_group_digests(tmp_path / "a.parquet", ["image", "item_id"]) == whole and whole is not None


def test_old_parquet_mr_files_are_not_hashed_by_their_ranges():
    from pipeline.datarecord import _old_parquet_mr

    assert _old_parquet_mr("parquet-mr version 1.2.8 (build abc)")
    assert _old_parquet_mr(" parquet-mr  version 1.2")  # a version pyarrow reads without its patch
    assert _old_parquet_mr("parquet-mr version unknown")
    assert not _old_parquet_mr("parquet-mr version 1.12.3 (build f8dced182c4c1fbdec6ccb3185537b5a01e6ed6b)")
    assert not _old_parquet_mr("parquet-cpp-arrow version 26.0.1")


def test_a_group_hashed_from_pyarrows_buffers_is_what_the_reader_gives(tmp_path):
    # every kind of cell: bytes, empty bytes, no bytes but a picture file, nothing, a null struct; ids of
    # several kinds, null among them; a plain binary and a large_binary image column; groups of 4 rows
    import hashlib

    from pipeline.datarecord import hashed
    from pipeline.dataset import DatasetSpec, hash_parquet_group, iter_parquet_file

    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"\xff\xd8 a picture file")
    cells = [{"bytes": bytes([k]) * (50 + k), "path": None} for k in range(11)]
    cells[2] = {"bytes": b"", "path": None}
    cells[4] = {"bytes": None, "path": str(photo)}
    cells[5] = {"bytes": None, "path": str(tmp_path / "gone.jpg")}
    cells[7] = {"bytes": None, "path": None}
    cells[9] = None
    ids = [None if k == 3 else k * 10 for k in range(11)]
    plain = [None if c is None else c["bytes"] for c in cells]
    tables = {
        "struct": pa.table({"image": cells, "item_id": ids}),
        "binary": pa.table({"image": pa.array(plain, pa.binary()), "item_id": ids}),
        "large": pa.table({"image": pa.array(plain, pa.large_binary()), "item_id": [str(i) for i in ids]}),
    }
    wants = {}
    for name, table in tables.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=4)
        for id_column in ("item_id", None):
            spec = DatasetSpec(str(path), limit=None, id_column=id_column)
            read = hashed(iter_parquet_file(spec, path))
            want = [(r.source_row, r.item_id, r.error, r.linked, sha) for r, sha in read]
            got = []
            with pq.ParquetFile(path) as pf:
                for g, first in enumerate((0, 4, 8)):
                    got += [(r.source_row, r.item_id, r.error, r.linked, sha)
                            for r, sha in hash_parquet_group(spec, pf, g, first)]
            assert got == want, (name, id_column)
            assert len(got) == 11 and got[1][4] == hashlib.sha256(bytes([1]) * 51).hexdigest()
            wants[name, id_column] = want
    want = wants["struct", "item_id"]
    assert want[4][3] and want[4][4] == hashlib.sha256(photo.read_bytes()).hexdigest()  # the file the cell names
    assert want[5][3] and want[5][4] == "" and "cannot read" in want[5][2]
    # a cell of empty bytes is an empty file (datasets reads it so: its path is looked at only without bytes)
    assert want[2][4] == hashlib.sha256(b"").hexdigest() and want[7][4] == ""
    assert "empty" in want[9][2] and want[3][1] == "" and want[6][1] == "60"
    assert wants["binary", "item_id"][2][4] == hashlib.sha256(b"").hexdigest()  # a plain column's empty bytes: a cell
    assert wants["large", "item_id"][3][1] == "None"  # that table's ids are text


def test_a_record_of_sha256_group_digests_is_not_trusted(tmp_path):
    """Group digests were sha256 before they were xxh3-128: a record kept from then must not hand a
    changed file's groups the rows it recorded; they are decoded again and the record renewed."""
    import hashlib
    import json

    from pipeline.datarecord import dataset_hashes, hashes_file
    from pipeline.dataset import DatasetSpec

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    cells = [bytes([k]) * (60 + k) for k in range(6)]
    write(data / "train-00000.parquet", cells, [f"P{k}" for k in range(6)])
    spec = DatasetSpec(str(tmp_path / "ds"), limit=None, id_column="item_id")
    first = [sha for _, sha in dataset_hashes(spec)]
    assert first == [hashlib.sha256(c).hexdigest() for c in cells]
    record = json.loads(hashes_file(spec).read_text())
    (entry,) = record.values()
    assert [d[:5] for d, _ in entry["groups"]] == ["xxh3:", "xxh3:"] and len(entry["groups"][0][0]) == 37
    entry["rows"] = [["0" * 64, f"P{k}", "", ""] for k in range(6)]  # rows that are now wrong
    hashes_file(spec).write_text(json.dumps(record))
    write(data / "train-00000.parquet", cells, [f"P{k}" for k in range(6)])  # the same bytes, a new stat
    # the groups' digests are the ones recorded: their recorded rows are taken as they are (how the
    # record saves reading), so the wrong rows come back
    assert [sha for _, sha in dataset_hashes(spec)] == ["0" * 64] * 6
    (entry,) = record.values()
    # as the earlier version wrote it: sha256 digests (64 hex digits) beside the same wrong rows
    entry["groups"] = [[hashlib.sha256(d.encode()).hexdigest(), n] for d, n in entry["groups"]]
    hashes_file(spec).write_text(json.dumps(record))
    write(data / "train-00000.parquet", cells, [f"P{k}" for k in range(6)])
    assert [(r.item_id, sha) for r, sha in dataset_hashes(spec)] == [(f"P{k}", first[k]) for k in range(6)]
    (renewed,) = json.loads(hashes_file(spec).read_text()).values()
    assert all(d.startswith("xxh3:") for d, _ in renewed["groups"]) and renewed["rows"][0][0] == first[0]


def test_a_group_that_reads_another_row_count_than_its_metadata_is_an_error(tmp_path, monkeypatch):
    """A row group whose decoded rows do not number what the file's metadata says (a reader bug, a
    file changed under it) stops the compare with the file and group named, not a shifted record."""
    import pytest

    from pipeline import datarecord
    from pipeline.dataset import DatasetSpec
    from pipeline.errors import PipelineError

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    write(data / "train-00000.parquet", [bytes([k]) * 40 for k in range(9)], [f"P{k}" for k in range(9)])
    spec = DatasetSpec(str(tmp_path / "ds"), limit=None)
    real = datarecord.hash_parquet_group

    def short(spec, pf, group, first):
        got = real(spec, pf, group, first)
        return got[:-1] if group == 1 else got

    monkeypatch.setattr(datarecord, "hash_parquet_group", short)
    with pytest.raises(PipelineError, match=r"train-00000.parquet: row group 1 read 2 rows where its metadata says 3"):
        list(datarecord.dataset_hashes(spec))
    assert not datarecord.hashes_file(spec).exists()  # nothing recorded of it
    monkeypatch.undo()
    assert len(list(datarecord.dataset_hashes(spec))) == 9

"""--export lancedb:DIR / qdrant:DIR / parquet:DIR (issue 27, point 5): the store with its metadata
read back by embedded LanceDB and Qdrant's local mode, where the same filter gives the same top-k as
ours; after --update a second export writes only what changed; another embedder's export is refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import main as cli
from pipeline import Catalog
from pipeline.vectordb import item_keys
from tests import assets
from tests.helpers import row_files, run
from tests.test_metadata import N, args, shop, write_shop

lancedb = pytest.importorskip("lancedb")
qdrant_client = pytest.importorskip("qdrant_client")


@pytest.fixture()
def exported(tmp_path, tiny_onnx):
    data = write_shop(tmp_path / "shop")
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    targets = {k: tmp_path / f"export.{k}" for k in ("lancedb", "qdrant", "parquet")}
    flags = [x for k, p in targets.items() for x in ("--export", f"{k}:{p}")]
    assert run(*args(data, tiny_onnx, out, *flags)) == 0
    return data, out, targets, flags


FILTER = "category = 'dress' AND price < 100"


def test_the_databases_answer_as_we_do(exported):
    _, out, targets, _ = exported
    cat = Catalog.open(out)
    keys = dict(zip([r.embedding_row for r in sorted(cat.items, key=lambda r: (r.source_row, r.person))],
                    item_keys(sorted(cat.items, key=lambda r: (r.source_row, r.person)))))
    table = lancedb.connect(str(targets["lancedb"])).open_table("gallery")
    assert table.count_rows() == len(cat)
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(targets["qdrant"]))
    must = models.Filter(must=[models.FieldCondition(key="category", match=models.MatchValue(value="dress")),
                               models.FieldCondition(key="price", range=models.Range(lt=100))])
    for q in (0, 13, 27):
        ours = [keys[h.row] for h in cat.search_vectors(cat.embeddings[q], k=5, filter=FILTER)[0]]
        search = table.search(cat.embeddings[q]).distance_type("cosine")
        lance = search.where(FILTER, prefilter=True).limit(5).to_arrow()
        assert lance.column("key").to_pylist() == ours
        found = client.query_points("gallery", query=cat.embeddings[q].tolist(), query_filter=must, limit=5).points
        assert [p.payload["key"] for p in found] == ours
        assert all(p.payload["category"] == "dress" and p.payload["price"] < 100 for p in found)
    client.close()
    parts = sorted(targets["parquet"].glob("part_*.parquet"))
    back = pq.read_table(parts[0])
    assert back.num_rows == len(cat) and {"key", "file", "category", "price", "embedding"} <= set(back.column_names)
    row = back.slice(5, 1).to_pylist()[0]
    assert np.allclose(row["embedding"], cat.embeddings[[r.embedding_row for r in cat.items if r.source_row == 5][0]])
    # a parquet dataset's cells carry no path: `source` is an empty text column, not Arrow's null type
    assert str(back.schema.field("source").type) == "string" and set(back.column("source").to_pylist()) == {None}
    assert str(table.schema.field("source").type) == "string"
    record = json.loads((targets["lancedb"] / "_fashion_export.json").read_text())
    assert record["identity"]["backend"] == "onnx" and record["rows"] == len(cat)
    # the folder read whole, as pandas, pyarrow and DuckDB read a parquet folder: the record is no part
    import pandas as pd

    whole = pd.read_parquet(targets["parquet"])
    assert len(whole) == len(cat) and sorted(whole["key"]) == sorted(back.column("key").to_pylist())


def test_after_an_update_only_what_changed_is_written(exported, tiny_onnx, capsys):
    data, out, targets, flags = exported
    parts_before = {p.name: p.stat().st_mtime_ns for p in targets["parquet"].glob("part_*.parquet")}
    write_shop(data, n=40, price_of={7: 3.25})  # one price changes
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, *flags)) == 0
    said = capsys.readouterr().out
    for kind in ("lancedb", "qdrant", "parquet"):
        assert f"{kind} at {targets[kind]}: added 0, changed 0, removed 0, unchanged 40" in said  # store unchanged
    assert run(*args(data, tiny_onnx, out, "--update")) == 0  # the metadata follows the dataset
    assert cli.main(args(data, tiny_onnx, out, *flags)) == 0
    said = capsys.readouterr().out
    for kind in ("lancedb", "qdrant", "parquet"):
        assert f"{kind} at {targets[kind]}: added 0, changed 1, removed 0, unchanged 39" in said
    table = lancedb.connect(str(targets["lancedb"])).open_table("gallery")
    assert table.count_rows() == 40
    seven = row_files(out)[7]
    assert table.search().where(f"file = '{seven}'").to_arrow().column("price").to_pylist() == [3.25]
    # parquet: the changed row's part is rewritten, the row moves to a new part
    after = sorted(p.name for p in targets["parquet"].glob("part_*.parquet"))
    assert after == ["part_00000.parquet", "part_00001.parquet"] and list(parts_before) == ["part_00000.parquet"]
    assert sum(pq.read_table(targets["parquet"] / p).num_rows for p in after) == 40


def test_an_update_that_removes_a_photo_writes_only_that_removal(exported, tiny_onnx, capsys):
    """The rows after a removed one move up: their items are the same (key, file, values, vector),
    so no export writes them again."""
    data, out, targets, flags = exported
    before = {k: v for k, v in shop(N).items()}
    keep = [i for i in range(N) if i != 3]
    cells = [assets.jpeg_bytes(40 + i % 5 * 4, 56, seed=300 + i) for i in keep]
    assets.write_parquet_dataset(data, cells, extra={k: [v[i] for i in keep] for k, v in before.items()})
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, *flags)) == 0
    said = capsys.readouterr().out
    for kind in ("lancedb", "qdrant", "parquet"):
        assert f"{kind} at {targets[kind]}: added 0, changed 0, removed 1, unchanged {N - 1}" in said
    table = lancedb.connect(str(targets["lancedb"])).open_table("gallery")
    assert sorted(table.to_arrow().column("file").to_pylist()) == sorted(row_files(out).values())


def test_another_embedders_export_is_refused(exported, tiny_onnx, tmp_path, capsys):
    data, out, targets, flags = exported
    path = targets["qdrant"] / "_fashion_export.json"
    record = json.loads(path.read_text())
    record["identity"]["model"] = "another/model"
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--export", f"qdrant:{targets['qdrant']}")) == 1
    assert "holds vectors of another embedder ('another/model'" in capsys.readouterr().err
    assert cli.main(args(data, tiny_onnx, out, "--export", "mongo:./x")) == 2
    capsys.readouterr()
    before = sorted(p.name for p in targets["parquet"].rglob("*"))
    first = tmp_path / "first.parquet"
    assert cli.main(args(data, tiny_onnx, out, "--export", f"parquet:{first}", "--export",
                         f"lancedb:{targets['parquet']}")) == 1
    assert not first.exists()  # the other target, refused first: nothing written anywhere
    assert f"{targets['parquet']} holds a parquet export, not lancedb: one folder holds one kind" in \
        capsys.readouterr().err
    assert sorted(p.name for p in targets["parquet"].rglob("*")) == before  # nothing written into it
    # two targets of one command in one folder, or one inside the other: refused before either is written
    both = tmp_path / "both"
    assert cli.main(args(data, tiny_onnx, out, "--export", f"lancedb:{both}", "--export", f"parquet:{both}")) == 2
    assert f"--export lancedb:{both} and --export parquet:{both} name the same folder" in capsys.readouterr().err
    assert cli.main(args(data, tiny_onnx, out, "--export", f"lancedb:{both}", "--export",
                         f"parquet:{both / 'sub'}")) == 2
    assert "name one folder inside the other" in capsys.readouterr().err
    assert not both.exists()


def test_a_qdrant_folder_open_in_another_client_is_said_so_not_a_crash(exported, tiny_onnx, capsys):
    """A notebook holding the local collection open: the export ended as an "unexpected RuntimeError
    (run with -v for the traceback)", exit 1, as a bug would."""
    from qdrant_client import QdrantClient

    data, out, targets, _ = exported
    holder = QdrantClient(path=str(targets["qdrant"]))
    try:
        before = holder.count("gallery").count
        capsys.readouterr()
        assert cli.main(args(data, tiny_onnx, out, "--export", f"qdrant:{targets['qdrant']}")) == 2
        said = capsys.readouterr().err
        assert f"error: --export qdrant:{targets['qdrant']}: the folder is open in another program's Qdrant " \
               "client" in said and "close that client" in said and "unexpected" not in said
        assert holder.count("gallery").count == before
    finally:
        holder.close()
    assert cli.main(args(data, tiny_onnx, out, "--export", f"qdrant:{targets['qdrant']}")) == 0  # closed: it goes on


def test_the_items_are_tabled_once_for_every_target_and_a_large_local_qdrant_is_said_once(
        tiny_onnx, tmp_path, monkeypatch, capsys):
    """Each --export target made the whole table again, a row's digest at a time (2.5 s of 3.2 a target
    at 100k); qdrant-client's own warning past 20,000 points came raw, twice, and named no way out."""
    from pipeline import vectordb

    data = write_shop(tmp_path / "shop")
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    made = []
    real = vectordb.export_table
    monkeypatch.setattr(vectordb, "export_table", lambda *a, **k: made.append(1) or real(*a, **k))
    monkeypatch.setattr(vectordb, "QDRANT_LOCAL_POINTS", 5)
    targets = [("lancedb", tmp_path / "e.lance"), ("qdrant", tmp_path / "e.qdrant"), ("parquet", tmp_path / "e.pq")]
    flags = [x for k, path in targets for x in ("--export", f"{k}:{path}")]
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, *flags)) == 0
    assert made == [1]
    said = [line for line in capsys.readouterr().err.splitlines() if "local mode is meant for up to 5 points" in line]
    assert len(said) == 1 and "run a Qdrant server, or export to LanceDB" in said[0]
    from qdrant_client import QdrantClient

    from pipeline.store import read_manifest

    emb = np.load(out / "embeddings" / "embeddings.npy")
    by_file = {r.file: r for r in read_manifest(out / "embeddings" / "manifest.csv")}
    client = QdrantClient(path=str(tmp_path / "e.qdrant"))
    try:
        points = client.scroll("gallery", limit=100, with_vectors=True)[0]
        lance = {r["key"]: r for r in __import__("lancedb").connect(str(tmp_path / "e.lance")).open_table(
            "gallery").to_arrow().to_pylist()}
        assert len(points) == len(lance) > 5
        for point in points:  # each point's vector and values as the table's row for its key
            row = lance[point.payload["key"]]
            assert np.allclose(point.vector, row["vector"], atol=1e-6)
            assert point.payload["file"] == row["file"] and point.payload["digest"] == row["digest"]
            # and the store's own vector for that file: both exports share one table, which could be wrong alike
            assert np.allclose(point.vector, emb[by_file[point.payload["file"]].embedding_row], atol=1e-6)
    finally:
        client.close()


def test_a_folder_not_made_by_export_is_left_alone(exported, tiny_onnx, tmp_path, capsys):
    data, out, targets, _ = exported
    (targets["lancedb"] / "_fashion_export.json").unlink()  # a LanceDB folder of the user's own
    before = lancedb.connect(str(targets["lancedb"])).open_table("gallery").count_rows()
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--export", f"lancedb:{targets['lancedb']}")) == 1
    assert "already holds files but no _fashion_export.json" in capsys.readouterr().err
    assert lancedb.connect(str(targets["lancedb"])).open_table("gallery").count_rows() == before  # nothing added
    # a file where the folder would be: refused by name, not an unexpected FileExistsError
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(args(data, tiny_onnx, out, "--export", f"parquet:{tmp_path / 'notes.txt'}")) == 1
    assert (f"--export parquet:{tmp_path / 'notes.txt'}: {tmp_path / 'notes.txt'} is a file; an export is a folder"
            in capsys.readouterr().err)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_interrupted_first_export_is_finished_and_catalogue_columns_keep_their_values(tiny_onnx, tmp_path,
                                                                                       monkeypatch, capsys):
    """A catalogue column named like one of the export's own (file, vector) is exported as
    meta_<name>, never dropped; a first export killed after its first batch is finished by the next."""
    from pipeline import vectordb
    from tests import assets

    cells = [assets.jpeg_bytes(40, 56, seed=900 + i) for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={
        "file": [f"shot{i}.jpg" for i in range(6)], "vector": [float(i) for i in range(6)]})
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    target = tmp_path / "export.qdrant"
    real = vectordb._Qdrant.apply

    def dies_midway(self, table, drop, put):
        real(self, table.slice(0, 2), drop, put & set(table.slice(0, 2).column("key").to_pylist()))
        raise KeyboardInterrupt

    monkeypatch.setattr(vectordb._Qdrant, "apply", dies_midway)
    assert cli.main(args(data, tiny_onnx, out, "--export", f"qdrant:{target}")) == 130
    monkeypatch.setattr(vectordb._Qdrant, "apply", real)
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--export", f"qdrant:{target}")) == 0
    assert f"qdrant at {target}: added 4, changed 0, removed 0, unchanged 2" in capsys.readouterr().out
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(target))
    points, _ = client.scroll("gallery", limit=10, with_payload=True)
    client.close()
    assert len(points) == 6
    by_shot = {p.payload["meta_file"]: p.payload for p in points}
    assert by_shot["shot4.jpg"]["meta_vector"] == 4.0
    assert by_shot["shot4.jpg"]["file"] == row_files(out)[4]  # the export's own column: the store's picture


def test_an_export_made_before_families_were_recorded_is_still_brought_up_to_date(exported, tiny_onnx, capsys):
    """An export of before SigLIP (no family in its record), which also kept its record as
    fashion_export.json (before 2026-12-06): brought up to date with nothing written again, its
    record renamed so that a parquet reader of the folder skips it."""
    data, out, targets, _ = exported
    path = targets["parquet"] / "_fashion_export.json"
    record = json.loads(path.read_text())
    record["identity"].pop("family")  # as an export written before SigLIP
    path.unlink()
    (targets["parquet"] / "fashion_export.json").write_text(json.dumps(record))
    parts = {p.name: p.stat().st_mtime_ns for p in targets["parquet"].glob("part_*.parquet")}
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--export", f"parquet:{targets['parquet']}")) == 0
    assert "unchanged 40" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in targets["parquet"].glob("part_*.parquet")} == parts
    assert not (targets["parquet"] / "fashion_export.json").exists()
    assert json.loads(path.read_text())["rows"] == 40


def test_a_lancedb_export_whose_columns_changed_is_rewritten(tiny_onnx, tmp_path, capsys):
    """The catalogue gains a column (here: more --meta-columns): LanceDB cannot add rows of another
    schema to its table, so the export rewrites the table, every row counted changed."""
    data = write_shop(tmp_path / "shop")
    out, target = tmp_path / "out", tmp_path / "export.lancedb"
    assert run(*args(data, tiny_onnx, out, "--meta-columns", "category")) == 0
    assert run(*args(data, tiny_onnx, out, "--meta-columns", "category", "--export", f"lancedb:{target}")) == 0
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--meta-columns", "category,price", "--update")) == 0
    assert cli.main(args(data, tiny_onnx, out, "--meta-columns", "category,price",
                         "--export", f"lancedb:{target}")) == 0
    assert f"changed {N}, removed 0, unchanged 0" in capsys.readouterr().out
    table = lancedb.connect(str(target)).open_table("gallery").to_arrow()
    assert {"category", "price"} <= set(table.column_names) and table.num_rows == N


def test_an_items_source_is_exported_only_when_it_is_a_name_of_its_own():
    from pipeline.store import ManifestRow
    from pipeline.vectordb import source_of

    assert source_of(ManifestRow(index=0, file="f", source_row=3, source="/data/shop[3]")) is None  # a position
    assert source_of(ManifestRow(index=0, file="f", source_row=3, source="/data/photos/red/d1.jpg")) == (
        "/data/photos/red/d1.jpg"
    )
    assert source_of(ManifestRow(index=0, file="f", source_row=3, source="")) is None


def test_a_parquet_export_whose_schema_changed_is_written_again_whole(tmp_path):
    """A column whose type changed but whose values read the same (int32 -> int64: the same digests)
    would leave parts of two schemas that no reader takes as one dataset: every part is written again."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from pipeline.metadata import Metadata
    from pipeline.store import ManifestRow
    from pipeline.vectordb import ExportTarget, export_store

    rows = [ManifestRow(index=i, file=f"img_{i}.jpg", source_row=i, sha256=f"{i:064x}", embedding_row=i)
            for i in range(3)]
    vectors = np.eye(3, 4, dtype=np.float32)
    target = ExportTarget("parquet", tmp_path / "export")
    identity = {"backend": "onnx", "onnx_sha256": "a" * 64}
    for kind in (pa.int32(), pa.int64()):
        meta = Metadata(pa.table({"stock": pa.array([1, 2, 3], kind)}))
        export_store(target, vectors, rows, meta, identity, "s" * 64)
        read = ds.dataset(sorted(target.folder.glob("part_*.parquet")), format="parquet").to_table()
        assert read.schema.field("stock").type == kind and read.num_rows == 3
        assert dict(zip(read.column("file").to_pylist(), read.column("stock").to_pylist())) == {
            "img_0.jpg": 1, "img_1.jpg": 2, "img_2.jpg": 3}


def test_a_parquet_part_is_written_under_a_name_readers_skip_and_a_killed_ones_is_cleared(tmp_path, monkeypatch):
    """A part is written under a hidden temp name first: a kill before its rename left part_00000.parquet.tmp,
    which pyarrow reads with the parts (every row twice). A killed export's temp is removed by the next."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    from pipeline.metadata import Metadata
    from pipeline.store import ManifestRow
    from pipeline.vectordb import ExportTarget, export_store

    rows = [ManifestRow(index=i, file=f"img_{i}.jpg", source_row=i, sha256=f"{i:064x}", embedding_row=i)
            for i in range(3)]
    target = ExportTarget("parquet", tmp_path / "export")
    written = []
    real = parquet.write_table
    monkeypatch.setattr(parquet, "write_table", lambda table, where, **kw: (written.append(str(where)),
                                                                             real(table, where, **kw)))
    export_store(target, np.eye(3, 4, dtype=np.float32), rows, Metadata(pa.table({"stock": [1, 2, 3]})),
                 {"backend": "onnx", "onnx_sha256": "a" * 64}, "s" * 64)
    assert [p.rsplit("/", 1)[1].split(".")[:3] for p in written] == [["", "part_00000", "parquet"]]
    left = target.folder / ".part_00001.parquet.0a1b2c3d.tmp"  # as a kill before the rename leaves it
    real(pq.read_table(target.folder / "part_00000.parquet"), left)
    assert pq.read_table(target.folder).num_rows == 3  # skipped by a reader of the folder
    export_store(target, np.eye(3, 4, dtype=np.float32)[::-1].copy(), rows, Metadata(pa.table({"stock": [1, 2, 3]})),
                 {"backend": "onnx", "onnx_sha256": "a" * 64}, "t" * 64)
    assert not left.exists() and pq.read_table(target.folder).num_rows == 3
    back = pq.read_table(target.folder).to_pylist()  # the second export's vectors, each under its own file
    assert {r["file"]: r["embedding"] for r in back} == {f"img_{i}.jpg": list(np.eye(3, 4)[2 - i]) for i in range(3)}


def test_nan_decimals_and_dates_go_out_as_the_databases_filter_them(tmp_path):
    """A float's NaN is a missing value to our filters: null in every export, so `price IS NULL` and
    `price > 100` agree with LanceDB's; a decimal goes to Qdrant as a number (its range filters
    compare numbers, not text) and a date or timestamp in ISO 8601 (what its datetime range parses)."""
    import datetime
    import decimal
    import hashlib

    import pyarrow as pa
    from qdrant_client import QdrantClient, models

    from pipeline.metadata import Metadata
    from pipeline.store import ManifestRow
    from pipeline.vectordb import ExportTarget, export_store

    n = 4
    rows = [ManifestRow(index=i, file=f"img_{i}.jpg", source_row=i, embedding_row=i,
                        source_sha256=hashlib.sha256(bytes([i])).hexdigest()) for i in range(n)]
    vectors = np.eye(n, 8, dtype=np.float32)
    meta = Metadata(pa.table({
        "price": pa.array([10.0, float("nan"), 150.0, None]),
        "cost": pa.array([decimal.Decimal(x) for x in ("49.50", "120.00", "9.99", "5.25")], pa.decimal128(10, 2)),
        "day": pa.array([datetime.date(2026, 1, d) for d in (1, 2, 3, 4)]),
        "ts": pa.array([datetime.datetime(2026, 1, d, 10, tzinfo=datetime.UTC) for d in (1, 2, 3, 4)],
                       pa.timestamp("us", tz="UTC")),
        "weight": pa.array([19.99, 5.0, 19.99, 30.1], pa.float32()),
    }))
    identity = {"backend": "onnx", "onnx_sha256": "a" * 64}
    for kind in ("lancedb", "qdrant", "parquet"):
        export_store(ExportTarget(kind, tmp_path / kind), vectors, rows, meta, identity, "s" * 64)
    table = lancedb.connect(str(tmp_path / "lancedb")).open_table("gallery")
    for where in ("price IS NULL", "price > 100", "NOT price < 50", "price != 10",
                  "day >= date '2026-01-02'", "day IN (DATE '2026-01-01', DATE '2026-01-04')"):  # SQL's form: one text
        lance = sorted(table.search().where(where).limit(10).to_arrow().column("file").to_pylist())
        assert lance == [f"img_{i}.jpg" for i in np.flatnonzero(meta.mask(where))], where
    back = pq.read_table(sorted((tmp_path / "parquet").glob("part_*.parquet"))[0])
    assert back.column("price").to_pylist() == [10.0, None, 150.0, None]
    client = QdrantClient(path=str(tmp_path / "qdrant"))

    def found(condition) -> list[int]:
        points = client.query_points("gallery", query=[1.0] * 8, query_filter=models.Filter(must=[condition]),
                                     limit=10).points
        return sorted(int(p.payload["file"][4]) for p in points)

    assert found(models.FieldCondition(key="cost", range=models.Range(lt=100))) == [0, 2, 3]
    assert found(models.IsNullCondition(is_null=models.PayloadField(key="price"))) == [1, 3]
    for key in ("day", "ts"):
        assert found(models.FieldCondition(key=key, range=models.DatetimeRange(gte="2026-01-03T00:00:00Z"))) == [2, 3]
    # a float32 goes out as the shortest decimal it is (19.99, not 19.989999771118164): a range on 19.99
    # keeps what our filter keeps
    at_least = models.FieldCondition(key="weight", range=models.Range(gte=19.99))
    assert found(at_least) == list(np.flatnonzero(meta.mask("weight >= 19.99"))) == [0, 2, 3]
    # an export whose payloads were written before (widened floats, no payload version) is written again whole
    client.set_payload("gallery", {"weight": float(np.float32(19.99))},
                       points=models.Filter(must=[models.FieldCondition(key="file", match=models.MatchValue(
                           value="img_0.jpg"))]))
    assert found(at_least) == [2, 3]
    client.close()
    record_path = tmp_path / "qdrant" / "_fashion_export.json"
    record = json.loads(record_path.read_text())
    assert record.pop("payload") == 2
    record_path.write_text(json.dumps(record))
    export_store(ExportTarget("qdrant", tmp_path / "qdrant"), vectors, rows, meta, identity, "s" * 64)
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    assert found(at_least) == [0, 2, 3]
    assert json.loads(record_path.read_text())["payload"] == 2
    client.close()


def test_an_export_without_model_flags_exports_the_store_as_made(exported, tmp_path, capsys):
    """--export only reads the store: with no --model or --onnx, whatever made it is exported (it
    was refused against the default model); a model asked for is still checked against it."""
    _, out, targets, _ = exported
    target = tmp_path / "again.parquet"
    assert cli.main(["--output-dir", str(out), "--export", f"parquet:{target}"]) == 0
    import pyarrow.dataset as pads

    again = pads.dataset(target).to_table().sort_by("key")
    first = pads.dataset(targets["parquet"]).to_table().sort_by("key")
    assert again.column("key").to_pylist() == first.column("key").to_pylist()
    assert np.array_equal(np.stack(again.column("embedding").to_numpy(zero_copy_only=False)),
                          np.stack(first.column("embedding").to_numpy(zero_copy_only=False)))
    capsys.readouterr()
    (tmp_path / "other").mkdir()  # a folder there (a path with nothing there is refused as a bad flag, exit 2)
    assert cli.main(["--output-dir", str(out), "--model", str(tmp_path / "other"), "--backend", "torch",
                     "--export", f"parquet:{tmp_path / 'x.parquet'}"]) == 1
    assert "To reuse it, ask for what made it" in capsys.readouterr().err


def test_a_column_named_as_lancedbs_own_result_columns_goes_out_prefixed(tmp_path):
    """A catalogue column `_distance` (or `_rowid`) clashed with the column LanceDB adds to a vector
    search's results: every search of the exported table failed. It goes out as meta__distance."""
    import hashlib

    import pyarrow as pa

    from pipeline.metadata import Metadata
    from pipeline.store import ManifestRow
    from pipeline.vectordb import ExportTarget, export_store

    rows = [ManifestRow(index=i, file=f"img_{i}.jpg", source_row=i, embedding_row=i,
                        source_sha256=hashlib.sha256(bytes([i])).hexdigest()) for i in range(3)]
    meta = Metadata(pa.table({"_distance": pa.array([1.5, 2.5, 3.5]), "_rowid": pa.array([7, 8, 9])}))
    export_store(ExportTarget("lancedb", tmp_path / "l"), np.eye(3, 4, dtype=np.float32), rows, meta,
                 {"backend": "onnx", "onnx_sha256": "a" * 64}, "s" * 64)
    table = lancedb.connect(str(tmp_path / "l")).open_table("gallery")
    found = table.search(np.array([0, 1, 0, 0], np.float32)).distance_type("cosine").limit(2).to_arrow()
    assert found.column("file").to_pylist()[0] == "img_1.jpg"
    assert found.column("meta__distance").to_pylist()[0] == 2.5 and found.column("meta__rowid").to_pylist()[0] == 8
    assert found.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-6)


def test_another_catalogues_store_is_not_exported_over_an_export(exported, tiny_onnx, tmp_path, capsys):
    """Same embedder, another catalogue (a mistyped --output-dir): its export replaced the shop's row
    by row ("added 2, changed 6, removed 19"). The record names the catalogue; another is refused
    before anything is written, and an export recorded before it named one gains the name."""
    data, out, targets, _ = exported
    other = write_shop(tmp_path / "other-shop", n=6)
    other_out = tmp_path / "other-out"
    assert run(*args(other, tiny_onnx, other_out)) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in targets["parquet"].iterdir())
    capsys.readouterr()
    assert cli.main(["--export", f"parquet:{targets['parquet']}", "--output-dir", str(other_out)]) == 1
    err = capsys.readouterr().err
    assert (f"{targets['parquet']} holds the export of another catalogue (standard gallery of {str(data)!r}); this "
            f"store is the standard gallery of {str(other)!r}") in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in targets["parquet"].iterdir()) == before
    record_path = targets["parquet"] / "_fashion_export.json"
    record = json.loads(record_path.read_text())
    assert record.pop("catalogue") == {"dataset": str(data), "kind": "standard"}
    record_path.write_text(json.dumps(record))  # as an export made before the catalogue was recorded
    assert cli.main(["--export", f"parquet:{targets['parquet']}", "--output-dir", str(out)]) == 0
    assert json.loads(record_path.read_text())["catalogue"] == {"dataset": str(data), "kind": "standard"}
    # another configuration of the same hub dataset is another catalogue (its sidecar made to say so here)
    sidecar = other_out / "embeddings" / "embeddings.json"
    made = json.loads(sidecar.read_text())
    made["source"].update(dataset=str(data), config="women")
    sidecar.write_text(json.dumps(made))
    capsys.readouterr()
    assert cli.main(["--export", f"parquet:{targets['parquet']}", "--output-dir", str(other_out)]) == 1
    assert (f"(standard gallery of {str(data)!r}); this store is the standard gallery of {str(data)!r}, "
            "configuration 'women'") in capsys.readouterr().err


def test_two_exports_into_one_folder_take_turns(exported, tmp_path, monkeypatch):
    """Two --export runs into one folder at once renamed each other's part files away ("unexpected
    FileNotFoundError"): the second waits for the first, then brings it up to date."""
    import threading
    import time

    from pipeline import vectordb
    from pipeline.fileio import waiting_lock

    _, out, _, _ = exported
    target = tmp_path / "turns.parquet"
    codes: list[int] = []
    waited = threading.Event()
    monkeypatch.setattr(vectordb, "waiting_lock", lambda path, said: waiting_lock(path, lambda: (said(), waited.set())))
    target.mkdir()
    with waiting_lock(target / ".export-lock"):  # another export, holding the folder
        second = threading.Thread(target=lambda: codes.append(cli.main(
            ["--export", f"parquet:{target}", "--output-dir", str(out), "-q"])))
        second.start()
        assert waited.wait(60)  # it waits for the lock, writing nothing
        time.sleep(0.5)
        assert second.is_alive() and [p.name for p in target.iterdir()] == [".export-lock"]
    second.join(120)
    assert codes == [0] and (target / "_fashion_export.json").is_file()
    assert not (target / ".export-lock").exists()  # the lock file goes with the lock
    # what it wrote is this store's export: the same keys, vectors and values as the fixture's of it
    import pandas as pd

    ours, theirs = pd.read_parquet(target), pd.read_parquet(exported[2]["parquet"])
    assert len(ours) == len(Catalog.open(out)) and sorted(ours["key"]) == sorted(theirs["key"])
    ours, theirs = ours.set_index("key").sort_index(), theirs.set_index("key").sort_index()
    assert np.array_equal(np.stack(ours["embedding"]), np.stack(theirs["embedding"]))

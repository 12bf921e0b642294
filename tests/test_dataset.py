"""Dataset reader: order, limits, resume offsets, folders, and clear errors."""

from __future__ import annotations

import pytest

from pipeline.dataset import DatasetSpec, count_rows, iter_records
from pipeline.errors import PipelineError
from tests import assets


@pytest.fixture(scope="module")
def parquet_ds(tmp_path_factory):
    cells = [assets.encode(assets.rgb_image(4, 4, color=(i, 0, 0)), "PNG") for i in range(12)]
    cells[3] = None
    return assets.write_parquet_dataset(
        tmp_path_factory.mktemp("pq") / "ds", cells, extra={"label": [f"l{i}" for i in range(12)]}
    )


def test_parquet_order_limit_and_start(parquet_ds):
    recs = list(iter_records(DatasetSpec(str(parquet_ds), limit=8)))
    assert [r.source_row for r in recs] == list(range(8))
    assert recs[3].data is None and "empty" in recs[3].error
    assert recs[5].data == assets.encode(assets.rgb_image(4, 4, color=(5, 0, 0)), "PNG")
    tail = list(iter_records(DatasetSpec(str(parquet_ds), limit=8), start=6))
    assert [r.source_row for r in tail] == [6, 7] and tail[0].data == recs[6].data
    assert count_rows(DatasetSpec(str(parquet_ds), limit=None)) == 12
    assert count_rows(DatasetSpec(str(parquet_ds), limit=5)) == 5


def test_only_some_rows_reads_only_their_row_groups(tmp_path, monkeypatch):
    """--update's new photos: the rows asked for, in order, from just the row groups that hold them
    (3 shards of 60 rows in groups of 20)."""
    import pyarrow.parquet as pq

    ds = assets.write_hub_dataset(tmp_path / "ds", shards=3, rows_per_shard=60, row_group=20, size_wh=(8, 8))
    spec = DatasetSpec(str(ds), limit=None)
    every = {r.source_row: r for r in iter_records(spec)}
    read: list[int] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *a, row_groups=None, **kw):
        read.extend(row_groups)
        return iter_batches(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    only = frozenset({3, 5, 61, 179})
    recs = list(iter_records(spec, only=only))
    assert [r.source_row for r in recs] == [3, 5, 61, 179]
    assert [r.data for r in recs] == [every[k].data for k in (3, 5, 61, 179)]
    assert read == [0, 0, 2], read  # shard 1's group 0 (3, 5), shard 2's group 0 (61), shard 3's group 2 (179)
    read.clear()
    assert [r.source_row for r in iter_records(spec, start=4, only=only)] == [5, 61, 179]
    assert [r.source_row for r in iter_records(DatasetSpec(str(ds), limit=100), only=only)] == [3, 5, 61]
    assert read == [0, 0, 2, 0, 0]  # the limit stops before shard 3
    read.clear()
    assert [r.source_row for r in iter_records(spec, start=62, only=only)] == [179]
    assert read == [2]  # shard 2's first group holds 61 only, before the start: not read
    read.clear()
    assert list(iter_records(spec, only=frozenset())) == [] and read == []


def test_single_parquet_file_and_save_to_disk(parquet_ds, tmp_path):
    import datasets

    f = next((parquet_ds / "data").glob("*.parquet"))
    assert len(list(iter_records(DatasetSpec(str(f), limit=None)))) == 12
    saved = tmp_path / "saved"
    datasets.load_dataset(str(parquet_ds), split="train").save_to_disk(str(saved))
    recs = list(iter_records(DatasetSpec(str(saved), limit=4), start=1))
    assert [r.source_row for r in recs] == [1, 2, 3]


def test_image_folder_natural_order(tmp_path):
    for name in ["img_10.jpg", "img_2.jpg", "img_1.jpg", "notes.txt", "sub/img_0.png"]:
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(assets.jpeg_bytes(8, 8) if name.endswith((".jpg", ".png")) else b"x")
    recs = list(iter_records(DatasetSpec(str(tmp_path), limit=None)))
    assert [r.source for r in recs] == ["img_1.jpg", "img_2.jpg", "img_10.jpg", "sub/img_0.png"]
    assert count_rows(DatasetSpec(str(tmp_path), limit=2)) == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        (lambda p: DatasetSpec(str(p), image_column="photo"), "no column 'photo'"),
        (lambda p: DatasetSpec(str(p), split="validation"), "validation"),
        (lambda p: DatasetSpec("../weird path!"), "neither an existing path nor a hub id"),
    ],
)
def test_errors_name_the_problem(parquet_ds, spec, message):
    with pytest.raises(PipelineError, match=message):
        list(iter_records(spec(parquet_ds)))


def test_empty_folder(tmp_path):
    with pytest.raises(PipelineError, match="no image files"):
        list(iter_records(DatasetSpec(str(tmp_path))))


def test_hub_id_offline_says_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="--dataset DIR|lirus18"):
        list(iter_records(DatasetSpec("lirus18/deepfashion", limit=2)))


def test_arrow_numpy_equals_to_numpy_for_numbers_booleans_and_the_rest():
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.dataset import arrow_numpy, int64_array

    ints = int64_array(range(-3, 17))
    with pytest.raises(TypeError, match="integers"):
        int64_array([1.5, 2.0])
    given = np.arange(3)
    copied = int64_array(given)
    given[0] = 7  # the Arrow array holds its own copy
    assert copied.to_pylist() == [0, 1, 2]
    assert ints.type == pa.int64() and ints.to_pylist() == list(range(-3, 17)) and len(int64_array([])) == 0
    cases = [
        ints, ints.slice(5, 7), pa.array([1, 250, 7], pa.uint8()).slice(1), pa.array([-2, 3], pa.int16()),
        pa.array([0.5, -1.25, 3.0], pa.float32()).slice(1, 1), pa.array([2.5, 1e300], pa.float64()),
        pc.greater(ints, 4).slice(3, 11),  # booleans from an offset that is not a multiple of 8
        pa.array([1.5, None]), pa.array(["a", "b"]), pa.array([], pa.int32()),  # nulls, strings, empty: to_numpy
        pa.chunked_array([ints.slice(1, 2), ints.slice(9)]), pa.chunked_array([ints.slice(2, 3)]),
        pa.chunked_array([], pa.int64()),
    ]
    for values in cases:
        want = values.to_numpy() if isinstance(values, pa.ChunkedArray) else values.to_numpy(zero_copy_only=False)
        got = arrow_numpy(values)
        assert got.dtype == want.dtype and got.shape == want.shape, values
        assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), values


@pytest.mark.subprocess
def test_metadata_columns_are_read_without_importing_pandas(parquet_ds, tmp_path):
    # pa.array(), to_numpy() and pq.read_table all import pandas (0.3 s): the metadata path avoids them
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("pandas")  # else the check below says nothing
    code = (
        "import sys, numpy as np\n"
        "from pipeline.dataset import DatasetSpec, read_metadata, arrow_numpy\n"
        f"t = read_metadata(DatasetSpec({str(parquet_ds)!r}, limit=None))\n"
        "rows = arrow_numpy(t.column('source_row'))\n"
        "assert rows.tolist() == list(range(12)) and t.column('label').to_pylist()[2] == 'l2', rows\n"
        "print('pandas' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_dataset_stamp_covers_what_a_build_reads_and_only_that(tmp_path):
    """A resume is refused when the files a build reads changed: an image folder's first --limit
    pictures (one added after them is not read), a parquet dataset's split (another split's file is
    not); a hub dataset is not stamped (its commit moves with a README edit)."""
    import os

    from pipeline.dataset import DatasetSpec, dataset_stamp
    from tests import assets

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"img_{i}.jpg").write_bytes(assets.jpeg_bytes(20, 20, seed=i))
    two = DatasetSpec(str(folder), limit=2)
    before = dataset_stamp(two)
    assert before is not None and before.startswith("2 file(s), ")
    (folder / "img_9.jpg").write_bytes(assets.jpeg_bytes(20, 20, seed=9))  # after the first two: not read
    assert dataset_stamp(two) == before
    (folder / "img_0.jpg").write_bytes(assets.jpeg_bytes(20, 20, seed=5))  # read: changed
    assert dataset_stamp(two) != before
    import shutil

    parquet = assets.write_parquet_dataset(tmp_path / "pq", [assets.jpeg_bytes(20, 20)])
    train_file = parquet / "data" / "train-00000-of-00001.parquet"
    other = shutil.copy(train_file, parquet / "data" / "test-00000-of-00001.parquet")
    train = DatasetSpec(str(parquet), split="train")
    before = dataset_stamp(train)
    assert before is not None and before.startswith("1 file(s), ")
    os.utime(other, ns=(1, 1))
    assert dataset_stamp(train) == before
    os.utime(train_file, ns=(1, 1))
    assert dataset_stamp(train) != before
    assert dataset_stamp(DatasetSpec("owner/catalogue")) is None


def test_id_column_on_an_image_folder_says_what_its_metadata_is_for(tmp_path):
    from pipeline.dataset import check_dataset

    (tmp_path / "p0.jpg").write_bytes(assets.jpeg_bytes(20, 20))
    (tmp_path / "metadata.csv").write_text("file_name,item_id\np0.jpg,P1\n")
    with pytest.raises(PipelineError, match="--id-column takes a column of a parquet or saved dataset, and a folder's "
                                            "metadata.csv values are kept as metadata only"):
        check_dataset(DatasetSpec(name=str(tmp_path), id_column="item_id"))


def _split_folder(root):
    """train/ and test/ of two categories each, with their own metadata.csv, and one picture at the root."""
    for split, seed in (("train", 0), ("test", 100)):
        for label in ("dresses", "shirts"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                (root / split / label / f"{i}.jpg").write_bytes(assets.jpeg_bytes(20, 30, seed=seed + i))
        lines = [f"{label}/{i}.jpg,{split}-{label}-{i}" for label in ("dresses", "shirts") for i in range(2)]
        (root / split / "metadata.csv").write_text("file_name,sku\n" + "\n".join(lines) + "\n")
    (root / "stray.jpg").write_bytes(assets.jpeg_bytes(20, 30, seed=7))
    return root


def test_an_image_folder_laid_out_by_split_is_read_one_split_at_a_time(tmp_path, caplog):
    """As the Hugging Face ImageFolder reads it: train/ and test/ are splits (their labels and
    metadata.csv their own), not one gallery of every picture; what belongs to no split is said."""
    import logging

    from pipeline.dataset import read_metadata

    root = _split_folder(tmp_path / "shop")
    (root / "misc").mkdir()
    with caplog.at_level(logging.WARNING, logger="pipeline.dataset"):
        assert count_rows(DatasetSpec(name=str(root))) == 4
        assert count_rows(DatasetSpec(name=str(root))) == 4
    assert caplog.text.count(f"{root} is laid out by split (test, train): 1 picture(s) at its top and its folders "
                             "misc belong to none and are not read") == 1  # said once
    for split in ("train", "test"):
        spec = DatasetSpec(name=str(root), split=split)
        records = list(iter_records(spec))
        assert [r.source for r in records] == ["dresses/0.jpg", "dresses/1.jpg", "shirts/0.jpg", "shirts/1.jpg"]
        assert records[0].data == (root / split / "dresses" / "0.jpg").read_bytes()
        assert count_rows(spec) == 4
        table = read_metadata(spec)
        assert table.column("folder").to_pylist() == ["dresses", "dresses", "shirts", "shirts"]
        assert table.column("sku").to_pylist()[0] == f"{split}-dresses-0"
    with pytest.raises(PipelineError, match=r"has splits \['test', 'train'\] \(its subfolders test/, train/\), "
                                            r"not 'validation'; choose one with --split"):
        list(iter_records(DatasetSpec(name=str(root), split="validation")))
    (root / "train").rename(root / "training")  # another of the names datasets takes for it
    assert count_rows(DatasetSpec(name=str(root))) == 4


def test_a_folder_without_split_subfolders_is_read_whole_and_another_split_is_said(tmp_path, caplog):
    """Every picture is split 'train', as that reader has it; asked for another split (a store made
    before splits were read records one), the folder is read whole, as it was then, and said."""
    import logging

    (tmp_path / "dresses").mkdir()
    (tmp_path / "dresses" / "a.jpg").write_bytes(assets.jpeg_bytes(20, 30))
    with caplog.at_level(logging.WARNING, logger="pipeline.dataset"):
        assert count_rows(DatasetSpec(name=str(tmp_path))) == 1
        assert not caplog.text
        assert count_rows(DatasetSpec(name=str(tmp_path), split="test")) == 1
    assert "has no split subfolders (train/, validation/, test/): every picture is read, as split 'train' would " \
           "be, not split 'test' alone" in caplog.text


def test_odd_names_and_files_of_an_image_folder(tmp_path, monkeypatch):
    """A name that is not UTF-8 (a Latin-1 zip's) is read, and named with a %XX escape a CSV can hold; a
    pipe named like a picture is a recorded failure, not a read that waits forever; a linked folder is
    walked once (a link back up the tree is not); the picture suffixes Pillow reads (.jpe, .ppm) are
    listed; the stamp of such a folder is made; a parquet cell of empty bytes is an empty file, not
    the file of its path in the current folder (as datasets reads it)."""
    import os

    from pipeline.dataset import dataset_stamp
    from pipeline.search import expand_image_paths

    root, outside = tmp_path / "shop", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jpg").write_bytes(assets.jpeg_bytes(8, 8, seed=1))
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as f:
        f.write(assets.jpeg_bytes(8, 8, seed=2))
    os.mkfifo(root / "pipe.jpg")
    (outside / "linked.jpg").write_bytes(assets.jpeg_bytes(8, 8, seed=3))
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "b.jpe").write_bytes(assets.jpeg_bytes(8, 8, seed=4))
    assets.rgb_image(8, 8, seed=5).save(root / "c.ppm")
    spec = DatasetSpec(str(root), limit=None)
    recs = {r.source: r for r in iter_records(spec)}
    assert sorted(recs) == ["a.jpg", "b.jpe", "c.ppm", "caf%E9.jpg", "link/linked.jpg", "pipe.jpg"]
    assert recs["pipe.jpg"].data is None and "not a regular file" in recs["pipe.jpg"].error
    assert all(r.data for name, r in recs.items() if name != "pipe.jpg")
    assert recs["caf%E9.jpg"].data == assets.jpeg_bytes(8, 8, seed=2)
    assert recs["link/linked.jpg"].data == assets.jpeg_bytes(8, 8, seed=3)  # each file's own bytes
    assert recs["c.ppm"].data == (root / "c.ppm").read_bytes() and recs["b.jpe"].data == assets.jpeg_bytes(8, 8, seed=4)
    assert dataset_stamp(spec).startswith("6 file(s)")
    # a query folder is listed as a gallery's: the same files, the pipe among them to be recorded as failed
    assert sorted(p.relative_to(root).as_posix() for p in expand_image_paths([str(root)])) == sorted(
        [os.fsdecode(b"caf\xe9.jpg"), "a.jpg", "b.jpe", "c.ppm", "link/linked.jpg", "pipe.jpg"])
    # a parquet cell of no bytes names a file of the current folder: an empty image all the same
    monkeypatch.chdir(root)
    ds = assets.write_parquet_dataset(tmp_path / "pq", [assets.jpeg_bytes(8, 8, seed=6), b""])
    import pyarrow.parquet as pq

    table = next((tmp_path / "pq").rglob("*.parquet"))
    cells = pq.read_table(table).to_pylist()
    cells[1]["image"]["path"] = "a.jpg"
    pq.write_table(pq.read_table(table).from_pylist(cells, schema=pq.read_schema(table)), table)
    second = list(iter_records(DatasetSpec(str(ds), limit=None)))[1]
    assert second.data == b"" and second.source == "a.jpg"  # decoded as an empty file, not a.jpg's picture


def test_a_metadata_csv_names_a_picture_in_either_unicode_form(tmp_path):
    """macOS writes a file name decomposed (NFD: 'e' + a combining accent); a metadata.csv typed
    elsewhere has it composed (NFC): the same name, whose line was left out as naming no picture."""
    import unicodedata

    from pipeline.dataset import read_metadata

    root = tmp_path / "shop"
    root.mkdir()
    (root / unicodedata.normalize("NFD", "robe_été.jpg")).write_bytes(assets.jpeg_bytes(8, 8, seed=1))
    (root / "plain.jpg").write_bytes(assets.jpeg_bytes(8, 8, seed=2))
    (root / "metadata.csv").write_text("file_name,price\n" + unicodedata.normalize("NFC", "robe_été.jpg") + ",19.5\n"
                                       "plain.jpg,5\n", encoding="utf-8")
    table = read_metadata(DatasetSpec(str(root), limit=None))
    assert table.column("price").to_pylist() == [5.0, 19.5]  # plain.jpg, then robe_été.jpg in natural order


def test_a_link_listed_before_the_folder_it_points_to_does_not_take_its_pictures(tmp_path):
    """`a_latest -> z/` sorts before z/: walked first, it took z's pictures under its own name, which
    renamed every source (and the next --update saw other names)."""
    from pipeline.dataset import list_pictures

    root = tmp_path / "shop"
    (root / "z" / "2024").mkdir(parents=True)
    (root / "z" / "x.jpg").write_bytes(assets.jpeg_bytes(8, 8))
    (root / "z" / "2024" / "y.jpg").write_bytes(assets.jpeg_bytes(8, 8, seed=2))
    (root / "a_latest").symlink_to(root / "z", target_is_directory=True)
    (root / "a_year").symlink_to(root / "z" / "2024", target_is_directory=True)  # a folder deeper in the tree
    assert list_pictures(root) == ["z/2024/y.jpg", "z/x.jpg"]  # in natural order, each under its own name


def test_metadata_texts_and_names_are_read_in_one_unicode_form(tmp_path):
    """A CSV whose lines were written on a Mac (NFD: 'e' + a combining accent) and elsewhere (NFC):
    `cat = 'Robe d''été'` matched half the category and --group-by made two products of one."""
    import unicodedata

    import pyarrow as pa

    from pipeline.dataset import read_metadata
    from pipeline.filters import Filter
    from pipeline.metadata import product_labels

    nfd = lambda text: unicodedata.normalize("NFD", text)  # noqa: E731
    root = tmp_path / "shop"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(assets.jpeg_bytes(8, 8, seed=i))
    cells = ["Robe d'été", nfd("Robe d'été"), "Robe d'été", nfd("Robe d'été")]
    (root / "metadata.csv").write_text(f"file_name,category,{nfd('größe')},product\n" + "".join(
        f"{i}.jpg,\"{c}\",M,{nfd('Ñandú') if i % 2 else 'Ñandú'}\n" for i, c in enumerate(cells)), encoding="utf-8")
    assert nfd("Robe d'été") != "Robe d'été"
    table = read_metadata(DatasetSpec(str(root), limit=None))
    assert table.column("category").to_pylist() == ["Robe d'été"] * 4
    assert "größe" in table.column_names and table.column("größe").to_pylist() == ["M"] * 4
    labels, unlabelled = product_labels(table.column("product"))
    assert unlabelled == 0 and len(set(labels.tolist())) == 1  # one product, not two
    for typed in ("category = 'Robe d''été'", nfd("category = 'Robe d''été' AND größe = 'M'")):
        assert Filter.parse(typed, table.schema).mask(table).tolist() == [True] * 4, typed
    dictionary = pa.table({"c": pa.array([nfd("é"), "é"]).dictionary_encode()})
    from pipeline.dataset import in_one_unicode_form

    assert in_one_unicode_form(dictionary).column("c").to_pylist() == ["é", "é"]


def test_a_metadata_line_names_a_picture_whose_name_is_not_utf8_as_the_pipeline_writes_it(tmp_path):
    """caf\\xe9.jpg is written caf%E9.jpg in the manifest and every output: a metadata.csv line of that
    name gives it its values (the line was left out, and the warning spelled the name 'caf\\udce9.jpg')."""
    import os

    from pipeline.dataset import read_metadata

    root = tmp_path / "shop"
    root.mkdir()
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb") as f:
        f.write(assets.jpeg_bytes(8, 8, seed=1))
    (root / "metadata.csv").write_text("file_name,price\ncaf%E9.jpg,20\n", encoding="utf-8")
    assert read_metadata(DatasetSpec(str(root), limit=None)).column("price").to_pylist() == [20]


def test_an_image_column_of_numbers_is_refused_before_any_row_is_read(tmp_path):
    """--image-column naming a column of prices was found by failing every row ("image cell of
    unexpected type float"); the dataset's types say it first, and which columns could hold pictures.
    A column of paths or bytes is taken, in a parquet folder and in a save_to_disk dataset alike."""
    import datasets

    from pipeline.dataset import check_dataset

    cells = [assets.jpeg_bytes(20, 30, seed=i) for i in range(3)]
    folder = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={
        "price": [9.5, 12.0, 30.25], "stock": [3, 0, 12], "link": ["a.jpg", "b.jpg", "c.jpg"]})
    saved = tmp_path / "saved"
    datasets.load_dataset(str(folder), split="train").save_to_disk(str(saved))
    for where in (folder, saved):
        for column, held in (("price", "double"), ("stock", "int64")):
            spec = DatasetSpec(str(where), image_column=column)
            with pytest.raises(PipelineError) as e:
                check_dataset(spec) if where == folder else list(iter_records(spec))
            msg = str(e.value)
            assert f"column '{column}' holds {held}" in msg and "not pictures" in msg, msg
            assert "Columns that can hold pictures: ['image', 'link']; choose one with --image-column." in msg, msg
        # a column of paths is a picture column: its rows are read (and fail here, as no such file is there)
        recs = list(iter_records(DatasetSpec(str(where), image_column="link")))
        assert [r.source for r in recs] == ["a.jpg", "b.jpg", "c.jpg"] and all(r.error for r in recs)
    assert len(list(iter_records(DatasetSpec(str(folder))))) == 3
    # a file that names a column twice is read as before (its pictures' column is not told from the other)
    import pyarrow as pa

    from pipeline.dataset import check_columns

    check_columns(DatasetSpec("x"), pa.schema([("image", pa.binary()), ("image", pa.float64())]))

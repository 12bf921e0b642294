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

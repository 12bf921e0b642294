"""Atomic files, manifest round trip, shard resume rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import fileio
from pipeline.errors import CacheMismatchError, PipelineError
from pipeline.fileio import atomic_write_bytes, npy_bytes
from pipeline.store import PARTIAL_DIR, ManifestRow, Shard, ShardStore, ThumbnailReader, manifest_to_csv, read_manifest


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_manifest_round_trip(tmp_path):
    rows = [
        ManifestRow(0, "img_00000.jpg", 0, "ds[0]", "ab", 10, 20, "ok", "", "", 0),
        ManifestRow(1, "", 1, "ds[1]", "", 0, 0, "failed", 'bad, "quoted"\nerror', "", -1),
        ManifestRow(3, "", 3, "shop\r\nfolder/a.jpg", "", 0, 0, "failed", "line one\r\nline two\r", "", -1),
        ManifestRow(
            2, "seg_00002_p00.jpg", 2, "ds[2]", "cd", 5, 6, "ok", "", "", 1, 0, 1.5, 2.0, 30.0, 40.25, 777, 0.875
        ),
    ]
    p = tmp_path / "m.csv"
    p.write_text(manifest_to_csv(rows))
    assert read_manifest(p) == rows


def test_shards_resume_only_with_same_params(tmp_path):
    params = {"a": 1}
    store = ShardStore(tmp_path, params, fresh=False)
    rows = [ManifestRow(0, "f", 0, embedding_row=0)]
    store.write(Shard(0, 0, 1, np.ones((1, 4), np.float32), rows, np.zeros((1, 2, 2, 3), np.uint8)))
    again = list(ShardStore(tmp_path, params, fresh=False).completed())
    assert len(again) == 1 and again[0].stop == 1 and np.array_equal(again[0].embeddings, np.ones((1, 4)))
    with pytest.raises(PipelineError, match=r"(?s)different arguments:\n  a: cache has 1, asked for 2.*--fresh"):
        ShardStore(tmp_path, {"a": 2}, fresh=False)
    assert list(ShardStore(tmp_path, {"a": 2}, fresh=True).completed()) == []


def test_a_resume_refusal_says_what_no_argument_can_give_back(tmp_path):
    """A damaged run.json listed every field as '<absent>' and told to "run with the same
    arguments"; a model's bytes replaced in place were "different arguments" too."""
    params = {"identity": {"model": "m", "model_sha256": "a" * 64}, "batch_size": 4}
    store = ShardStore(tmp_path, params, fresh=False)
    store.write(Shard(0, 0, 1, np.ones((1, 4), np.float32), [ManifestRow(0, "f", 0, embedding_row=0)],
                      np.zeros((1, 2, 2, 3), np.uint8)))
    retrained = {"identity": {"model": "m", "model_sha256": "b" * 64}, "batch_size": 4}
    with pytest.raises(PipelineError, match=r"(?s)with different arguments, or files whose bytes changed since it "
                                            r"started .*identity\.model_sha256: cache has 'a+', asked for 'b+'.*"
                                            r"Run with the same arguments and files to resume it, or add --fresh"):
        ShardStore(tmp_path, retrained, fresh=False)
    # a key the run on disk recorded and this one lacks (its weights file no longer at the path): named too
    with pytest.raises(PipelineError, match=r"(?s)since it started .*:\n  segmenter_weights: cache has 'w', asked "
                                            r"for '<absent>'\nRun with"):
        (tmp_path / ".partial" / "run.json").write_text(json.dumps({**params, "segmenter_weights": "w"}))
        ShardStore(tmp_path, params, fresh=False)
    (tmp_path / ".partial" / "run.json").write_text('{"identity": {"mod')
    with pytest.raises(PipelineError, match=r"whose run.json is damaged \(unreadable\): what made them cannot be "
                                            r"known, so they are not resumed. Add --fresh to start over.$"):
        ShardStore(tmp_path, params, fresh=False)
    # removed by hand: its shards may be of another dataset and model, resumed under this run's record
    (tmp_path / ".partial" / "run.json").unlink()
    with pytest.raises(PipelineError, match=r"without its run.json \(removed or lost\): what made them cannot be "
                                            r"known, so they are not resumed. Add --fresh to start over.$"):
        ShardStore(tmp_path, params, fresh=False)
    assert not (tmp_path / ".partial" / "run.json").exists()  # not written over the shards either
    assert list(ShardStore(tmp_path, params, fresh=True).completed()) == []


def test_damaged_shard_is_recomputed_not_trusted(tmp_path):
    store = ShardStore(tmp_path, {}, fresh=False)
    for n in range(2):
        store.write(
            Shard(
                n,
                n,
                n + 1,
                np.full((1, 4), n, np.float32),
                [ManifestRow(n, "f", n, embedding_row=0)],
                np.zeros((1, 2, 2, 3), np.uint8),
            )
        )
    (tmp_path / ".partial" / "shard_00001.npy").write_bytes(b"garbage")
    assert [s.number for s in ShardStore(tmp_path, {}, fresh=False).completed()] == [0]
    (tmp_path / ".partial" / "shard_00000.done").unlink()
    assert list(ShardStore(tmp_path, {}, fresh=False).completed()) == []


def test_thumbnail_reader(tmp_path):
    t = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    atomic_write_bytes(tmp_path / "t.npy", npy_bytes(t))
    r = ThumbnailReader(tmp_path / "t.npy")
    assert len(r) == 3 and np.array_equal(r[2], t[2]) and np.array_equal(r[0], t[0])
    r.close()


def test_a_write_test_file_left_by_a_killed_check_is_cleared_next_time(tmp_path, monkeypatch):
    def killed(path):
        raise KeyboardInterrupt  # the run dies between making the probe file and removing it

    monkeypatch.setattr(fileio.os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        fileio.check_writable(tmp_path)
    monkeypatch.undo()
    (tmp_path / "img_00001.jpg").write_bytes(b"x")  # not a temp file: kept
    assert len(list(tmp_path.iterdir())) == 2
    assert fileio.remove_temp_leftovers(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["img_00001.jpg"]


def test_an_unfinished_run_without_a_complete_shard_is_not_resumed(tmp_path, caplog):
    """A run that stopped before its first shard was done left only its run.json (and maybe a half
    shard): nothing to resume, so other arguments start afresh instead of being refused."""
    ShardStore(tmp_path, {"a": 1}, fresh=False)
    (tmp_path / PARTIAL_DIR / "shard_00000.npy").write_bytes(b"half a shard")
    with caplog.at_level("INFO"):
        store = ShardStore(tmp_path, {"a": 2}, fresh=False)
    assert "completed no shard" in caplog.text
    assert sorted(p.name for p in store.dir.iterdir()) == ["run.json"]
    assert json.loads((store.dir / "run.json").read_text()) == {"a": 2}


def test_a_thumbnail_reader_reads_across_segments(tmp_path):
    from pipeline import store as st

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 255, size=(n, 4, 4, 3), dtype=np.uint8) for n in (3, 0, 2, 4)]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.npy")
        np.save(paths[-1], part)
    reader = st.ThumbnailReader(*paths)
    whole = np.concatenate(parts)
    assert reader.shape == whole.shape and len(reader) == 9
    assert all(np.array_equal(reader[i], whole[i]) for i in range(9))
    out = np.empty((6, 4, 4, 3), np.uint8)
    assert np.array_equal(reader.read_into(2, out), whole[2:8])  # spans three files, one of them empty
    with pytest.raises(CacheMismatchError, match="ends before thumbnail 9"):
        reader.read_into(4, np.empty((6, 4, 4, 3), np.uint8))
    reader.close()


def test_an_npy_written_in_chunks_holds_them_and_its_sha256_is_the_files(tmp_path):
    # chunks of either side of the 1 MiB at which a second thread hashes while this one writes; a
    # buffer reused for every chunk (as the update's thumbnail copy does); a wrong row count refused
    import hashlib

    from pipeline.fileio import atomic_write_npy_chunks

    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (70, 128, 128, 3), dtype=np.uint8)  # 48 KiB a row
    buf = np.empty((30, 128, 128, 3), np.uint8)

    def chunks():
        for start, stop in ((0, 1), (1, 30), (30, 31), (31, 60), (60, 70)):
            buf[: stop - start] = rows[start:stop]
            yield buf[: stop - start]

    path = tmp_path / "t.npy"
    sha = atomic_write_npy_chunks(path, rows.shape, np.uint8, chunks())
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert np.array_equal(np.load(path), rows)
    with pytest.raises(ValueError, match="wrote 69 rows, expected 70"):
        atomic_write_npy_chunks(tmp_path / "u.npy", rows.shape, np.uint8, iter([rows[:69]]))
    assert not (tmp_path / "u.npy").exists() and not list(tmp_path.glob(".u.npy.*"))


def test_a_resume_refusal_names_what_only_the_unfinished_run_recorded_at_any_depth():
    """What the run.json holds and the run's parameters do not is named, nested keys too (an
    OpenVINO run's identity.runtime against onnxruntime's, which is left out), the absent runtime
    said as onnxruntime; before, a nested key alone made a refusal that listed nothing."""
    from pipeline.store import _recorded_only_there

    old = {"identity": {"backend": "onnx", "runtime": "openvino", "dim": 16}, "batch_size": 4, "segmenter_weights": "e"}
    asked = {"identity": {"backend": "onnx", "dim": 16}, "batch_size": 4}
    assert _recorded_only_there(old, asked) == [
        "identity.runtime: cache has 'openvino', asked for 'onnxruntime'",
        "segmenter_weights: cache has 'e', asked for '<absent>'",
    ]
    assert _recorded_only_there(asked, asked) == []


def test_a_stores_vectors_are_written_from_the_array_not_a_copy_of_it(tmp_path):
    """The embeddings went through a bytes copy of the whole array (two, with np.save's buffer): an
    update's peak memory was nearly twice a gallery run's at 100k items."""
    import hashlib
    import tracemalloc

    from pipeline.identity import GallerySource, VectorIdentity
    from pipeline.store import write_store

    n = 20_000
    emb = np.random.default_rng(0).standard_normal((n, 256)).astype(np.float32)
    rows = [ManifestRow(index=i, file=f"img_{i:05d}.jpg", source_row=i, embedding_row=i) for i in range(n)]
    tracemalloc.start()
    write_store(tmp_path, emb, rows, [np.zeros((n, 8, 8, 3), np.uint8)], VectorIdentity(backend="onnx"),
                GallerySource(dataset="x"), 8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * emb.nbytes  # the manifest's text and the like: no copy of the vectors (20.5 MB)
    written = (tmp_path / "embeddings.npy").read_bytes()
    assert written == npy_bytes(emb)  # the same bytes, so the same sha256 as every store before
    sidecar = json.loads((tmp_path / "embeddings.json").read_text())
    assert sidecar["embeddings_sha256"] == hashlib.sha256(written).hexdigest()


def test_a_sidecar_with_the_onnx_file_at_its_top_is_read_with_it_in_its_machine_record(tmp_path):
    """For an hour of 2026-12-08 the ONNX file's path was written at the sidecar's top, which this
    version's reader refused as an unknown field; it is read into `machine`, where it is kept now."""
    import json as _json

    from pipeline.identity import GallerySource, VectorIdentity
    from pipeline.store import Sidecar

    made = Sidecar(identity=VectorIdentity(backend="onnx", onnx_sha256="a" * 64), source=GallerySource(kind="standard"),
                   count=1, dim=2, manifest_rows=1, manifest_sha256="m", embeddings_sha256="e",
                   thumbnails_sha256="t", thumbnail_size=128, machine={"cpu": "x"})
    data = _json.loads(made.to_json())
    assert "onnx_file" not in data
    path = tmp_path / "embeddings.json"
    path.write_text(_json.dumps({**data, "onnx_file": "/models/m_int8.onnx"}))
    read = Sidecar.read(path)
    assert read.onnx_file == "/models/m_int8.onnx" and read.machine["cpu"] == "x"

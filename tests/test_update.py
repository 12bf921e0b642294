"""--update: a store brought up to date with its dataset equals a fresh build over the dataset as it
is now (photos, vectors, files, neighbours), whatever changed; interrupted, it leaves the old store
whole and finishes when run again; a changed embedder is refused."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import datarecord
from pipeline import update as update_module
from pipeline.config import RunConfig
from pipeline.dataset import DatasetSpec, Record
from pipeline.report import RunSummary
from pipeline.store import ManifestRow, read_manifest
from tests import assets
from tests.helpers import row_files, run, stop_after_shards, thumbnails

PRODUCTS = 30


def photo(k: int, version: int = 0) -> bytes:
    """Product k's photo (a re-shot one for another version): distinct sizes and pixels."""
    return assets.jpeg_bytes(60 + k % 7 * 4, 80 + k % 5 * 4, seed=1000 * version + k)


def write_catalogue(folder: Path, products: list[int], reshot: frozenset[int] = frozenset()) -> Path:
    cells = [photo(k, 1 if k in reshot else 0) for k in products]
    return assets.write_parquet_dataset(folder, cells, extra={"item_id": [f"P{k:03d}" for k in products]})


def args(data: Path, onnx: Path, out: Path, *more: object) -> list[object]:
    return ["--dataset", data, "--onnx", onnx, "--output-dir", out, "--limit", "0", "--max-result-images", "5",
            "--shard-rows", "8", "--batch-size", "4", *more]


def comparable(out: Path) -> tuple[list[tuple], np.ndarray, dict[str, bytes]]:
    """A store's lines in (source_row, person) order without their positions, the vectors in that
    order, and its image files."""
    rows = sorted(read_manifest(out / "embeddings" / "manifest.csv"), key=lambda r: (r.source_row, r.person))
    emb = np.load(out / "embeddings" / "embeddings.npy")
    lines = [(r.source_row, r.person, r.file, r.source, r.sha256, r.status, r.error, r.note, r.width, r.height,
              r.item_id, r.source_sha256) for r in rows]
    vectors = np.stack([emb[r.embedding_row] for r in rows if r.embedding_row >= 0])
    files = {p.name: p.read_bytes() for p in (out / "images").iterdir() if p.is_file()}
    thumbs = thumbnails(out / "embeddings")
    thumbs_in_order = np.stack([thumbs[r.embedding_row] for r in rows if r.embedding_row >= 0])
    return lines, np.concatenate([vectors.ravel(), thumbs_in_order.ravel().astype(np.float32)]), files


def neighbours(out: Path) -> dict[str, list[str]]:
    with open(out / "retrieval_results" / "neighbours.csv", newline="") as f:
        table: dict[str, list[str]] = {}
        for line in csv.DictReader(f):
            table.setdefault(line["query_file"], []).append(line["neighbour_file"])
    return table


def assert_same_as_fresh(updated: Path, fresh: Path) -> None:
    a_lines, a_vec, a_files = comparable(updated)
    b_lines, b_vec, b_files = comparable(fresh)
    assert a_lines == b_lines
    assert np.array_equal(a_vec, b_vec)  # the static int8 export: vectors do not depend on the batch
    assert a_files == b_files
    assert neighbours(updated) == neighbours(fresh)
    assert not (updated / "embeddings" / ".update").exists() and not (updated / "images" / ".update").exists()


@pytest.mark.parametrize(
    "by_id, after, said",
    [
        # Two photos gone (the rows after them move up), one added in the middle, three at the end.
        (False, [*range(0, 5), 31, *range(6, 12), *range(13, 30), 40, 41, 42], "added 4, changed 0, removed 2"),
        # The same, and product 20 re-shot: by id it is changed, by content one removed and one added.
        (True, [*range(0, 5), 31, *range(6, 12), *range(13, 30), 40, 41, 42], "added 4, changed 1, removed 2"),
        (False, [*range(0, 5), 31, *range(6, 12), *range(13, 30), 40, 41, 42], "added 5, changed 0, removed 3"),
    ],
    ids=["by-content", "by-id-reshot", "by-content-reshot"],
)
def test_an_update_equals_a_fresh_build(by_id, after, said, tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    ids = ["--id-column", "item_id"] if by_id else []
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, *ids)) == 0
    reshot = frozenset({20}) if said != "added 4, changed 0, removed 2" else frozenset()
    write_catalogue(data, after, reshot)
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *ids) == 0
    assert said in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh, *ids)) == 0
    assert_same_as_fresh(out, fresh)


def cli_update(data: Path, onnx: Path, out: Path, *more: object) -> int:
    import main as cli

    return cli.main([*map(str, args(data, onnx, out, "--update", *more))])


def test_a_larger_limit_embeds_only_the_new_rows(tiny_onnx, tmp_path, capsys, monkeypatch):
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out), "--limit", "20") == 0
    before = np.load(out / "embeddings" / "embeddings.npy")
    embedded: list[int] = []
    real = update_module.build

    def counting_build(cfg, summary, embedder=None, part=None):
        embedded.extend(sorted(part.rows))
        return real(cfg, summary, embedder, part=part)

    monkeypatch.setattr(update_module, "build", counting_build)
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert embedded == list(range(20, PRODUCTS))
    after = np.load(out / "embeddings" / "embeddings.npy")
    assert np.array_equal(after[:20], before)  # the kept vectors, byte for byte, in their old order
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_an_interrupted_update_leaves_the_old_store_and_finishes_when_run_again(tiny_onnx, tmp_path, monkeypatch,
                                                                               capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    old = comparable(out)
    write_catalogue(data, [*range(3, PRODUCTS), *range(50, 70)])
    stop_after_shards(monkeypatch, 1)  # the new photos' build stops after its first shard
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / ".update" / "new" / ".partial").is_dir()
    assert "interrupted: the update's complete shards are kept" in capsys.readouterr().err
    # The old store is whole and usable meanwhile.
    lines, vectors, files = comparable(out)
    assert lines == old[0] and np.array_equal(vectors, old[1]) and files == old[2]
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 0
    # Killed again, this time in the middle of the switch: the next run finishes it first.
    real_move, moves = update_module.move, []

    def move_then_die(src, dst):
        real_move(src, dst)
        moves.append(dst)
        if len(moves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "move", move_then_die)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / ".update" / update_module.SWITCH).is_file()
    capsys.readouterr()
    import main as cli

    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = " ".join(capsys.readouterr().out.split())  # what the update it finished did, not only this run's nothing
    assert re.search(r"finished an interrupted update's switch \(update: added \d+, changed \d+, removed \d+",
                     said), said
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_a_switch_killed_right_after_the_manifest_moved_is_finished_by_the_next_update(tiny_onnx, tmp_path,
                                                                                     monkeypatch):
    """The staged manifest is in the store by then, the staged sidecar not yet: the next switch reads
    the new manifest where it is."""
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, [*range(2, 12), 50, 51])
    real_move = update_module.move

    def move_then_die(src, dst):
        real_move(src, dst)
        if dst.name == "manifest.csv":
            raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "move", move_then_die)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    staged = out / "embeddings" / update_module.STAGING / "next"
    assert not (staged / "manifest.csv").exists() and (staged / "embeddings.json").is_file()
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_a_build_resumed_on_a_changed_dataset_is_refused_and_fresh_starts_over(tiny_onnx, tmp_path, monkeypatch,
                                                                              capsys):
    """A build's finished shards hold the photos of the dataset as it was when it started: after the
    dataset's files changed, resuming would keep photos it no longer has, so the resume is refused,
    saying so, and --fresh starts over."""
    data = write_catalogue(tmp_path / "catalogue", list(range(24)))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out)) == 130
    monkeypatch.undo()
    write_catalogue(data, list(range(24)), reshot=frozenset(range(24)))  # every photo re-shot
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out)) == 1
    err = capsys.readouterr().err
    assert "holds shards of an unfinished run on the dataset as it was" in err
    assert "dataset_files: cache has '1 file(s), " in err
    assert "The dataset's files changed since that run started: its shards may hold photos the dataset no longer" in err
    assert "Add --fresh to start over." in err and "Run with the same arguments" not in err
    # A run of a version that did not stamp its dataset resumes as it did then.
    run_file = out / "embeddings" / ".partial" / "run.json"
    run_file.write_text(json.dumps({k: v for k, v in json.loads(run_file.read_text()).items() if k != "dataset_files"}))
    write_catalogue(data, list(range(24)))  # the photos the shard holds, again
    assert run(*args(data, tiny_onnx, out)) == 0
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    # Refused again after another change, --fresh starts over on the dataset as it is.
    write_catalogue(data, list(range(24)), reshot=frozenset(range(24)))
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out)) == 130
    monkeypatch.undo()
    write_catalogue(data, list(range(24)))
    assert run(*args(data, tiny_onnx, out)) == 1
    assert run(*args(data, tiny_onnx, out, "--fresh")) == 0
    assert_same_as_fresh(out, fresh)


def test_an_interrupted_update_on_a_dataset_changed_again_embeds_the_photos_it_now_has(tiny_onnx, tmp_path,
                                                                                      monkeypatch):
    """The update's staging shards were embedded from the dataset as it was: re-shot again before
    the rerun, they are discarded (they are the update's own), never switched in."""
    data = write_catalogue(tmp_path / "catalogue", list(range(24)))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 0
    write_catalogue(data, list(range(24)), reshot=frozenset(range(0, 24, 2)))
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id", "--update")) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / ".update" / "new" / ".partial").is_dir()
    cells = [photo(k, 2 if k % 2 == 0 else 0) for k in range(24)]  # the same products re-shot once more
    assets.write_parquet_dataset(data, cells, extra={"item_id": [f"P{k:03d}" for k in range(24)]})
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id", "--update")) == 0
    # An update interrupted, then a build instead: the build replaces the store, and the update's
    # staging goes with the old store (a later update never finds it).
    write_catalogue(data, list(range(30)))
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id", "--update")) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / ".update" / "new" / ".partial").is_dir()
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 0
    assert not (out / "embeddings" / ".update").exists() and not (out / "images" / ".update").exists()
    assets.write_parquet_dataset(data, cells, extra={"item_id": [f"P{k:03d}" for k in range(24)]})
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id", "--update")) == 0
    assert run(*args(data, tiny_onnx, fresh, "--id-column", "item_id")) == 0
    assert_same_as_fresh(out, fresh)


def test_a_changed_embedder_is_refused(tiny_onnx, tiny_clip, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    before = (out / "embeddings" / "embeddings.json").read_bytes()
    capsys.readouterr()
    assert run("--dataset", data, "--model", tiny_clip, "--backend", "torch", "--output-dir", out, "--update") == 1
    err = capsys.readouterr().err
    assert "was embedded differently from what is asked" in err
    assert "backend: cache has 'onnx', asked for 'torch'" in err
    # with the store's dataset flags, which the update took from it (the build would read the hub's otherwise)
    assert f"building afresh: run without --update, with the dataset flags that built it: --dataset {data} --limit 0." \
        in " ".join(err.split())
    # what made it, named: the flags, or none of them
    assert "It was made with --backend onnx --onnx FILE (the file whose sha256 is" in err  # not in ./onnx here
    assert (out / "embeddings" / "embeddings.json").read_bytes() == before
    assert "or leave out --backend, --model (an update then embeds with the store's own)." in " ".join(err.split())
    # --onnx beside --backend torch: the file would go unused, refused before anything is read
    assert run("--dataset", data, "--model", tiny_clip, "--backend", "torch", "--output-dir", out, "--update",
               "--onnx", tiny_onnx) == 2
    assert "--onnx names a file to run, and --backend torch runs --model itself" in capsys.readouterr().err


def test_an_embedder_that_makes_its_pixels_otherwise_is_refused_before_it_embeds(tiny_clip, tmp_path, capsys):
    """`auto` flags leave the pixels' code (and the precision) open until the model loads: a store
    built with the device decoder (torchvision, as on a GPU) is not updated with PIL's pixels
    mixed in, and nothing of the update is embedded or switched."""
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    out = tmp_path / "out"
    torch_args = ["--dataset", data, "--model", tiny_clip, "--backend", "torch", "--output-dir", out, "--limit",
                  "0", "--max-result-images", "0", "--shard-rows", "8", "--batch-size", "4"]
    assert run(*torch_args, "--decode", "device") == 0
    before = (out / "embeddings" / "embeddings.json").read_bytes()
    write_catalogue(data, list(range(12)))
    capsys.readouterr()
    assert run(*torch_args, "--update") == 1
    err = capsys.readouterr().err
    assert "was embedded differently from what is asked" in err
    assert "pixels: cache has 'torchvision', asked for 'pil'" in err
    assert "Its pixels came from torchvision: add --decode device to update it as it was made." in err
    assert (out / "embeddings" / "embeddings.json").read_bytes() == before
    assert not (out / "embeddings" / ".update" / "new" / ".partial").exists()  # refused before embedding
    assert run(*torch_args, "--decode", "device", "--update") == 0  # the store's own way: updated
    assert len(read_manifest(out / "embeddings" / "manifest.csv")) == 12


def test_a_store_of_torchs_pixels_is_updated_and_resumed_with_them(tiny_onnx, tmp_path, monkeypatch, capsys):
    """A store made with torch's resize (--decode cpu-simd) is updated, and a run begun so is
    resumed, with torch's resize under --decode auto (whose own is Pillow's): the result is the
    cpu-simd build's, never a mix. Asked for Pillow's by name, the update is refused naming the flag."""
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    old, simd_fresh, pil_fresh = tmp_path / "old", tmp_path / "simd_fresh", tmp_path / "pil_fresh"
    assert run(*args(data, tiny_onnx, old, "--decode", "cpu-simd")) == 0
    assert json.loads((old / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil+torch"
    write_catalogue(data, list(range(14)))
    assert run(*args(data, tiny_onnx, simd_fresh, "--decode", "cpu-simd")) == 0
    assert run(*args(data, tiny_onnx, pil_fresh)) == 0
    assert json.loads((pil_fresh / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil"
    assert not np.array_equal(comparable(simd_fresh)[1], comparable(pil_fresh)[1])  # the resizers differ here
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, old, "--decode", "cpu", "--update")) == 1
    err = capsys.readouterr().err
    assert "pixels: cache has 'pil+torch', asked for 'pil'" in err
    assert "Its pixels came from pil+torch: add --decode cpu-simd to update it as it was made." in err
    assert run(*args(data, tiny_onnx, old, "--update")) == 0
    assert json.loads((old / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil+torch"
    assert_same_as_fresh(old, simd_fresh)
    # a run begun with torch's pixels resumes with them
    resumed = tmp_path / "resumed"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, resumed, "--decode", "cpu-simd")) == 130
    monkeypatch.undo()
    assert run(*args(data, tiny_onnx, resumed)) == 0
    assert json.loads((resumed / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil+torch"
    assert_same_as_fresh(resumed, simd_fresh)


def test_an_update_needs_a_store_and_ids_it_was_built_with(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out, "--update")) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "There is no store to update in " in said and ": give --output-dir the folder the gallery was built in, " \
        "or build it first, without --update." in said
    assert run(*args(data, tiny_onnx, out)) == 0
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--update", "--id-column", "item_id")) == 1
    assert "was built without --id-column" in capsys.readouterr().err
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 0
    capsys.readouterr()
    # the column left out: the store's own, as its dataset settings are
    assert cli_update(data, tiny_onnx, out) == 0
    assert "updated with the store's own --id-column item_id (not given)" in " ".join(capsys.readouterr().out.split())
    # a store made before it recorded its column: kept lines would keep ids, new ones get none
    sidecar = out / "embeddings" / "embeddings.json"
    made = json.loads(sidecar.read_text())
    del made["source"]["id_column"]
    sidecar.write_text(json.dumps(made))
    assert run(*args(data, tiny_onnx, out, "--update")) == 1
    assert "was built with --id-column, so its photos have ids: update with the same --id-column" in \
        capsys.readouterr().err


def test_an_update_without_dataset_flags_keeps_the_store_s_dataset_and_rows(tiny_onnx, tmp_path, capsys):
    """No --dataset, --limit, --split: the store's (the default --limit would cut a gallery of every
    row to 10,000 photos, and the default dataset is the hub's)."""
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0  # --limit 0: every row
    write_catalogue(data, list(range(14)))  # two photos added
    capsys.readouterr()
    import main as cli

    assert cli.main(["--onnx", str(tiny_onnx), "--output-dir", str(out), "--update", "--max-result-images", "0"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "added 2, changed 0, removed 0, unchanged 12" in said
    assert f"updated with the store's own --dataset {data.resolve()} --limit 0 (not given)" in said
    assert len(read_manifest(out / "embeddings" / "manifest.csv")) == 14
    # a flag given is taken as given: --limit 5 shrinks it
    assert cli.main(["--onnx", str(tiny_onnx), "--output-dir", str(out), "--update", "--limit", "5",
                     "--max-result-images", "0"]) == 0
    assert "removed 9" in " ".join(capsys.readouterr().out.split())
    assert sorted(r.source_row for r in read_manifest(out / "embeddings" / "manifest.csv")) == [0, 1, 2, 3, 4]


def test_a_resumed_update_s_progress_bar_counts_its_new_photos(tiny_onnx, tmp_path, monkeypatch):
    """An update builds only the new photos: resumed, its bar starts at those already embedded (not at
    the dataset row it goes on from) and ends at their number."""
    from pipeline import gallery

    data = write_catalogue(tmp_path / "catalogue", list(range(8)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, list(range(40)))
    stop_after_shards(monkeypatch, 3)
    assert run(*args(data, tiny_onnx, out, "--update", "--shard-rows", "4")) == 130
    monkeypatch.undo()
    bars, real = [], gallery.tqdm

    def watched(*a, **kw):
        bar = real(*a, **{**kw, "disable": False})
        bars.append(bar)
        return bar

    monkeypatch.setattr(gallery, "tqdm", watched)
    assert run(*args(data, tiny_onnx, out, "--update", "--shard-rows", "4")) == 0
    (bar,) = [b for b in bars if b.desc.startswith("embed")]
    assert (bar.total, bar.n) == (32, 32) and bar.initial == 4  # the three shards done held rows 0-11: 8-11 new


def test_another_id_column_neither_resumes_a_build_nor_updates_its_store(tiny_onnx, tmp_path, monkeypatch, capsys):
    """The id column is what --update knows the photos by: a build resumed with another one would mix
    two kinds of ids in one store (and its next update take half the photos for new ones); an update
    by another column would take every photo for a new one. Both are refused, naming the store's."""
    products = list(range(20))
    data = assets.write_parquet_dataset(tmp_path / "catalogue", [photo(k, 0) for k in products], extra={
        "item_id": [f"P{k:03d}" for k in products], "alt": [f"A{k:03d}" for k in products]})
    out = tmp_path / "out"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--id-column", "alt")) == 1
    assert "id_column" in capsys.readouterr().err
    # An unfinished run of the last version, which did not record the id column, resumes too
    run_file = out / "embeddings" / ".partial" / "run.json"
    params = json.loads(run_file.read_text())
    assert params["source"].pop("id_column") == "item_id"
    run_file.write_text(json.dumps(params))
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 0  # resumed as it was begun
    # A run begun without an id column is not resumed with one (nor the reverse)
    fresh = tmp_path / "fresh"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, fresh)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, fresh, "--id-column", "item_id")) == 1
    assert "id_column" in capsys.readouterr().err
    assert {r.item_id for r in read_manifest(out / "embeddings" / "manifest.csv")} == {f"P{k:03d}" for k in products}
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--id-column", "alt", "--update")) == 1
    assert "was built with --id-column item_id" in capsys.readouterr().err
    sidecar = (out / "embeddings" / "embeddings.json").read_bytes()
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id", "--update")) == 0
    assert (out / "embeddings" / "embeddings.json").read_bytes() == sidecar  # by its own column: nothing to do


def test_a_segmented_update_after_the_segmenters_weights_changed_in_place_is_refused(monkeypatch, tiny_onnx,
                                                                                       tmp_path, capsys):
    """Retrained weights saved over the same --seg-model file would cut the new photos' crops with
    another model than the kept ones': the update is refused, naming the file (no flag gives the old
    weights back), and so is a search that names the file; with the first weights back it updates."""
    from pipeline import galleries
    from tests.test_segment import FakeSegmenter

    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: FakeSegmenter())
    weights = tmp_path / "person-seg.pt"
    weights.write_bytes(b"the weights the store was cut with")
    cells = [assets.encode(assets.rgb_image(60, 90, color=(i, 100, 200)), "PNG") for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "people", cells[:4])
    out = tmp_path / "out"
    seg = ["--use-segmentation", "--seg-model", weights, "--max-result-images", "0"]
    assert run(*args(data, tiny_onnx, out), *seg) == 0
    assets.write_parquet_dataset(data, cells)
    weights.write_bytes(b"weights retrained and saved over the same file")
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *seg) == 1
    err = capsys.readouterr().err
    assert "seg_weights: cache has" in err
    assert f"The segmenter's weights file {weights} changed since the store was built" in err
    query = tmp_path / "look.png"
    query.write_bytes(cells[1])
    assert run("--query-image", query, "--use-embedded-segment", "--seg-model", weights, "--onnx", tiny_onnx,
               "--output-dir", out) == 1
    assert "seg_weights: cache has" in capsys.readouterr().err
    weights.write_bytes(b"the weights the store was cut with")
    # the segmentation flag left out: not "no store to update" (whose advice built a gallery of whole photos)
    assert cli_update(data, tiny_onnx, out) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{out} holds a segmented gallery (person crops) in {out / 'embeddings_segment'}: to update that one, run "
            "the same command with --use-segmentation.") in err and "There is no store to update" not in err
    # a setting typed otherwise than the store's: the flag to drop is named (the update takes the store's own)
    assert cli_update(data, tiny_onnx, out, *seg, "--seg-conf", "0.5") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "seg_conf: cache has 0.25, asked for 0.5" in err
    assert "made as they were: drop --seg-conf (an update takes the store's own where not given)" in err
    assert cli_update(data, tiny_onnx, out, *seg) == 0
    assert "added 2, changed 0, removed 0, unchanged 4" in capsys.readouterr().out


def test_a_segmented_update_equals_a_fresh_build(monkeypatch, tiny_onnx, tmp_path, capsys):
    """Person crops: a kept photo keeps all its crops (files renamed with its row), a removed one
    loses them all; a photo that does not decode keeps its failed line."""
    from pipeline import galleries
    from tests.test_segment import FakeSegmenter

    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: FakeSegmenter())

    def people(rows: list[int]) -> list[bytes]:
        cells = [assets.encode(assets.rgb_image(60, 90, color=(i, 100, 200)), "PNG") for i in rows]
        return [assets.corrupt_bytes() if i == 4 else c for i, c in zip(rows, cells)]

    data = assets.write_parquet_dataset(tmp_path / "people", people(list(range(12))))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    seg = ["--use-segmentation", "--max-result-images", "0"]
    assert run(*args(data, tiny_onnx, out), *seg) == 3  # 3: the photo that does not decode
    assert (out / "embeddings_segment" / "embeddings.json").is_file()
    assets.write_parquet_dataset(data, people([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20, 22, 23]))
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *seg) == 3
    said = capsys.readouterr().out
    assert "added 3, changed 0, removed 1, unchanged 11" in said
    # the store's items counted as such: "embedded" would say the update embedded all of them
    counts = next(line for line in said.splitlines() if "unchanged 11" in line)
    stored = np.load(out / "embeddings_segment" / "embeddings.npy", mmap_mode="r").shape[0]
    assert f", items {stored}," in counts + "," and "embedded" not in counts, counts
    assert run(*args(data, tiny_onnx, fresh), *seg) in (0, 3)

    def crops(folder: Path) -> tuple[list[tuple], np.ndarray, dict[str, bytes]]:
        rows = sorted(read_manifest(folder / "embeddings_segment" / "manifest.csv"),
                      key=lambda r: (r.source_row, r.person))
        emb = np.load(folder / "embeddings_segment" / "embeddings.npy")
        lines = [(r.source_row, r.person, r.file, r.sha256, r.status, r.box_x1, r.mask_area) for r in rows]
        files = {p.name: p.read_bytes() for p in (folder / "images_segment").iterdir() if p.is_file()}
        return lines, np.stack([emb[r.embedding_row] for r in rows if r.embedding_row >= 0]), files

    a, b = crops(out), crops(fresh)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert any(line[4] == "failed" for line in a[0])  # the photo that does not decode: kept as a failure


def test_result_pictures_are_redrawn_only_where_something_changed(tiny_onnx, tmp_path, capsys):
    """After adding photos at the end, only the pictures whose neighbours changed are drawn again;
    every picture equals the fresh build's, and a picture of a removed photo is gone."""
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    every = ["--max-result-images", "100"]
    assert run(*args(data, tiny_onnx, out), *every) == 0
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *every) == 0  # nothing changed: nothing drawn
    assert f"result pictures: 0 drawn, {PRODUCTS} unchanged since the last run kept" in capsys.readouterr().out
    write_catalogue(data, [*range(PRODUCTS - 1), 40, 41])  # the last photo gone, two added
    assert cli_update(data, tiny_onnx, out, *every) == 0
    said = capsys.readouterr().out
    drawn = int(said.split("result pictures: ")[1].split(" drawn")[0])
    assert 2 <= drawn < PRODUCTS + 1  # the new photos' pictures, and those of their new neighbours
    assert run(*args(data, tiny_onnx, fresh), *every) == 0
    pictures = {p.name: p.read_bytes() for p in (out / "retrieval_results").glob("*_matches.jpg")}
    assert pictures == {p.name: p.read_bytes() for p in (fresh / "retrieval_results").glob("*_matches.jpg")}
    assert len(pictures) == PRODUCTS + 1


def name_by_row(out: Path) -> None:
    """Make the store at `out` what builds made before files were named by content: img_00007.jpg for
    row 7 (manifest and sidecar rewritten to match)."""
    from dataclasses import replace

    from pipeline.store import load_cache, write_store

    cache = load_cache(out / "embeddings", out / "images", identity=None)
    rows = []
    for r in cache.rows:
        if r.file:
            by_row = f"img_{r.source_row:05d}.{r.file.rsplit('.', 1)[1]}"
            (out / "images" / r.file).rename(out / "images" / by_row)
            r = replace(r, file=by_row)
        rows.append(r)
    thumbs = np.load(out / "embeddings" / "thumbnails.npy")
    write_store(out / "embeddings", cache.embeddings, rows, [thumbs], cache.sidecar.identity, cache.sidecar.source,
                cache.sidecar.thumbnail_size)


@pytest.mark.parametrize("change", [False, True], ids=["nothing-else", "one-removed"])
def test_a_store_named_by_row_gets_content_names_from_its_first_update(change, tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    name_by_row(out)
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == ["img_00000.jpg", "img_00001.jpg"]
    if change:
        write_catalogue(data, [*range(5), *range(6, 12)])
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    assert ("removed 1" if change else "removed 0, unchanged 12") in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_removing_a_photo_renames_no_file_and_redraws_only_the_pictures_that_showed_it(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out = tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out, "--max-result-images", "12")) == 0
    before = {p.name: p.stat().st_ino for p in (out / "images").iterdir()}
    shown = neighbours(out)
    gone = row_files(out)[3]
    write_catalogue(data, [*range(3), *range(4, 12)])
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, "--max-result-images", "12") == 0
    said = capsys.readouterr().out
    after = {p.name: p.stat().st_ino for p in (out / "images").iterdir()}
    assert after == {k: v for k, v in before.items() if k != gone}  # the same files, not copies
    redrawn = [q for q, nb in shown.items() if q != gone and gone in nb]
    assert 0 < len(redrawn) < 11
    assert f"result pictures: {len(redrawn)} drawn, {11 - len(redrawn)} unchanged since the last run kept" in said


def test_an_abandoned_update_leaves_nothing_that_a_later_one_takes(tiny_onnx, tmp_path, monkeypatch):
    """Killed while building a photo that then goes back to what it was: the staged file of the
    abandoned photo must not replace the kept photo's file."""
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, [*range(7), 99, *range(8, 12)])  # row 7 replaced by another photo
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    staged = sorted(p.name for p in (out / "images" / update_module.STAGING).iterdir())
    assert len(staged) == 1 and staged[0] not in {r.file for r in read_manifest(out / "embeddings" / "manifest.csv")}
    write_catalogue(data, list(range(11)))  # photo 7 put back, the last one removed: nothing to embed
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def switch_stopped_at_its_start(tmp_path: Path, onnx: Path, products: int, monkeypatch) -> tuple[Path, Path]:
    """A store of `products` photos, then an --update (the first photo gone, one added) stopped by
    Ctrl-C at its switch's first move: the store between its files. Returns (dataset, output folder)."""
    data = write_catalogue(tmp_path / "catalogue", list(range(products)))
    out = tmp_path / "updated"
    assert run(*args(data, onnx, out)) == 0
    write_catalogue(data, [*range(1, products), 50])

    def die(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "move", die)
    assert run(*args(data, onnx, out, "--update")) == 130
    monkeypatch.undo()
    return data, out


def test_a_switch_killed_midway_is_named_by_a_cache_run_and_dropped_by_a_build(tiny_onnx, tmp_path, monkeypatch,
                                                                               capsys):
    data, out = switch_stopped_at_its_start(tmp_path, tiny_onnx, 12, monkeypatch)
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out) == 1
    said = capsys.readouterr().err
    assert "interrupted in the middle of its switch: run the update's command (with --update)" in said
    # a search mode and an export say so too, not "build it first" (which would embed everything again)
    (tmp_path / "look.jpg").write_bytes(photo(3))
    for other in (["--query-image", tmp_path / "look.jpg"], ["--export", f"parquet:{tmp_path / 'x.parquet'}"]):
        assert run("--onnx", tiny_onnx, "--output-dir", out, *other) == 1
        said = capsys.readouterr().err
        assert "interrupted in the middle of its switch: run the update's command (with --update)" in said
        assert "Build it first" not in said
    # the API too (it said "build one first", which embeds everything again), the store or its run folder named
    from pipeline.catalog import Catalog
    from pipeline.errors import PipelineError

    for named in (out, out / "embeddings"):
        with pytest.raises(PipelineError, match=r"interrupted in the middle of its switch: run the update's command "
                                                r"\(with --update\) to finish it, then open it again"):
            Catalog.open(named)
    # while a run holds the folder (the update switching, still at work), a reader is told to wait, not that it stopped
    from tests.helpers import another_run_holding

    with another_run_holding(out) as pid:
        assert run("--onnx", tiny_onnx, "--output-dir", out, "--export", f"parquet:{tmp_path / 'y.parquet'}") == 1
        said = " ".join(capsys.readouterr().err.split())
        assert f"another run (pid {pid}) is writing to {out}" in said and "interrupted" not in said, said
        with pytest.raises(PipelineError, match=f"holds no complete gallery store now.*pid {pid}"):
            Catalog.open(out)
    write_catalogue(data, list(range(5)))  # the user builds afresh instead: the pending switch must not come back
    assert run(*args(data, tiny_onnx, out)) == 0
    assert not (out / "embeddings" / update_module.STAGING).exists()
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_counts_with_ids_rows_without_pictures_and_repeated_ids(tiny_onnx, tmp_path, capsys):
    cells: list[bytes | None] = [photo(k) for k in range(6)]
    cells[2] = None  # a row without a picture at build time
    ids = ["P0", "P1", "P2", "P3", "P3", "P5"]  # P3 twice: two photos of one product
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells, extra={"item_id": ids})
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 3  # 3: the row without a picture
    cells = [photo(k) for k in range(6)]
    cells = [cells[0], cells[1], cells[2], cells[4], cells[5]]  # P2 now has a picture; P3's first photo gone
    assets.write_parquet_dataset(data, cells, extra={"item_id": ["P0", "P1", "P2", "P3", "P5"]})
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, "--id-column", "item_id") == 0
    # P2 got a picture: changed; P3's first photo gone; its second kept (matched by bytes among the P3s)
    assert "added 0, changed 1, removed 1, unchanged 4" in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh, "--id-column", "item_id")) == 0
    assert_same_as_fresh(out, fresh)


@pytest.mark.parametrize("ids", [["P0", "P1", None, "P3", "P4", None], [None] * 6], ids=["some-empty", "all-empty"])
def test_photos_with_an_empty_id_are_known_by_their_bytes(ids, tiny_onnx, tmp_path, capsys):
    """--id-column with some (or every) value missing: those photos are matched by their bytes, so an
    update that changes nothing rewrites nothing, and one that changes them counts them as a build would."""
    cells: list[bytes | None] = [photo(k) for k in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells, extra={"item_id": ids})
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, "--id-column", "item_id") == 0
    assert "added 0, changed 0, removed 0, unchanged 6" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == before
    # the second id-less photo re-shot, a new one without an id: one removed, two added
    cells = [*cells[:5], photo(40), photo(41)]
    assets.write_parquet_dataset(data, cells, extra={"item_id": [*ids[:5], None, None]})
    assert cli_update(data, tiny_onnx, out, "--id-column", "item_id") == 0
    assert "added 2, changed 0, removed 1, unchanged 5" in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh, "--id-column", "item_id")) == 0
    assert_same_as_fresh(out, fresh)


def test_ids_whose_column_turned_decimal_are_the_same_ids(tiny_onnx, tmp_path, capsys):
    """A whole-number id column that became decimal (pandas does so when a new row lacks an id):
    5.0 is the photo 5 was, not a new one, a row without a picture too; the kept lines take the ids
    as written now, as a build."""
    cells: list[bytes | None] = [photo(k) for k in range(6)]
    cells[2] = None  # a row without a picture: kept as it is, for the same reason, under its id
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells, extra={"item_id": list(range(6))})
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 3
    assets.write_parquet_dataset(data, [*cells, photo(9)],
                                 extra={"item_id": [*map(float, range(6)), None]})
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, "--id-column", "item_id") == 3
    assert "added 1, changed 0, removed 0, unchanged 6" in capsys.readouterr().out
    lines = read_manifest(out / "embeddings" / "manifest.csv")
    assert [r.item_id for r in lines][:3] == ["0.0", "1.0", "2.0"]
    assert run(*args(data, tiny_onnx, fresh, "--id-column", "item_id")) == 3
    assert_same_as_fresh(out, fresh)


@pytest.mark.parametrize("by_id", [False, True])
def test_an_update_that_changes_nothing_rewrites_nothing(by_id, tiny_onnx, tmp_path):
    """Rows without a picture too: one still without one, for the same reason, is unchanged."""
    cells: list[bytes | None] = [photo(k) for k in range(8)]
    cells[3] = None
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells, extra={"item_id": [f"P{k}" for k in range(8)]})
    out = tmp_path / "out"
    ids = ["--id-column", "item_id"] if by_id else []
    assert run(*args(data, tiny_onnx, out, *ids)) == 3
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert run(*args(data, tiny_onnx, out, *ids, "--update")) == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == before


def test_an_update_with_index_none_keeps_the_index_current(tiny_onnx, tmp_path):
    """--index none: the update does not search the index, but brings it along with the store, so
    the search modes find it current."""
    data = write_catalogue(tmp_path / "catalogue", list(range(10)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out, "--index", "flat")) == 0
    write_catalogue(data, list(range(12)))
    assert run(*args(data, tiny_onnx, out, "--index", "none", "--update")) == 0
    meta = json.loads((out / "embeddings" / "index.json").read_text())
    assert meta["count"] == 12 and meta["kind"] == "flat"
    assert meta["store_sha256"] == json.loads((out / "embeddings" / "embeddings.json").read_text())["embeddings_sha256"]
    (tmp_path / "look.jpg").write_bytes(photo(11))
    assert run("--onnx", tiny_onnx, "--output-dir", out, "--query-image", tmp_path / "look.jpg") == 0


def test_kept_lines_name_their_row_as_this_runs_dataset_is_spelled(tiny_onnx, tmp_path, monkeypatch):
    """A store built with `--dataset cat` (relative) and updated with its absolute path: each kept
    line's source names its new row, as a fresh build with that spelling does."""
    monkeypatch.chdir(tmp_path)
    write_catalogue(tmp_path / "cat", list(range(6)))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(*args(Path("cat"), tiny_onnx, out)) == 0
    write_catalogue(tmp_path / "cat", list(range(1, 6)))
    assert run(*args(tmp_path / "cat", tiny_onnx, out, "--update")) == 0
    assert run(*args(tmp_path / "cat", tiny_onnx, fresh)) == 0
    sources = sorted((r.source_row, r.source) for r in read_manifest(out / "embeddings" / "manifest.csv"))
    assert sources == [(k, f"{tmp_path / 'cat'}[{k}]") for k in range(5)]
    assert_same_as_fresh(out, fresh)


def test_the_index_is_updated_with_its_store_not_rebuilt(tiny_onnx, tmp_path, caplog):
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out, "--index", "flat")) == 0
    write_catalogue(data, [*range(2, PRODUCTS), 60, 61, 62])
    with caplog.at_level("INFO"):
        assert run(*args(data, tiny_onnx, out, "--index", "flat", "--update")) == 0
    assert "rebuilding" not in caplog.text  # the run found the index current: update_index renumbered it
    meta = json.loads((out / "embeddings" / "index.json").read_text())
    assert len(meta["history"]) == 1 and meta["count"] == PRODUCTS + 1
    assert meta["store_sha256"] == json.loads((out / "embeddings" / "embeddings.json").read_text())["embeddings_sha256"]
    assert run(*args(data, tiny_onnx, fresh, "--index", "flat")) == 0
    assert_same_as_fresh(out, fresh)


def segment_files(out: Path) -> list[str]:
    """The thumbnails segments the store's sidecar lists, in order."""
    sidecar = json.loads((out / "embeddings" / "embeddings.json").read_text())
    return [part["file"] for part in sidecar.get("thumbnail_segments", [])]


def thumbnail_of(out: Path, product: int) -> bytes:
    """The stored thumbnail of a product's photo (found by its bytes' sha256)."""
    import hashlib

    sha = hashlib.sha256(photo(product)).hexdigest()
    line = next(r for r in read_manifest(out / "embeddings" / "manifest.csv") if r.source_sha256 == sha)
    return thumbnails(out / "embeddings")[line.embedding_row].tobytes()


def assert_nowhere_in_the_store(out: Path, thumb: bytes) -> None:
    for p in (out / "embeddings").rglob("*"):
        assert not p.is_file() or thumb not in p.read_bytes(), f"a removed photo's thumbnail is still in {p}"


def test_a_search_mode_never_pairs_the_store_it_loaded_with_the_index_of_one_switched_in_after(
        tiny_onnx, tmp_path, monkeypatch):
    """--serve and --query-* take no output lock: an update's switch may land between the store's load
    and the index's. The index is checked against the store loaded (its sidecar as read then), so the
    new store's index is refused, never searched over the old store's vectors."""
    import shutil

    import main as cli
    from pipeline import galleries
    from pipeline.config import config_from_flags
    from pipeline.errors import PipelineError

    data = write_catalogue(tmp_path / "catalogue", list(range(10)))
    out, updated = tmp_path / "out", tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out, "--index", "flat")) == 0
    shutil.copytree(out, updated)
    shutil.copytree(out / "embeddings", tmp_path / "before")
    write_catalogue(data, [*range(1, 10), 50])  # photo 0 gone, photo 50 added: still 10 vectors
    assert run(*args(data, tiny_onnx, updated, "--index", "flat", "--update")) == 0
    real_load = galleries.load_gallery_cache

    def load_then_switch(cfg, identity=None):
        cache = real_load(cfg, identity)
        for f in (updated / "embeddings").iterdir():  # the update's switch lands now
            if f.is_file():
                shutil.copy2(f, out / "embeddings" / f.name)
        return cache

    monkeypatch.setattr(galleries, "load_gallery_cache", load_then_switch)
    cfg = config_from_flags(vars(cli.build_parser().parse_args(
        ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve"])))
    with pytest.raises(PipelineError, match="was built for other embeddings"):
        galleries.open_catalog(cfg, RunSummary(mode="serve"))
    # Without an index (--index none), the new store's metadata.parquet is not joined to the old rows either.
    shutil.rmtree(out / "embeddings")
    shutil.copytree(tmp_path / "before", out / "embeddings")
    cfg = config_from_flags(vars(cli.build_parser().parse_args(
        ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve", "--index", "none"])))
    with pytest.raises(PipelineError, match="is of the store as updated since this one was loaded: search again"):
        galleries.open_catalog(cfg, RunSummary(mode="serve"))
    # Nor its thumbnails (a store without metadata): the thumbnails files are checked against the
    # sidecar loaded, which the switch changed.
    for folder in (tmp_path / "before", updated / "embeddings"):
        (folder / "metadata.parquet").unlink()
    shutil.rmtree(out / "embeddings")
    shutil.copytree(tmp_path / "before", out / "embeddings")
    with pytest.raises(PipelineError, match="was updated while it was opened: open it again"):
        galleries.open_catalog(cfg, RunSummary(mode="serve"))
    # Opened again (with the new store's photos, which the switch moves in too), it is the new store,
    # its thumbnails its own.
    monkeypatch.setattr(galleries, "load_gallery_cache", real_load)
    shutil.copytree(updated / "images", out / "images", dirs_exist_ok=True)
    catalog = galleries.open_catalog(cfg, RunSummary(mode="serve"))
    assert len(catalog) == 10 and {r.file for r in catalog.items} == {
        r.file for r in read_manifest(updated / "embeddings" / "manifest.csv") if r.embedding_row >= 0}
    np.testing.assert_array_equal(np.stack([catalog.thumbnail(i) for i in range(10)]),
                                  thumbnails(updated / "embeddings"))


def test_added_photos_thumbnails_go_in_a_segment_and_a_removed_photo_leaves_no_thumbnail(tiny_onnx, tmp_path,
                                                                                       monkeypatch):
    data = write_catalogue(tmp_path / "catalogue", list(range(20)))
    out = tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out)) == 0
    base = out / "embeddings" / "thumbnails.npy"
    inode, base_bytes = base.stat().st_ino, base.read_bytes()

    def same_as_fresh(products: list[int], name: str) -> None:
        fresh = tmp_path / name
        write_catalogue(data, products)
        assert run(*args(data, tiny_onnx, out, "--update")) == 0
        assert run(*args(data, tiny_onnx, fresh)) == 0
        assert_same_as_fresh(out, fresh)

    # Five added at the end: thumbnails.npy kept as it is, the five in one new segment. Killed in the switch
    # right after the segment moved into place, the old store is refused and the next run finishes the switch.
    write_catalogue(data, list(range(25)))
    real_move = update_module.move

    def move_then_die(src, dst):
        real_move(src, dst)
        if dst.name.startswith("thumbnails-"):
            raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "move", move_then_die)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out) == 1  # refused, never a mix
    same_as_fresh(list(range(25)), "fresh1")
    assert base.stat().st_ino == inode and base.read_bytes() == base_bytes
    first = segment_files(out)
    assert len(first) == 1 and np.load(out / "embeddings" / first[0]).shape[0] == 5
    # Three more: a second segment, the first kept.
    same_as_fresh(list(range(28)), "fresh2")
    assert segment_files(out)[0] == first[0] and len(segment_files(out)) == 2
    assert base.stat().st_ino == inode
    # A photo of the first segment removed: thumbnails.npy kept, the segments from there written again without it.
    gone = thumbnail_of(out, 22)
    same_as_fresh([*range(22), *range(23, 28)], "fresh3")
    assert base.stat().st_ino == inode and len(segment_files(out)) == 1
    assert_nowhere_in_the_store(out, gone)
    # A photo of thumbnails.npy removed: one new thumbnails.npy, no segment left in the folder.
    gone = thumbnail_of(out, 0)
    same_as_fresh([*range(1, 22), *range(23, 28)], "fresh4")
    assert segment_files(out) == [] and not list((out / "embeddings").glob("thumbnails-*.npy"))
    assert_nowhere_in_the_store(out, gone)


def test_thumbnail_segments_are_joined_before_they_pile_up():
    from pipeline.store import MAX_THUMBNAIL_SEGMENTS, THUMBNAILS_FILE, ThumbnailPart

    base = ThumbnailPart(THUMBNAILS_FILE, 100, "b")
    segs = [ThumbnailPart(f"thumbnails-{i:016x}.npy", 2, str(i)) for i in range(MAX_THUMBNAIL_SEGMENTS)]
    kept = update_module.kept_thumbnails
    # all kept in place, under the limit: every file kept (the new photos make one more segment)
    assert kept([base, *segs[:3]], list(range(106)), 110) == [base, *segs[:3]]
    # a removed row in the second segment: thumbnails.npy and the first segment kept
    assert kept([base, *segs[:3]], [*range(102), *range(103, 106)], 105) == [base, segs[0]]
    # a removed row in thumbnails.npy: nothing kept
    assert kept([base, *segs[:3]], [*range(1, 106)], 105) == []
    # the limit reached: only thumbnails.npy kept, the segments joined into the new one
    n = 100 + 2 * MAX_THUMBNAIL_SEGMENTS
    assert kept([base, *segs], list(range(n)), n + 1) == [base]
    # the segments would hold more than thumbnails.npy: everything written as one thumbnails.npy
    assert kept([base, *segs[:3]], list(range(106)), 201) == []


def test_an_update_of_a_store_whose_sidecar_is_damaged_is_refused_not_run_on_the_default_dataset(tiny_onnx,
                                                                                                  tmp_path, capsys):
    """With no dataset flags an update takes them from the sidecar; one that cannot be read was passed
    over, and the update read the default dataset (the hub's DeepFashion)."""
    data = write_catalogue(tmp_path / "catalogue", list(range(6)))
    out = tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out)) == 0
    sidecar = out / "embeddings" / "embeddings.json"
    written = sidecar.read_text()
    sidecar.write_bytes(sidecar.read_bytes()[:40])
    capsys.readouterr()
    assert run("--update", "--onnx", tiny_onnx, "--output-dir", out) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "A damaged store cannot be updated, and what it was built from cannot be read from it: build it afresh " \
           "without --update, giving the dataset flags that built it" in err
    assert "deepfashion" not in err
    # an older version's store is no damaged one: its own way out (an upgrade in place) is said
    whole = json.loads(written)
    sidecar.write_text(json.dumps({**whole, "format": 1}))
    assert run("--update", "--onnx", tiny_onnx, "--output-dir", out) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "store format 1, made by an older version" in err and "Upgrade it in place" in err and "damaged" not in err


def test_a_changed_or_missing_segment_is_refused(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(10)))
    out = tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, list(range(12)))
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    [name] = segment_files(out)
    segment = out / "embeddings" / name
    good = segment.read_bytes()
    flipped = bytearray(good)
    flipped[-1] ^= 1
    segment.write_bytes(bytes(flipped))  # the same size: found by its hash
    capsys.readouterr()
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out) == 1
    assert f"{name} does not match the sidecar" in capsys.readouterr().err
    assert run(*args(data, tiny_onnx, out, "--update")) == 1  # not "use the flags that built it": no flag helps
    err = capsys.readouterr().err
    assert f"{name} does not match the sidecar" in err
    assert ("A damaged store cannot be updated: build it afresh, running the same command without --update and with "
            f"the dataset flags that built it: --dataset {data.resolve()} --limit 0") in " ".join(err.split())
    segment.unlink()
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out) == 1
    assert f"incomplete: {name} is missing" in capsys.readouterr().err
    segment.write_bytes(good)
    assert run("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 0
    # A build over it (not an update) leaves no segment behind, and its sidecar names none.
    assert run(*args(data, tiny_onnx, out)) == 0
    assert not list((out / "embeddings").glob("thumbnails-*.npy"))
    assert "thumbnail_segments" not in json.loads((out / "embeddings" / "embeddings.json").read_text())


def test_an_abandoned_update_s_thumbnails_never_replace_the_kept_ones(tiny_onnx, tmp_path, monkeypatch):
    """An update that rewrote thumbnails.npy, killed before its switch was decided, then another
    that only adds photos (and so keeps thumbnails.npy): the first one's file must not come back."""
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    base = out / "embeddings" / "thumbnails.npy"
    kept = base.read_bytes()
    write_catalogue(data, list(range(1, 12)))  # photo 0 removed: a new thumbnails.npy is staged
    real = update_module._write_next

    def write_then_die(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "_write_next", write_then_die)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    assert (out / "embeddings" / update_module.STAGING / "next" / "thumbnails.npy").is_file()
    write_catalogue(data, list(range(14)))  # photo 0 back, two added: thumbnails.npy kept
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert base.read_bytes() == kept and len(segment_files(out)) == 1
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def write_shards(folder: Path, shards: list[list[int]], rewrite: frozenset[int] = frozenset()) -> list[Path]:
    """A catalogue in several parquet files (train-0000i.parquet), product k's photo in row order;
    a file already there is left as it is unless its shard is in `rewrite`."""
    import datasets

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = [data / f"train-{i:05d}.parquet" for i in range(len(shards))]
    for old in data.glob("*.parquet"):
        if old not in paths:
            old.unlink()
    for i, products in enumerate(shards):
        if paths[i].is_file() and i not in rewrite:
            continue
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": photo(k), "path": None} for k in products],
             "item_id": [f"P{k:03d}" for k in products]},
            features=datasets.Features({"image": datasets.Image(), "item_id": datasets.Value("string")}),
        )
        ds.to_parquet(str(paths[i]))
    return paths


def test_an_update_reads_only_the_parquet_files_that_changed(tiny_onnx, tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "catalogue", tmp_path / "updated"
    shards = [list(range(10)), list(range(10, 20))]
    write_shards(data, shards)
    assert run(*args(data, tiny_onnx, out)) == 0
    read: list[str] = []
    real = datarecord.iter_parquet_file

    def counted(spec, path):
        read.append(path.name)
        return real(spec, path)

    monkeypatch.setattr(datarecord, "iter_parquet_file", counted)
    real_groups = datarecord._hash_groups

    def counted_groups(spec, path, groups, firsts):  # the row groups of a file read and hashed
        if groups:
            read.append(path.name)
        return real_groups(spec, path, groups, firsts)

    monkeypatch.setattr(datarecord, "_hash_groups", counted_groups)
    digested: list[str] = []
    digests = datarecord.row_group_digests

    def spied(path, columns):
        digested.append(path.name)
        return digests(path, columns)

    monkeypatch.setattr(datarecord, "row_group_digests", spied)
    reads: dict[str, tuple[list[str], list[str]]] = {}  # per update: files decoded, files whose groups were hashed

    def update(name: str, *more: object) -> str:
        read.clear()
        digested.clear()
        capsys.readouterr()
        assert cli_update(data, tiny_onnx, out, *more) == 0
        said = capsys.readouterr().out
        reads[name] = (list(read), list(digested))
        fresh = tmp_path / name
        assert run(*args(data, tiny_onnx, fresh, *more)) == 0
        assert_same_as_fresh(out, fresh)
        return said

    files = write_shards(data, [*shards, list(range(20, 25))])
    assert "added 5, changed 0, removed 0" in update("fresh1")
    assert read == [files[2].name]  # the build recorded the files it read: the new one alone is read
    files = write_shards(data, [*shards, list(range(20, 25)), [25, 26, 27]])
    assert "added 3, changed 0, removed 0" in update("fresh2")
    assert read == [files[3].name]  # the new file alone
    files = write_shards(data, [shards[0], [*range(10, 15), *range(16, 20)], list(range(20, 25)), [25, 26, 27]],
                         rewrite=frozenset({1}))
    assert "added 0, changed 0, removed 1" in update("fresh3")
    assert read == [files[1].name]  # the rows after it moved up, their files unchanged: not read
    said = update("fresh3b")
    assert "added 0, changed 0, removed 0" in said
    assert read == []  # nothing changed: nothing read
    assert "plots: kept, drawn from the same vectors and neighbours" in said  # nor drawn again
    import os

    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched, same bytes: its stored bytes are
    assert "added 0, changed 0, removed 0" in update("fresh4")  # hashed, found recorded, and nothing decoded
    assert reads["fresh4"] == ([], [files[1].name])
    assert "added 0, changed 0, removed 0" in update("fresh4b")
    assert reads["fresh4b"] == ([], [])  # its new stamp was recorded
    cache = datarecord.hashes_file(DatasetSpec(str(data)))
    assert cache.is_relative_to(tmp_path / ".user-cache")  # the user's cache (here the test's), not the store
    cache.unlink()  # with a --limit ending inside the second file:
    assert "removed 12" in update("fresh5", "--limit", "15")  # it is read up to the limit and not recorded
    assert read == [files[0].name, files[1].name]
    assert [Path(name).name for name in json.loads(cache.read_text())] == [files[0].name]


def test_the_model_loads_beside_the_compare_when_files_changed_and_grew(tiny_onnx, tmp_path, monkeypatch, capsys):
    """The model loads in its own thread while changed files are compared, where the dataset has
    more rows than the store has photos; not beside a compare that reads nothing, nor for a removal;
    a load that fails matters only when photos are to be embedded."""
    from pipeline.errors import PipelineError

    data, out = tmp_path / "catalogue", tmp_path / "updated"
    shards = [list(range(10)), list(range(10, 20))]
    write_shards(data, shards)
    assert run(*args(data, tiny_onnx, out)) == 0
    spec = DatasetSpec(str(data))
    assert datarecord.known_as_is(spec)  # the build recorded both files
    loads: list[str] = []
    real = update_module.make_embedder

    def loading(embedder_spec):
        import threading

        me = threading.current_thread()
        loads.append(me.name + (" (daemon)" if me.daemon else ""))
        return real(embedder_spec)

    monkeypatch.setattr(update_module, "make_embedder", loading)

    def update() -> tuple[int, str]:
        capsys.readouterr()
        rc = cli_update(data, tiny_onnx, out)
        captured = capsys.readouterr()
        return rc, captured.out + captured.err

    write_shards(data, [*shards, list(range(20, 25))])
    assert not datarecord.known_as_is(spec)  # a file it has no record of
    rc, said = update()
    assert rc == 0 and "added 5, changed 0, removed 0" in said
    assert loads == ["load-model (daemon)"]  # its own thread, which a run that stops early does not wait for
    assert re.search(r"load model \(beside the compare\) \d", said)
    assert datarecord.known_as_is(spec)
    loads.clear()
    rc, said = update()  # nothing changed: nothing loaded beside a compare that reads nothing
    assert rc == 0 and "added 0, changed 0, removed 0" in said and loads == []

    write_shards(data, [shards[0], shards[1][1:], list(range(20, 25))], rewrite=frozenset({1}))
    rc, said = update()  # a removal: fewer rows than photos, nothing to embed, no model
    assert rc == 0 and "added 0, changed 0, removed 1" in said and loads == []

    def broken(embedder_spec):
        raise PipelineError("the model file is broken")

    monkeypatch.setattr(update_module, "make_embedder", broken)
    summary = RunSummary(mode="standard")
    assert update_module._ModelLoad(RunConfig()).result(summary, needed=False) is None  # not needed: let go
    with pytest.raises(PipelineError, match="the model file is broken"):
        update_module._ModelLoad(RunConfig()).result(summary, needed=True)
    assert "load model" not in summary.stages
    write_shards(data, [shards[0], shards[1][1:], list(range(20, 26))], rewrite=frozenset({2}))
    rc, said = update()  # a photo to embed: the failed load is the run's error
    assert rc != 0 and "the model file is broken" in said
    monkeypatch.setattr(update_module, "make_embedder", real)
    rc, said = update()
    assert rc == 0 and "added 1, changed 0, removed 0" in said
    fresh = tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def write_grouped(folder: Path, products: list[int], reshot: frozenset[int] = frozenset()) -> Path:
    """One parquet file of the products' photos in row groups of 4 rows (as a dataset exported with a
    fixed number of rows a group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = folder / "data" / "train-00000-of-00001.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": [{"bytes": photo(k, 1 if k in reshot else 0), "path": None} for k in products],
                      "item_id": [f"P{k:03d}" for k in products]})
    pq.write_table(table, f, row_group_size=4)
    return folder


def test_the_builds_record_is_what_reading_records_and_a_resumed_build_records_nothing(tiny_onnx, tmp_path,
                                                                                         monkeypatch):
    """Rows without a picture (no cell, no bytes) and a cell that does not decode: the build's record
    equals the one reading the file makes. A build resumed in a second process did not read every
    row itself: it records nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "catalogue"
    (data / "data").mkdir(parents=True)
    cells = [{"bytes": photo(0), "path": None}, None, {"bytes": None, "path": None},
             {"bytes": b"not a picture", "path": None}, *({"bytes": photo(k), "path": None} for k in range(1, 12))]
    pq.write_table(pa.table({"image": cells, "item_id": [f"P{k:03d}" for k in range(len(cells))]}),
                   data / "data" / "train-00000-of-00001.parquet", row_group_size=4)
    assert run(*args(data, tiny_onnx, tmp_path / "out")) == 3  # 3: rows that failed, listed
    spec = DatasetSpec(str(data), limit=None)
    cache = datarecord.hashes_file(spec)
    built = json.loads(cache.read_text())
    cache.unlink()
    list(datarecord.dataset_hashes(spec))
    assert json.loads(cache.read_text()) == built
    [entry] = built.values()
    assert [bool(sha) for sha, *_ in entry["rows"][:5]] == [True, False, False, True, True]
    assert "empty cell" in entry["rows"][1][2] and "no bytes" in entry["rows"][2][2] and entry["rows"][3][2] == ""
    cache.unlink()
    stop_after_shards(monkeypatch, 1)  # 15 rows in shards of 8: stopped after the first
    assert run(*args(data, tiny_onnx, tmp_path / "resumed")) == 130
    monkeypatch.undo()
    assert run(*args(data, tiny_onnx, tmp_path / "resumed")) == 3
    assert not cache.exists()


def test_a_rewritten_file_is_decoded_only_in_its_row_groups_that_changed(tiny_onnx, tmp_path, monkeypatch, capsys):
    """The catalogue exported again as one file: row groups whose stored bytes a recorded group had
    keep its rows; only the others are decoded. The build records what it read, exactly what an
    update reading the file would."""
    data, out = write_grouped(tmp_path / "catalogue", list(range(12))), tmp_path / "updated"  # groups 0-3 4-7 8-11
    ids = ("--id-column", "item_id")
    assert run(*args(data, tiny_onnx, out, *ids)) == 0
    spec = DatasetSpec(str(data), limit=None, id_column="item_id")
    cache = datarecord.hashes_file(spec)
    built = json.loads(cache.read_text())
    cache.unlink()
    listed = list(datarecord.dataset_hashes(spec))
    assert json.loads(cache.read_text()) == built  # the build's record is the one reading the file makes
    assert [(rec.source_row, rec.item_id, sha) for rec, sha in listed] == [
        (k, f"P{k:03d}", hashlib.sha256(photo(k)).hexdigest()) for k in range(12)]
    [entry] = built.values()
    assert [n for _, n in entry["groups"]] == [4, 4, 4]
    asked: list[list[int]] = []  # per file read: the rows of its groups read and hashed
    real = datarecord._hash_groups

    def counted(spec, path, groups, firsts):
        asked.append([r for g in groups for r in range(firsts[g], firsts[g + 1])])
        return real(spec, path, groups, firsts)

    monkeypatch.setattr(datarecord, "_hash_groups", counted)
    monkeypatch.setattr(datarecord, "iter_parquet_file", None)  # a file whose groups have digests is not read whole

    def update(name: str, products: list[int], reshot: frozenset[int] = frozenset()) -> str:
        write_grouped(data, products, reshot)
        asked.clear()
        capsys.readouterr()
        assert cli_update(data, tiny_onnx, out, *ids) == 0
        said = capsys.readouterr().out
        fresh = tmp_path / name
        assert run(*args(data, tiny_onnx, fresh, *ids)) == 0
        assert_same_as_fresh(out, fresh)
        return said

    assert "added 3, changed 0, removed 0, unchanged 12" in update("appended", list(range(15)))
    assert asked == [[12, 13, 14]]  # the new group alone
    less = [k for k in range(15) if k != 5]
    assert "added 0, changed 0, removed 1, unchanged 14" in update("one gone", less)
    assert asked == [list(range(4, 14))]  # every group from the removed row on holds other rows; the first is kept
    assert "added 0, changed 1, removed 0, unchanged 13" in update("re-shot", less, frozenset({1}))
    assert asked == [[0, 1, 2, 3]]  # the re-shot photo's group alone


def test_neighbours_are_carried_through_an_update_when_no_matrix_is_written(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    more = ("--max-matrix", "0", "--top-k", "4")  # no N x N matrix to write: the lists can be carried over
    assert run(*args(data, tiny_onnx, out, *more)) == 0
    write_catalogue(data, [*range(0, 5), *range(6, PRODUCTS), 40, 41])  # one gone, two added
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *more) == 0
    said = capsys.readouterr().out
    carried = re.search(r"neighbours: (\d+) of 31 items' lists carried over from the last run, (\d+) asked again", said)
    assert carried is not None, said
    assert 2 <= int(carried.group(2)) < 31 and int(carried.group(1)) + int(carried.group(2)) == 31
    assert run(*args(data, tiny_onnx, fresh, *more)) == 0
    assert_same_as_fresh(out, fresh)
    capsys.readouterr()  # a run over the same store carries every list as it is
    import main as cli

    assert cli.main([*map(str, ("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out, *more))]) == 0
    assert "31 of 31 items' lists carried over from the last run, 0 asked again" in capsys.readouterr().out
    assert neighbours(out) == neighbours(fresh)


def test_the_distance_matrix_is_carried_through_an_update(tiny_onnx, tmp_path, capsys):
    """With the N x N matrix written (N <= --max-matrix): the kept pairs' distances come from the
    last run's matrix (marked here, in place, with its stamp kept, to tell copies from computed
    values), the new items' are computed, and the lists are a fresh build's. A matrix that is not
    as the last run left it is not trusted; over the same store the matrix is kept as it is."""
    import os

    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    more = ("--top-k", "4")
    assert run(*args(data, tiny_onnx, out, *more)) == 0
    path = out / "outputs" / "distance_matrix.npy"
    st = path.stat()
    marked = np.load(path, mmap_mode="r+")
    marked += np.float32(1e-3) * (1 - np.eye(PRODUCTS, dtype=np.float32))
    marked.flush()
    del marked
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, inode and modification time
    write_catalogue(data, [*range(0, 5), *range(6, PRODUCTS), 40, 41])  # one gone, two added
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *more) == 0
    said = capsys.readouterr().out
    assert re.search(r"neighbours: \d+ of 31 items' lists carried over from the last run, \d+ asked again; "
                     r"the distance matrix carried over", said), said
    assert run(*args(data, tiny_onnx, fresh, *more)) == 0
    assert_same_as_fresh(out, fresh)  # the lists (from the old lists, not the marked matrix)

    def matrix(where: Path) -> np.ndarray:  # by (source_row, person), as comparable orders the lines
        rows = read_manifest(where / "embeddings" / "manifest.csv")
        order = np.array([r.embedding_row for r in sorted(rows, key=lambda r: (r.source_row, r.person))])
        return np.load(where / "outputs" / "distance_matrix.npy")[np.ix_(order, order)]

    copied = np.zeros((31, 31), bool)
    copied[:29, :29] = ~np.eye(29, dtype=bool)  # the kept photos come first by row, the 2 new ones last
    got, want = matrix(out), matrix(fresh)
    assert np.allclose(got[copied], want[copied] + 1e-3, atol=1e-6)  # copied from the last run's matrix
    assert np.allclose(got[~copied], want[~copied], atol=1e-6)  # computed: a new photo's, and the diagonal
    np.save(path, np.zeros((31, 31), np.float32))  # not the matrix the last run wrote
    write_catalogue(data, [*range(0, 5), *range(6, PRODUCTS), 40, 41, 42])
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out, *more) == 0
    said = capsys.readouterr().out
    assert "carried over" not in said  # a full pass, which writes the matrix
    assert run(*args(data, tiny_onnx, fresh, *more)) == 0
    assert_same_as_fresh(out, fresh)
    assert np.allclose(matrix(out), matrix(fresh), atol=1e-6)  # written by a full pass
    capsys.readouterr()  # a run over the same store keeps the matrix as it is
    import main as cli

    before = path.stat().st_mtime_ns
    assert cli.main([*map(str, ("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out, *more))]) == 0
    assert "32 of 32 items' lists carried over from the last run, 0 asked again; the distance matrix kept as it is" in (
        capsys.readouterr().out)
    assert path.stat().st_mtime_ns == before and np.allclose(matrix(out), matrix(fresh), atol=1e-6)
    assert cli.main([*map(str, ("--use-embeddings", "--onnx", tiny_onnx, "--output-dir", out, *more,
                                "--max-matrix", "10"))]) == 0
    assert not path.exists()  # no matrix written by this run: none left from another


def test_files_named_by_a_dataset_are_not_trusted_by_its_stamp(tiny_onnx, tmp_path, capsys):
    """Cells that name picture files: the parquet file's stamp says nothing of them, so its rows are
    not recorded, and a picture changed under the same path is found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for k in range(8):
        (pictures / f"p{k}.jpg").write_bytes(photo(k))
    data = tmp_path / "catalogue"
    (data / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": [str(pictures / f"p{k}.jpg") for k in range(8)]}),
                   data / "data" / "train-00000.parquet")
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    assert "added 0, changed 0, removed 0, unchanged 8" in capsys.readouterr().out
    cache = datarecord.hashes_file(DatasetSpec(str(data)))
    assert not cache.is_file() or json.loads(cache.read_text()) == {}
    (pictures / "p3.jpg").write_bytes(photo(3, version=1))  # re-shot under the same name
    assert cli_update(data, tiny_onnx, out) == 0
    assert "added 1, changed 0, removed 1, unchanged 7" in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)


def test_a_photo_renamed_in_a_folder_keeps_everything_but_takes_its_new_name(tiny_onnx, tmp_path, capsys):
    """A folder of photos where one file is renamed, its bytes the same: it is unchanged (no
    embedding), and its lines name it as it is now, as a fresh build does; so do the results
    (neighbours.csv's sources). Renamed in place (its row the same), the store is still rewritten."""
    folder = tmp_path / "looks"
    folder.mkdir()
    for k in range(8):
        (folder / f"p{k}.jpg").write_bytes(photo(k))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(folder, tiny_onnx, out)) == 0
    (folder / "p3.jpg").rename(folder / "p3 blue.jpg")  # sorts where p3.jpg did: the same row
    capsys.readouterr()
    assert cli_update(folder, tiny_onnx, out) == 0
    assert "added 0, changed 0, removed 0, unchanged 8" in capsys.readouterr().out
    assert run(*args(folder, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    sources = {r.source for r in read_manifest(out / "embeddings" / "manifest.csv")}
    assert "p3 blue.jpg" in {Path(s).name for s in sources} and "p3.jpg" not in {Path(s).name for s in sources}
    (folder / "p3 blue.jpg").rename(folder / "z3.jpg")  # now last: the rows move too
    assert cli_update(folder, tiny_onnx, out) == 0
    assert "added 0, changed 0, removed 0, unchanged 8" in capsys.readouterr().out
    assert run(*args(folder, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    with open(out / "retrieval_results" / "neighbours.csv", newline="") as f:
        assert "z3.jpg" in {Path(r["neighbour_source"]).name for r in csv.DictReader(f)}


def test_a_broken_link_in_a_folder_is_a_recorded_failure_in_a_build_and_an_update(tiny_onnx, tmp_path, capsys):
    """A picture of the folder that cannot be read (a link to a file that is gone): its row fails,
    said as such, in the build and in the update, and the rest goes on."""
    folder = tmp_path / "looks"
    folder.mkdir()
    for k in range(6):
        (folder / f"p{k}.jpg").write_bytes(photo(k))
    (folder / "p3.jpg").unlink()
    (folder / "p3.jpg").symlink_to(tmp_path / "gone.jpg")
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(folder, tiny_onnx, out)) == 3  # 3: a row failed
    (folder / "p6.jpg").write_bytes(photo(6))
    capsys.readouterr()
    assert cli_update(folder, tiny_onnx, out) == 3
    said = capsys.readouterr()
    assert "added 1, changed 0, removed 0, unchanged 6" in said.out
    assert "cannot read file" in said.out + said.err and "Traceback" not in said.err
    assert run(*args(folder, tiny_onnx, fresh)) == 3
    assert_same_as_fresh(out, fresh)


def test_a_parquet_cell_whose_own_path_changes_takes_its_new_name(tiny_onnx, tmp_path, capsys):
    """A local parquet dataset whose image cells carry a path of their own (as datasets' Image writes
    a file it was given): a cell whose path changes, its bytes the same, is unchanged (no embedding)
    and its lines name it as it is now, as a fresh build does; one that gains a path takes it. An
    update that changes nothing (the record read back, paths and all) rewrites nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "catalogue"
    (data / "data").mkdir(parents=True)
    target = data / "data" / "train-00000-of-00001.parquet"

    def write(paths: list[str | None]) -> None:
        cells = [{"bytes": photo(k), "path": paths[k]} for k in range(6)]
        pq.write_table(pa.table({"image": cells}), target, row_group_size=4)

    write([f"shop/p{k}.jpg" for k in range(5)] + [None])
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert cli_update(data, tiny_onnx, out) == 0  # from the build's record: nothing to rewrite
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == before
    write([f"shop/p{k}.jpg" for k in range(3)] + ["shop/p3 blue.jpg", "shop/p4.jpg", "shop/p5.jpg"])
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    assert "added 0, changed 0, removed 0, unchanged 6" in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    sources = sorted((r.source_row, r.source) for r in read_manifest(out / "embeddings" / "manifest.csv"))
    assert sources[3:] == [(3, "shop/p3 blue.jpg"), (4, "shop/p4.jpg"), (5, "shop/p5.jpg")]
    write([f"shop/p{k}.jpg" for k in range(3)] + ["shop/p3 blue.jpg", None, "shop/p5.jpg"])  # p4 loses its path
    assert cli_update(data, tiny_onnx, out) == 0
    assert "added 0, changed 0, removed 0, unchanged 6" in capsys.readouterr().out
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    assert (4, f"{data}[4]") in {(r.source_row, r.source) for r in read_manifest(out / "embeddings" / "manifest.csv")}


@pytest.mark.parametrize("now, said, embedded", [
    # a product's new photo listed before its three old ones: one added, none of theirs taken
    ([("P0", "N"), ("P0", "A"), ("P0", "B"), ("P0", "C"), ("P1", "D")], (1, 0, 0, 4), [0]),
    # one photo of the product replaced (B by E, listed first): one changed, the others kept
    ([("P0", "E"), ("P0", "A"), ("P0", "C"), ("P1", "D")], (0, 1, 0, 3), [0]),
    # a photo dropped and one added at the end: the old row is replaced, the rest kept
    ([("P0", "A"), ("P0", "C"), ("P1", "D"), ("P0", "F")], (0, 1, 0, 3), [3]),
    # two new photos for one old one gone: one replaces it, one is added
    ([("P0", "G"), ("P0", "H"), ("P0", "A"), ("P0", "C"), ("P1", "D")], (1, 1, 0, 3), [0, 1]),
])
def test_an_update_by_id_keeps_each_photo_of_a_product_whose_bytes_came_back(now, said, embedded):
    """--id-column names a product, and a product has several photos: each photo whose bytes came
    back under its id keeps its row and vector wherever it is listed now; only the photos with new
    bytes are embedded, as changed (taking an old row of the id no photo came back to) or added."""
    before = [("P0", "A"), ("P0", "B"), ("P0", "C"), ("P1", "D")]
    groups = {i: [ManifestRow(index=i, file=f"{b}.jpg", source_row=i, item_id=pid, source_sha256=b, sha256=b)]
              for i, (pid, b) in enumerate(before)}
    records = [(Record(i, "", None, item_id=pid), b) for i, (pid, b) in enumerate(now)]
    plan = update_module.plan_update(groups, records, by_id=True)
    assert (plan.added, plan.changed, plan.removed, plan.unchanged) == said
    assert plan.embed == embedded
    kept = dict(plan.kept)  # old row -> row now: each the photo of its own bytes
    assert all(before[old][1] == now[new][1] for old, new in kept.items())


def test_rows_without_a_picture_that_go_or_come_are_counted(tiny_onnx, tmp_path, capsys):
    """The summary's counts cover every row: a row without a picture that left the dataset, and a
    new one, are said (they were counted nowhere, or as 'redone')."""
    cells: list[bytes | None] = [photo(0), photo(1), None, photo(3)]
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 3  # 3: the row without a picture
    assets.write_parquet_dataset(data, [photo(0), photo(1), photo(3)])
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "added 0, changed 0, removed 0, unchanged 3; 1 row(s) without a picture no longer read (gone, or past " \
           "--limit)" in said
    assets.write_parquet_dataset(data, [photo(0), photo(1), photo(3), None])
    assert cli_update(data, tiny_onnx, out) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert "unchanged 3; 1 row(s) without a picture recorded (new, or failing otherwise than before)" in said


def test_a_run_stopped_after_its_store_changed_leaves_no_outputs_of_the_store_before(tiny_onnx, tmp_path, monkeypatch,
                                                                                      capsys):
    """Stopped between the store switched in and its outputs written, an update left the store before's
    neighbour table (rows of photos that went), duplicates, distance matrix (of another size) and report
    section beside the new store. They go as the store changes (the matrix moved aside, which the
    update carries its kept pairs from: test_the_distance_matrix_is_carried_through_an_update)."""
    from pipeline import runner
    from pipeline.webreport import read_section

    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, [*range(0, 5), *range(6, PRODUCTS), 40, 41])  # one gone, two added

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "open_searcher", stop)
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    said = " ".join(capsys.readouterr().err.split())  # not "the update's complete shards are kept": it is switched in
    assert f"interrupted: the updated store in {out / 'embeddings'} is in place; run the same command again to " \
           "finish its neighbours, pictures and report (nothing is embedded again)" in said, said
    assert len(read_manifest(out / "embeddings" / "manifest.csv")) == 31  # the new store is in place
    assert not (out / "retrieval_results" / "neighbours.csv").exists()
    assert not (out / "outputs" / "duplicates.csv").exists()
    assert not (out / "outputs" / "distance_matrix.npy").exists()
    assert read_section(out / "outputs", "gallery") is None
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0  # nothing left to embed: the outputs are made again
    assert not list((out / "outputs").glob(".distance_matrix*"))  # the matrix moved aside is not left behind
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    assert np.load(out / "outputs" / "distance_matrix.npy").shape == (31, 31)


def test_an_update_over_a_report_of_another_store_keeps_the_matrix_it_says_it_kept(tiny_onnx, tmp_path, capsys):
    """The report left of the store before (an update stopped after its switch, then a run that wrote
    this store's lists and matrix): an update with nothing to embed moved the matrix aside, said
    "the distance matrix kept as it is", listed it as an output, and deleted it."""
    from pipeline.store import store_sha256

    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out = tmp_path / "updated"
    assert run(*args(data, tiny_onnx, out)) == 0
    matrix = out / "outputs" / "distance_matrix.npy"
    before = np.load(matrix)
    section = out / "outputs" / "report" / "sections" / "gallery.js"
    section.write_text(section.read_text().replace(store_sha256(out / "embeddings"), "0" * 64))  # of another store
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = capsys.readouterr().out
    assert "the distance matrix kept as it is" in said and f"distance matrix -> {matrix}" in said
    assert matrix.is_file() and np.array_equal(np.load(matrix), before)
    assert not list((out / "outputs").glob(".distance_matrix*"))


def test_a_reuse_of_a_store_whose_metadata_is_of_another_version_is_refused_before_any_output(tiny_onnx, tmp_path,
                                                                                             capsys):
    """--use-embeddings over a store whose update stopped before its metadata was written: it computed
    every neighbour and rewrote neighbours.csv, the matrix, the pictures and the plots, then refused."""
    import pyarrow.parquet as pq

    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    path = out / "embeddings" / "metadata.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"fashion.manifest_sha256": b"0" * 64}), path)
    outputs = {p: p.stat().st_mtime_ns for p in [out / "retrieval_results" / "neighbours.csv",
                                                 out / "outputs" / "distance_matrix.npy"]}
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out, "--use-embeddings")) == 1
    assert "was written for another version of the store" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs  # nothing rewritten before the refusal


def test_an_update_without_dataset_flags_finishes_a_stopped_switch_on_the_stores_own_dataset(tiny_onnx, tmp_path,
                                                                                              monkeypatch, capsys):
    """Stopped midway through its switch, the store has no sidecar: an --update with no dataset flags
    read none there and went on with the default dataset (the hub's DeepFashion); the staged store's
    sidecar says what it is."""
    data, out = switch_stopped_at_its_start(tmp_path, tiny_onnx, 8, monkeypatch)
    assert not (out / "embeddings" / "embeddings.json").exists()  # between its files
    capsys.readouterr()
    assert run("--update", "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 0, \
        capsys.readouterr().err
    assert sorted(r.sha256 for r in read_manifest(out / "embeddings" / "manifest.csv")) == sorted(
        hashlib.sha256(photo(k)).hexdigest() for k in [*range(1, 8), 50])  # the updated store's photos, not the old


def test_a_reuse_of_a_store_whose_folder_changed_since_says_so_and_an_update_catches_up(tiny_onnx, tmp_path, capsys):
    """--use-embeddings reused a store whose photos had been added, replaced or removed since, without
    a word: its neighbours named photos no longer there. Said (a warning and a note); after --update,
    no more."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(assets.jpeg_bytes(40, 60, seed=i))
    out = tmp_path / "out"
    flags = ["--dataset", folder, "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0"]
    assert run(*flags) == 0
    assert run(*flags, "--use-embeddings") == 0
    assert "changed since" not in capsys.readouterr().err
    (folder / "p6.jpg").write_bytes(assets.jpeg_bytes(40, 60, seed=6))
    (folder / "p1.jpg").unlink()
    import main as cli

    assert cli.main([str(f) for f in (*flags, "--use-embeddings")]) == 0
    out_err = capsys.readouterr()
    said = f"the dataset {folder} changed since this store was made from it (6 file(s)"
    assert said in out_err.err and "--update brings it up to date" in out_err.err
    assert said in out_err.out  # in the run's summary too
    assert run(*flags, "--update") == 0
    capsys.readouterr()
    assert run(*flags, "--use-embeddings") == 0
    assert "changed since" not in capsys.readouterr().err


def test_an_update_stopped_after_its_new_photos_were_embedded_does_not_embed_them_again(tiny_onnx, tmp_path,
                                                                                        monkeypatch, capsys):
    """Killed as it wrote the merged store, the next update embedded every new photo again: their
    staged store was whole, but nothing said which rows it was built for."""

    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, [*range(3, PRODUCTS), *range(50, 70)])

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "_write_next", stopped)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    staged = out / "embeddings" / ".update" / "new"
    assert (staged / "embeddings.json").is_file() and (staged / "part.json").is_file()

    def no_build(cfg, summary, embedder=None, part=None):
        raise AssertionError("the new photos were embedded again")

    monkeypatch.setattr(update_module, "build", no_build)
    capsys.readouterr()
    import main as cli

    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    assert "embedded by the update that stopped are taken as it left them" in " ".join(capsys.readouterr().out.split())
    monkeypatch.undo()
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert_same_as_fresh(out, fresh)
    assert not (out / "embeddings" / ".update").exists()


def test_a_bare_update_embeds_with_the_onnx_file_the_store_records(tiny_onnx, tmp_path, monkeypatch):
    """`python main.py --update --output-dir out` (the README's example) found the store's ONNX file
    only in ./onnx or the project's onnx/: built with a file elsewhere, it was refused ("pass --onnx
    FILE"). The store records the file's path, and the updated store records it again."""
    import json
    import shutil

    from tests.helpers import run

    file = tmp_path / "models" / "edge_int8.onnx"
    file.parent.mkdir()
    shutil.copy(tiny_onnx, file)
    data = write_catalogue(tmp_path / "catalogue", list(range(6)))
    out = tmp_path / "g"
    assert run(*args(data, file, out)) == 0
    monkeypatch.chdir(tmp_path / "models")  # from another folder, where no ./onnx holds it
    write_catalogue(tmp_path / "catalogue", list(range(8)))
    assert run("--update", "--output-dir", out) == 0
    sidecar = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert sidecar["machine"]["onnx_file"] == str(file) and sidecar["count"] == 8


def test_an_interrupted_updates_staging_for_another_dataset_is_said_set_aside(tiny_onnx, tmp_path, monkeypatch,
                                                                               capsys):
    """Stopped, then the dataset changed again: the staged shards are of other rows, and were thrown
    away with an INFO line alone; the summary says the new photos were embedded afresh."""
    data = write_catalogue(tmp_path / "catalogue", list(range(PRODUCTS)))
    out = tmp_path / "g"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_catalogue(data, [*range(PRODUCTS), *range(50, 70)])
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--update")) == 130
    monkeypatch.undo()
    write_catalogue(data, [*range(PRODUCTS), *range(80, 90)])  # other new photos meanwhile
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "the interrupted update's staged photos were of other rows or flags (the dataset changed since it " \
           "stopped): set aside, and the new photos embedded afresh" in said
    assert f"added 10, changed 0, removed 0, unchanged {PRODUCTS}" in said

"""pipeline/derived.py: query and video results made on a store are retired when the store changes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.derived import made_on, retire_stale
from pipeline.report import RunSummary
from pipeline.store import read_manifest
from pipeline.webreport import REPORT_DIR, Section, read_section, write_section
from tests import assets
from tests.helpers import run
from tests.test_update import args, cli_update, write_catalogue


def sections(out: Path) -> list[str]:
    text = (out / "outputs" / REPORT_DIR / "sections.js").read_text()
    return json.loads(text[text.index("(") + 1 : text.rindex(")")])


def query(out: Path, onnx: Path, picture: Path, k: int = 3) -> list[str]:
    assert run("--query-image", picture, "--onnx", onnx, "--output-dir", out, "--top-k", k) == 0
    return sorted(p.name for p in (out / "retrieval_results" / "queries").iterdir())


def test_query_results_of_a_store_are_removed_when_an_update_changes_it(tiny_onnx, tmp_path, capsys):
    data = write_catalogue(tmp_path / "catalogue", list(range(12)))
    out = tmp_path / "g"
    assert run(*args(data, tiny_onnx, out)) == 0
    picture = tmp_path / "look.jpg"
    picture.write_bytes(assets.jpeg_bytes(64, 80, seed=3))
    made = query(out, tiny_onnx, picture)
    assert made == ["q000_look.jpg", "query_results.csv"] and "query" in sections(out)
    stamp = read_section(out / "outputs", "query")["data"]["made_on"]
    assert stamp == made_on(out / "embeddings", out, out / "retrieval_results" / "queries", values=True)
    assert stamp["gallery"] == "embeddings" and stamp["folder"] == "retrieval_results/queries"

    # a gallery run that leaves the store as it was keeps them, bytes and section: from the cache, and an
    # update of nothing
    queries = out / "retrieval_results" / "queries"
    made = query(out, tiny_onnx, picture, k=12)  # every item: the rows after the one removed below too
    table = (queries / "query_results.csv").read_bytes()
    assert run(*args(data, tiny_onnx, out, "--use-embeddings")) == 0
    assert cli_update(data, tiny_onnx, out) == 0
    assert sorted(p.name for p in queries.iterdir()) == made and (queries / "query_results.csv").read_bytes() == table
    assert "query" in sections(out) and read_section(out / "outputs", "query")["data"]["made_on"] == stamp

    hits = list(csv.DictReader(io.StringIO(table.decode())))
    write_catalogue(data, [*range(3), *range(4, 12)])  # the photo of row 3 removed: rows after it move up
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in (out / "retrieval_results" / "queries").iterdir()) == []
    assert "query" not in sections(out) and "gallery" in sections(out)
    assert not (out / "outputs" / REPORT_DIR / "sections" / "query.js").exists()
    assert "results made on the gallery before this run removed, with their report sections " \
           "(retrieval_results/queries)" in " ".join(said.split())
    # the table removed named rows that hold other photos now (the rows after the one removed moved up)
    now = {r.index: r.file for r in read_manifest(out / "embeddings" / "manifest.csv")}
    assert len(hits) == 12 and any(now.get(int(h["row"])) != h["gallery_file"] for h in hits)
    # run again, they name the store as it is now
    assert query(out, tiny_onnx, picture) == made
    assert read_section(out / "outputs", "query")["data"]["made_on"] == made_on(
        out / "embeddings", out, out / "retrieval_results" / "queries", values=True)


def test_query_results_go_when_the_catalogues_values_alone_change(tiny_onnx, tmp_path, capsys):
    """An update that changed prices alone left query_results.csv with the old prices, and nothing said
    so (a video's matches hold no values: they stay)."""
    from tests.test_update import photo

    def catalogue(prices: list[float]) -> Path:
        return assets.write_parquet_dataset(tmp_path / "catalogue", [photo(k) for k in range(8)],
                                            extra={"item_id": [f"P{k:03d}" for k in range(8)], "price": prices})

    data = catalogue([10.0 + k for k in range(8)])
    out = tmp_path / "g"
    assert run(*args(data, tiny_onnx, out)) == 0
    picture = tmp_path / "look.jpg"
    picture.write_bytes(assets.jpeg_bytes(64, 80, seed=3))
    assert query(out, tiny_onnx, picture) == ["q000_look.jpg", "query_results.csv"]
    folder = _video_section(out, made_on(out / "embeddings", out, out / "video_results" / "clip_1"))
    catalogue([0.99] + [10.0 + k for k in range(1, 8)])  # one price cut: the photos as they were
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in (out / "retrieval_results" / "queries").iterdir()) == []
    # the update says what it changed ("added 0, changed 0" alone read as nothing done)
    assert "metadata: values of 1 kept photo(s) changed (metadata.parquet written anew)" in said
    assert "query" not in sections(out) and "video_clip_1" in sections(out)  # a video's matches hold no price
    assert (folder / "tracks.json").exists()
    assert "query results made before this run removed, with their report sections (retrieval_results/queries): " \
           "they held the catalogue's values as they were (a price, say), which changed; run those queries " \
           "again" in said
    query(out, tiny_onnx, picture, k=8)
    with open(out / "retrieval_results" / "queries" / "query_results.csv", newline="") as f:
        prices = {r["gallery_file"]: float(r["price"]) for r in csv.DictReader(f)}
    assert 0.99 in prices.values()  # the new price, in the results made again
    now = [0.99] + [10.0 + k for k in range(1, 8)]  # each photo's own price, not another's
    assert prices == {r.file: now[r.source_row] for r in read_manifest(out / "embeddings" / "manifest.csv")}
    # a photo gone from the top moves every later row: still the one photo whose values changed is counted
    # (matched by row number, all six kept photos were)
    catalogue_now = assets.write_parquet_dataset(
        tmp_path / "catalogue", [photo(k) for k in range(1, 8)],
        extra={"item_id": [f"P{k:03d}" for k in range(1, 8)], "price": [10.0 + k for k in range(1, 7)] + [5.0]})
    assert catalogue_now == data
    capsys.readouterr()
    assert cli_update(data, tiny_onnx, out) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "removed 1, unchanged 7" in said and "values of 1 kept photo(s) changed" in said, said


def _video_section(out: Path, stamp: dict, exist_ok: bool = False) -> Path:
    folder = out / "video_results" / "clip_1"
    folder.mkdir(parents=True, exist_ok=exist_ok)
    for name in ("frame_000001.jpg", "track_001.jpg", "annotated.mp4", "results.jsonl", "tracks.json", "mine.txt"):
        (folder / name).write_bytes(b"x")
    write_section(out / "outputs", Section("video_clip_1", "video", "Video clip_1", RunSummary(mode="video"),
                                           {"made_on": stamp}))
    return folder


def _store(root: Path, embeddings: str, manifest: str = "m") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "embeddings.json").write_text(json.dumps({"embeddings_sha256": embeddings, "manifest_sha256": manifest}))
    return root


def test_a_video_s_outputs_go_with_its_section_and_only_when_its_own_store_changed(tmp_path):
    out = tmp_path / "out"
    store = _store(out / "embeddings", "e1")
    folder = _video_section(out, made_on(store, out, out / "video_results" / "clip_1"))
    summary = RunSummary(mode="t")
    assert retire_stale(store, out, out / "outputs", summary) == []  # the same store: kept
    assert retire_stale(_store(out / "embeddings_segment", "s2"), out, out / "outputs", summary) == []  # another's
    _store(out / "embeddings", "e1", manifest="m2")  # the manifest changed alone (a row renamed, say)
    assert retire_stale(store, out, out / "outputs", summary) == ["video_results/clip_1"]
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]  # a file it did not make stays
    assert "video_clip_1" not in sections(out)
    assert "run those queries or videos again" in summary.notes[-1] and "stay" not in summary.notes[-1]
    # at a URL, the files there stay: said
    _video_section(out, made_on(store, out, out / "video_results" / "clip_1"), exist_ok=True)
    _store(out / "embeddings", "e3")
    assert retire_stale(store, out, out / "outputs", summary, "s3://bucket/run") == ["video_results/clip_1"]
    assert "(here and from the report: their files at s3://bucket/run stay, remove them there)" in summary.notes[-1]


def test_a_section_naming_a_folder_outside_the_output_folder_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    store = _store(out / "embeddings", "e1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "results.jsonl").write_text("keep")
    stamp = {**made_on(store, out, out), "folder": "../elsewhere"}
    write_section(out / "outputs", Section("video_x", "video", "Video x", RunSummary(mode="video"), {"made_on": stamp}))
    _store(out / "embeddings", "e2")
    assert retire_stale(store, out, out / "outputs", RunSummary(mode="t")) == []
    assert (elsewhere / "results.jsonl").read_text() == "keep"


def test_a_search_of_a_folder_whose_build_stopped_names_the_run_that_finishes_it(tiny_onnx, tmp_path, monkeypatch,
                                                                                   capsys):
    import shlex

    from tests.helpers import stop_after_shards

    data = write_catalogue(tmp_path / "catalogue", list(range(20)))
    out = tmp_path / "g"
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out, "--id-column", "item_id")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run("--output-dir", out, "--query-text", "red") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"no complete store in {out / 'embeddings'}" in err and "without the cache flag" not in err
    assert f"stopped before it finished (its shards are in {out / 'embeddings' / '.partial'}): run it again" in err
    began = err.split("It began with ", 1)[1].rstrip(".")
    assert began == f"--dataset {data} --split train --limit 0 --image-column image --id-column item_id --backend " \
                    "onnx --decode cpu " \
                    f"--onnx FILE (the file whose sha256 is {began.split('sha256 is ')[1][:12]}…; none here has it) " \
                    "--batch-size 4 --shard-rows 8"
    # those flags (the file named) resume it, and the search then answers
    flags = shlex.split(began.replace(began[began.index("FILE"):began.index(") --batch") + 1], str(tiny_onnx)))
    import main as cli

    assert cli.main([*flags, "--output-dir", str(out), "--max-result-images", "0"]) == 0
    assert "resumed at row 8 from 1 complete shard(s)" in capsys.readouterr().out
    assert run("--output-dir", out, "--query-text", "red", "--onnx", tiny_onnx) == 0


def test_a_rebuild_stopped_early_leaves_the_store_before_it_whole(tiny_onnx, tmp_path, monkeypatch, capsys):
    """A rebuild begun by mistake (--use-embeddings forgotten, or other flags) and stopped: the store
    there before still answers searches and --use-embeddings, and its refusal of the new flags names
    the stopped run that finishes the rebuild; finished, the rebuild replaces it."""
    import numpy as np

    from tests.helpers import stop_after_shards

    data = write_catalogue(tmp_path / "catalogue", list(range(20)))
    out = tmp_path / "g"
    assert run(*args(data, tiny_onnx, out), "--max-result-images", "0") == 0
    before = np.load(out / "embeddings" / "embeddings.npy")
    stop_after_shards(monkeypatch, 1)
    assert run(*args(data, tiny_onnx, out), "--limit", "12", "--max-result-images", "0") == 130
    monkeypatch.undo()
    assert ("complete shards are kept; run the same command again to resume (the store there before stays whole, "
            "and searchable, until the build finishes)") in capsys.readouterr().err
    assert (out / "embeddings" / ".partial").is_dir()
    assert run("--output-dir", out, "--query-text", "red", "--onnx", tiny_onnx) == 0  # still searchable
    assert run(*args(data, tiny_onnx, out), "--use-embeddings", "--max-result-images", "0") == 0
    np.testing.assert_array_equal(np.load(out / "embeddings" / "embeddings.npy"), before)
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, out), "--limit", "12", "--use-embeddings") == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "limit: cache has every row (--limit 0), asked for 12" in err
    assert (f"A gallery run into it stopped before it finished (its shards are in {out / 'embeddings' / '.partial'}):"
            " run the same command without --use-embeddings to finish it") in err
    assert run("--output-dir", out, "--query-text", "red", "--onnx", tiny_onnx, "--limit", "12") == 1
    err = " ".join(capsys.readouterr().err.split())  # a search is told the flags that run began with
    assert "--limit 12" in err.split("It began with ", 1)[1]
    assert run(*args(data, tiny_onnx, out), "--limit", "12", "--max-result-images", "0") == 0  # resumed, finished
    assert len(np.load(out / "embeddings" / "embeddings.npy")) == 12

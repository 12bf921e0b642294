"""--output-dir as a URL, against an S3 stand-in on 127.0.0.1: the outputs land in the bucket, equal
to a local run's; a fresh working copy reuses or resumes from what the bucket holds; a URL that
cannot be written, or whose filesystem package is missing, is refused before any work."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.duplicates import SIGNATURE_VERSION, signed_now
from pipeline.store import read_manifest
from tests import assets
from tests.helpers import file_of, run, signed_earlier_shard, stop_after_shards, store_file_names


def _url() -> str:
    return f"s3://bucket/{secrets.token_hex(4)}/run"


def _args(ds, onnx, out, work, *extra):
    return ["--dataset", ds, "--onnx", onnx, "--output-dir", out, "--work-dir", work, "--shard-rows", "16", *extra]


def _files(fs, url: str) -> dict[str, bytes]:
    root = url.removeprefix("s3://")
    fs.invalidate_cache()  # the run wrote through its own client
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


@pytest.fixture(scope="module")
def rows40(tmp_path_factory):
    cells = [assets.encode(assets.rgb_image(24, 32, seed=i), "PNG") for i in range(40)]
    cells[20] = assets.corrupt_bytes()
    return assets.write_parquet_dataset(tmp_path_factory.mktemp("rows40") / "ds", cells)


def test_a_gallery_run_to_s3_equals_a_local_run_and_is_reused_from_a_fresh_copy(
    rows40, tiny_onnx, tmp_path, s3, capsys
):
    fs, _ = s3
    url, local = _url(), tmp_path / "local"
    assert run("--dataset", rows40, "--onnx", tiny_onnx, "--output-dir", local, "--shard-rows", "16") == 3
    stale = f"{url.removeprefix('s3://')}/images/img_99999.png"  # an earlier, bigger run's image
    fs.pipe_file(stale, b"old")
    assert run(*_args(rows40, tiny_onnx, url, tmp_path / "copy1")) == 3  # row 20 is recorded as failed
    files = _files(fs, url)
    assert sorted(k for k in files if k.startswith("images/")) == sorted(
        f"images/{p.name}" for p in (local / "images").iterdir()
    )
    assert "images/img_99999.png" not in files
    assert files["embeddings/manifest.csv"] == (local / "embeddings" / "manifest.csv").read_bytes()
    assert files["embeddings/embeddings.npy"] == (local / "embeddings" / "embeddings.npy").read_bytes()
    assert "retrieval_results/neighbours.csv" in files and "outputs/report.html" in files
    assert not [k for k in files if ".partial/" in k or k.endswith((".pipeline.lock", ".remote-sync.json"))]
    # another machine: an empty working copy fetches the store (not the images) and reuses it
    capsys.readouterr()
    copy2 = tmp_path / "copy2"
    assert cli.main(["--use-embeddings", *map(str, _args(rows40, tiny_onnx, url, copy2))]) == 3
    said = capsys.readouterr().out
    assert "standard (from cache)" in said and f"outputs sent to {url}" in said
    assert (copy2 / "embeddings" / "manifest.csv").is_file() and not (copy2 / "images").exists()
    # the bucket's store edited behind our back: refused like a local cache
    root = url.removeprefix("s3://")
    manifest = fs.cat_file(f"{root}/embeddings/manifest.csv")
    names = re.findall(rb"img_[0-9a-f]{16}\.\w+", manifest)
    fs.pipe_file(f"{root}/embeddings/manifest.csv", manifest.replace(names[3], names[4], 1))
    assert run("--use-embeddings", *_args(rows40, tiny_onnx, url, tmp_path / "copy3")) == 1
    assert "manifest" in capsys.readouterr().err
    # a working copy is one URL's: reused for another, files unchanged in it would never be sent there
    other = _url()
    assert run(*_args(rows40, tiny_onnx, other, tmp_path / "copy1")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--work-dir {tmp_path / 'copy1'} is the working copy of {url}, not of {other}" in err
    assert not _files(fs, other)  # nothing sent there
    assert not [k for k in _files(fs, url) if k.endswith(".remote-of")]  # the mark stays in the working copy


def test_an_interrupted_run_resumes_from_the_bucket_in_another_working_copy(
    rows40, tiny_onnx, tmp_path, s3, monkeypatch, capsys
):
    fs, _ = s3
    url = _url()
    stop_after_shards(monkeypatch, 2)
    assert run(*_args(rows40, tiny_onnx, url, tmp_path / "first")) == 130
    monkeypatch.undo()
    partial = [k for k in _files(fs, url) if k.startswith("embeddings/.partial/")]
    assert {k.rsplit("/", 1)[1] for k in partial} >= {"shard_00000.done", "shard_00001.done"}
    # its first shard as a run of the signature before this one left it: the second copy signs its
    # photos again from the bucket, where the first copy's run put them
    root, edited = url.removeprefix("s3://"), tmp_path / "edited"
    edited.mkdir()
    for name in ("shard_00000.csv", "shard_00000.done"):
        (edited / name).write_bytes(fs.cat_file(f"{root}/embeddings/.partial/{name}"))
    rewritten = signed_earlier_shard(edited, 0)
    for name in ("shard_00000.csv", "shard_00000.done"):
        fs.pipe_file(f"{root}/embeddings/.partial/{name}", (edited / name).read_bytes())
    capsys.readouterr()
    assert cli.main(list(map(str, _args(rows40, tiny_onnx, url, tmp_path / "second", "-v")))) == 3
    said = capsys.readouterr().out
    assert "resumed at row 32 from 2 complete shard(s)" in said
    assert f"duplicates: {rewritten} line(s) of the resumed shards signed again ({SIGNATURE_VERSION}" in said
    looks = [r.look for r in read_manifest(tmp_path / "second" / "embeddings" / "manifest.csv") if r.look]
    assert len(looks) >= rewritten and all(signed_now(look) for look in looks)
    files = _files(fs, url)
    clean = tmp_path / "clean"  # the bucket's store is a clean local run's, each photo's signals its own
    assert run("--dataset", rows40, "--onnx", tiny_onnx, "--output-dir", clean, "--shard-rows", "16") == 3
    for name in ("manifest.csv", "embeddings.npy"):
        assert files[f"embeddings/{name}"] == (clean / "embeddings" / name).read_bytes(), name
    assert [r.source_row for r in read_manifest(tmp_path / "second" / "embeddings" / "manifest.csv")] == list(range(40))
    assert files["embeddings/manifest.csv"] == (tmp_path / "second" / "embeddings" / "manifest.csv").read_bytes()
    assert not [k for k in files if ".partial/" in k]  # the finished store's shards are gone from the bucket too
    emb = np.load(tmp_path / "second" / "embeddings" / "embeddings.npy")
    assert emb.shape == (39, 16)


def test_urls_that_cannot_be_used_are_refused_before_any_work(rows40, tiny_onnx, tmp_path, s3, capsys):
    assert run(*_args(rows40, tiny_onnx, "s3://no-such-bucket/run", tmp_path / "w")) == 1
    assert "s3://no-such-bucket/run cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "w" / "embeddings").exists()
    assert run(*_args(rows40, tiny_onnx, "gs://bucket/run", tmp_path / "w")) == 2
    assert "gcsfs" in capsys.readouterr().err  # its filesystem package is not installed
    assert run("--work-dir", tmp_path / "w", "--output-dir", tmp_path / "out") == 2
    assert "--work-dir is the working copy of an --output-dir URL" in capsys.readouterr().err


def test_an_upload_that_fails_after_a_failed_run_leaves_the_runs_error_to_see(tmp_path, monkeypatch, caplog):
    from pipeline.errors import PipelineError
    from pipeline.remote import RemoteOutput, mirrored

    def send(self):
        raise ConnectionError("bucket unreachable")

    monkeypatch.setattr(RemoteOutput, "send", send)
    url = f"memory://{secrets.token_hex(4)}/run"
    with pytest.raises(KeyboardInterrupt), mirrored(url, tmp_path / "a", resend="add --use-embeddings"):
        raise KeyboardInterrupt  # the run's own end: what the user sees
    assert f"uploading to {url} failed (ConnectionError: bucket unreachable)" in caplog.text
    # the run failed: running it again resumes it (its store may not be complete: no cache flag)
    assert "run the same command again to send them" in caplog.text and "add --use-embeddings" not in caplog.text
    with pytest.raises(PipelineError, match="uploading to .* failed .*run the same command again"):
        with mirrored(url, tmp_path / "b"):
            pass  # a run that finished: the failed upload is the error


def test_files_a_rerun_rewrites_reach_the_bucket_with_their_new_bytes(rows40, tiny_onnx, tmp_path, s3):
    """A second run from the same working copy with --top-k 2 rewrites the neighbour table, the result
    pictures and the report section: the bucket holds the new bytes, not the first run's."""
    fs, _ = s3
    url, work = _url(), tmp_path / "copy"
    assert run(*_args(rows40, tiny_onnx, url, work, "--top-k", "4")) == 3
    first = _files(fs, url)
    assert run("--use-embeddings", *_args(rows40, tiny_onnx, url, work, "--top-k", "2")) == 3
    second = _files(fs, url)
    for name in ("retrieval_results/neighbours.csv", f"retrieval_results/{Path(file_of(work, 0)).stem}_matches.jpg",
                 "outputs/report/sections/gallery.js"):
        assert second[name] != first[name], name
        assert second[name] == (work / name).read_bytes(), name  # what the run wrote, byte for byte
    table = second["retrieval_results/neighbours.csv"].decode().splitlines()
    assert {line.split(",")[2] for line in table[1:]} == {"1", "2"}  # ranks of --top-k 2 only
    assert second["embeddings/embeddings.npy"] == first["embeddings/embeddings.npy"]  # the store was reused


def test_an_update_at_a_url_equals_a_fresh_build_and_keeps_the_old_store_until_its_switch(
    tiny_onnx, tmp_path, s3, monkeypatch, capsys
):
    from pipeline import update as update_module
    from tests.test_update import write_catalogue

    fs, _ = s3
    url = _url()
    data = write_catalogue(tmp_path / "catalogue", list(range(20)))
    more = ["--limit", "0", "--max-result-images", "3", "--batch-size", "4"]
    assert run(*_args(data, tiny_onnx, url, tmp_path / "copy1", *more)) == 0
    before = _files(fs, url)
    # Two photos gone early (the rows after them move up; no file is renamed), three new ones.
    write_catalogue(data, [0, *range(3, 20), 30, 31, 32])

    real = update_module._write_next

    def killed(*a, **kw):  # killed once the new store and the renamed files are staged
        real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(update_module, "_write_next", killed)
    assert run(*_args(data, tiny_onnx, url, tmp_path / "copy2", "--update", *more)) == 130
    monkeypatch.undo()
    during = _files(fs, url)
    for name in ("embeddings/embeddings.json", "embeddings/manifest.csv", "embeddings/embeddings.npy"):
        assert during[name] == before[name]  # the old store, whole
    assert {k: v for k, v in during.items() if k.startswith("images/img_")} == {
        k: v for k, v in before.items() if k.startswith("images/img_")
    }
    assert run("--use-embeddings", *_args(data, tiny_onnx, url, tmp_path / "reader", *more)) == 0

    # another working copy finishes it: the switch, then the new store sent, its sidecar last
    capsys.readouterr()
    assert cli.main([*map(str, _args(data, tiny_onnx, url, tmp_path / "copy3", "--update", *more))]) == 0
    assert "added 3, changed 0, removed 2, unchanged 18" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert run("--dataset", data, "--onnx", tiny_onnx, "--output-dir", fresh, *more) == 0
    after = _files(fs, url)
    assert {k: v for k, v in after.items() if k.startswith("images/")} == {
        f"images/{p.name}": p.read_bytes() for p in (fresh / "images").iterdir()
    }
    from tests.test_update import comparable

    updated = tmp_path / "updated"
    for name in store_file_names(after["embeddings/embeddings.json"]):
        (updated / "embeddings").mkdir(parents=True, exist_ok=True)
        (updated / "embeddings" / name).write_bytes(after[f"embeddings/{name}"])
    (updated / "images").mkdir()
    for k, v in after.items():
        if k.startswith("images/"):
            (updated / k).write_bytes(v)
    a_lines, a_vec, _ = comparable(updated)
    b_lines, b_vec, _ = comparable(fresh)
    assert a_lines == b_lines and np.array_equal(a_vec, b_vec)
    assert not [k for k in after if "/.update" in k]
    assert run("--use-embeddings", *_args(data, tiny_onnx, url, tmp_path / "reader2", *more)) == 0
    # from a fresh working copy with no dataset flags: the store's own dataset and every row (--limit 0),
    # read from the store fetched from the bucket (not the default dataset and --limit)
    capsys.readouterr()
    assert cli.main(["--onnx", str(tiny_onnx), "--output-dir", url, "--work-dir", str(tmp_path / "copy4"),
                     "--update", "--shard-rows", "16", "--max-result-images", "3", "--batch-size", "4"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "added 0, changed 0, removed 0, unchanged 21" in said
    assert f"updated with the store's own --dataset {data.resolve()} --limit 0 (not given)" in said
    # the report in the bucket says so too, and names the outputs where they are, at the URL (not in the working copy)
    section = json.loads(_files(fs, url)["outputs/report/sections/gallery.js"].decode().split("(", 1)[1][:-3])
    notes = section["summary"]["notes"]
    assert f"updated with the store's own --dataset {data.resolve()} --limit 0 (not given)" in notes
    outputs = section["summary"]["outputs"]
    assert outputs["report"] == f"{url}/outputs/report.html", outputs
    assert outputs and all(v.startswith(url) for v in outputs.values()), outputs
    # a picture search from a fresh working copy, with no model flags: the store's own file (found in ./onnx by its
    # sha256), read once the store is fetched: no note that the default model is used, and the outputs named
    # where they went, at the URL
    import shutil

    (tmp_path / "here" / "onnx").mkdir(parents=True)
    shutil.copy(tiny_onnx, tmp_path / "here" / "onnx" / "kept.onnx")
    monkeypatch.chdir(tmp_path / "here")
    capsys.readouterr()
    picture = next((fresh / "images").iterdir())
    assert cli.main(["--query-image", str(picture), "--output-dir", url, "--work-dir", str(tmp_path / "copy5")]) == 0
    said = capsys.readouterr()
    assert "using the transformers model" not in said.out + said.err
    assert f"results -> {url}/retrieval_results/queries/query_results.csv" in said.out
    import csv
    import io

    sent = list(csv.DictReader(io.StringIO(_files(fs, url)["retrieval_results/queries/query_results.csv"].decode())))
    assert sent[0]["rank"] == "1" and sent[0]["gallery_file"] == picture.name and float(sent[0]["distance"]) < 1e-4


def test_the_neighbour_lists_kept_for_the_next_run_are_never_sent():
    from pipeline.remote import SKIPPED

    for rel in ("retrieval_results/.neighbours.npz", "retrieval_results/segment/.neighbours_segment.npz",
                "retrieval_results/.neighbours.npz.tmp"):
        assert SKIPPED.search(rel), rel
    for rel in ("retrieval_results/neighbours.csv", "embeddings/thumbnails-0123456789abcdef.npy"):
        assert not SKIPPED.search(rel), rel


def test_an_update_signs_again_from_the_images_in_the_bucket(tmp_path, tiny_onnx, s3, capsys):
    """A store at a URL whose photos carry an earlier signature's signals: --update from a fresh
    working copy reads their files from the bucket (its images are not fetched) and signs them again."""
    import csv
    import hashlib
    import io
    import json

    from pipeline.duplicates import SIGNATURE_VERSION

    fs, _ = s3
    cells = [assets.encode(assets.rgb_image(240, 320, seed=i), "JPEG") for i in range(6)]
    cells.append(cells[2])  # an exact copy
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells)
    url = _url()
    assert run(*_args(ds, tiny_onnx, url, tmp_path / "copy1")) == 0
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    lines = list(csv.DictReader(io.StringIO(fs.cat_file(f"{root}/embeddings/manifest.csv").decode())))
    signed = {line["source_row"]: line["look"] for line in lines}
    for line in lines:
        line["look"] = "look-2:" + line["look"].split(":", 1)[1][:108]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(lines[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    fs.pipe_file(f"{root}/embeddings/manifest.csv", text.getvalue().encode())
    meta = json.loads(fs.cat_file(f"{root}/embeddings/embeddings.json"))
    meta["manifest_sha256"] = hashlib.sha256(text.getvalue().encode()).hexdigest()
    fs.pipe_file(f"{root}/embeddings/embeddings.json", json.dumps(meta).encode())
    fs.rm_file(f"{root}/embeddings/metadata.parquet")  # keyed by the manifest: the update writes it again
    capsys.readouterr()
    copy2 = tmp_path / "copy2"
    assert cli.main(["--update", *map(str, _args(ds, tiny_onnx, url, copy2))]) == 0
    said = capsys.readouterr().out
    assert "duplicates: 7 kept items signed again" in said
    assert "duplicates: 2 photos in 1 group (1 exact copy, 0 near)" in said
    assert not list((copy2 / "images").rglob("img_*"))  # read from the bucket, not fetched
    fs.invalidate_cache()
    after = csv.DictReader(io.StringIO(fs.cat_file(f"{root}/embeddings/manifest.csv").decode()))
    assert {line["source_row"]: line["look"] for line in after} == signed
    assert all(look.startswith(SIGNATURE_VERSION + ":") for look in signed.values())


def test_a_working_copy_fetches_what_another_machine_changed_at_the_same_size(tmp_path, s3):
    """Another machine's --update rewrote store files at their sizes (a metadata.parquet with two
    categories swapped): a working copy compared sizes only, kept its stale files and searched them.
    The URL's version of each file (its ETag) when last synced says whether it changed; a change of
    the copy's own not yet sent is kept and sent."""
    from pipeline.remote import RemoteOutput

    fs, _ = s3
    url = _url()
    root = url.removeprefix("s3://")
    fs.pipe_file(f"{root}/embeddings/metadata.parquet", b"dress,shirt")
    copy = RemoteOutput(url, tmp_path / "copy")
    assert copy.fetch() == 1
    local = tmp_path / "copy" / "embeddings" / "metadata.parquet"
    assert local.read_bytes() == b"dress,shirt"
    assert copy.fetch() == 0  # unchanged at the URL: not fetched again
    fs.pipe_file(f"{root}/embeddings/metadata.parquet", b"shirt,dress")  # another machine, the same size
    assert copy.fetch() == 1 and local.read_bytes() == b"shirt,dress"
    local.write_bytes(b"skirt,dress")  # this copy's own change, not sent yet (an upload that failed)
    assert copy.fetch() == 0 and local.read_bytes() == b"skirt,dress"
    assert copy.send() == 1 and fs.cat_file(f"{root}/embeddings/metadata.parquet") == b"skirt,dress"
    assert copy.fetch() == 0  # what it sent is the URL's version it knows
    # a copy synced before versions were recorded ([size, mtime]) fetches each file once, so a change it
    # missed at the same size is not kept stale for good
    import json

    sync = tmp_path / "copy" / ".remote-sync.json"
    sync.write_text(json.dumps({rel: line[:2] for rel, line in json.loads(sync.read_text()).items()}))
    fs.pipe_file(f"{root}/embeddings/metadata.parquet", b"skirt,shirt")
    assert copy.fetch() == 1 and local.read_bytes() == b"skirt,shirt"
    assert copy.fetch() == 0


def test_a_file_sent_to_a_filesystem_of_other_version_forms_is_not_fetched_again(tmp_path):
    """memory:// lists a file's time as a float and gives a datetime on a HEAD: the version is read
    from the listing fetch compares with, so what was just sent is not fetched again."""
    from pipeline.remote import RemoteOutput

    url = f"memory://{secrets.token_hex(4)}/run"
    copy = RemoteOutput(url, tmp_path / "copy")
    (tmp_path / "copy" / "outputs").mkdir(parents=True)
    (tmp_path / "copy" / "outputs" / "report.html").write_text("<p>x</p>")
    assert copy.send() == 1 and copy.fetch() == 0


def test_a_search_at_a_url_without_a_store_is_told_the_url_and_an_export_to_a_url_is_refused(
        tiny_onnx, tmp_path, s3, capsys):
    """The way to a store was named with the working copy's folder (a build there leaves the bucket
    empty); an export target s3://... was made a local folder s3:/... and the run crashed in pyarrow."""
    url = _url()
    assert run("--query-text", "red", "--onnx", tiny_onnx, "--output-dir", url, "--work-dir", tmp_path / "w") == 1
    assert (f"Build it first with a gallery run: python main.py --onnx {tiny_onnx} --work-dir {tmp_path / 'w'} "
            f"--output-dir {url} (plus the --dataset to make it with") in capsys.readouterr().err
    # a store's files without its sidecar (sent last): an upload that stopped, not a store to build again
    fs, _ = s3
    root = url.removeprefix("s3://")
    fs.pipe_file(f"{root}/embeddings/manifest.csv", b"index,file\n")
    fs.pipe_file(f"{root}/embeddings/embeddings.npy", b"\x93NUMPY")
    assert run("--query-text", "red", "--onnx", tiny_onnx, "--output-dir", url, "--work-dir", tmp_path / "w2") == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"The store at {url} has its files but not its embeddings.json, which a run sends last" in said
    assert "Build it first" not in said
    assert run("--export", f"parquet:{url}/export", "--output-dir", url, "--work-dir", tmp_path / "w") == 2
    assert "an export is written to a local folder, not a URL" in capsys.readouterr().err
    assert not (Path.cwd() / "s3:").exists()


def test_pictures_a_run_removes_are_removed_from_the_bucket_too(rows40, tiny_onnx, tmp_path, s3, capsys):
    """--max-result-images 0 after a run that drew every picture: the working copy removed them, the
    bucket kept all 39 (only a store folder's removals were passed on); the summary counts them."""
    fs, _ = s3
    url, work = _url(), tmp_path / "copy"
    assert run(*_args(rows40, tiny_onnx, url, work)) == 3
    drawn = [k for k in _files(fs, url) if k.endswith("_matches.jpg")]
    assert drawn
    capsys.readouterr()
    assert cli.main(["--use-embeddings", *map(str, _args(rows40, tiny_onnx, url, work, "--max-result-images",
                                                          "0"))]) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert re.search(rf"outputs sent to {url} \(\d+ file\(s\), (\d+) removed there; working copy", said), said
    assert int(re.search(r", (\d+) removed there", said).group(1)) >= len(drawn)
    assert not list(work.rglob("*_matches.jpg"))
    assert [k for k in _files(fs, url) if k.endswith("_matches.jpg")] == []
    # what stays is this run's: the bucket's neighbour table holds the working copy's bytes
    assert _files(fs, url)["retrieval_results/neighbours.csv"] == (work / "retrieval_results" / "neighbours.csv"
                                                                  ).read_bytes()


def test_a_builds_failed_upload_says_to_send_it_with_the_cache_flag(rows40, tiny_onnx, tmp_path, monkeypatch,
                                                                      capsys):
    """'run the same command again to send them' embedded every photo again: the store is complete."""
    from pipeline.remote import RemoteOutput

    def send(self):
        raise ConnectionError("network down")

    monkeypatch.setattr(RemoteOutput, "send", send)
    url = f"memory://{secrets.token_hex(4)}/run"
    assert run(*_args(rows40, tiny_onnx, url, tmp_path / "w")) == 1
    said = capsys.readouterr().err
    assert f"uploading to {url} failed (ConnectionError: network down)" in said
    assert "add --use-embeddings to the same command to send them without embedding again" in said
    # the command it says: its check of the store counted the images waiting in the working copy "missing from"
    # the URL, and said to build afresh
    monkeypatch.undo()
    code = run(*_args(rows40, tiny_onnx, url, tmp_path / "w", "--use-embeddings"))
    said = capsys.readouterr().err
    assert code == 3 and "missing" not in said and "Rebuild" not in said, said  # 3: the corrupt row, as built
    import fsspec

    fs = fsspec.filesystem("memory")
    sent = {p.rsplit("/", 1)[1] for p in fs.find(url.removeprefix("memory://") + "/images")}
    local = {p.name for p in (tmp_path / "w" / "images").iterdir()}
    assert len(sent) == 39 and sent == local  # every image reached the URL (the corrupt row has none)
    root = url.removeprefix("memory://") + "/images"
    assert all(fs.cat_file(f"{root}/{name}") == (tmp_path / "w" / "images" / name).read_bytes() for name in local)


def test_a_working_copy_made_before_copies_named_their_url_sends_every_file_to_the_next_one(tmp_path):
    """Its record of what was sent may be another URL's: the first URL that uses it gets every file
    once (files unchanged since were never sent there before), and the copy is that URL's from then on."""
    import json

    from pipeline.remote import COPY_OF_FILE, SYNC_FILE, RemoteOutput

    work = tmp_path / "copy"
    (work / "embeddings").mkdir(parents=True)
    (work / "embeddings" / "manifest.csv").write_text("a\n")
    (work / "outputs").mkdir()
    (work / "outputs" / "duplicates.csv").write_text("b\n")
    stamps = {rel: [(work / rel).stat().st_size, (work / rel).stat().st_mtime_ns, None]
              for rel in ("embeddings/manifest.csv", "outputs/duplicates.csv")}
    (work / SYNC_FILE).write_text(json.dumps(stamps))  # as if sent to another URL
    import fsspec

    target = f"memory://bucket/{tmp_path.name}/run"
    remote = RemoteOutput(target, work)
    remote.fetch()
    assert remote.send() == 2
    memory = fsspec.filesystem("memory")
    assert memory.cat_file(f"/bucket/{tmp_path.name}/run/embeddings/manifest.csv") == b"a\n"
    assert memory.cat_file(f"/bucket/{tmp_path.name}/run/outputs/duplicates.csv") == b"b\n"
    assert (work / COPY_OF_FILE).read_text().strip() == target
    again = RemoteOutput(target, work)
    again.fetch()
    assert again.send() == 0  # once: from then on, what changed


def test_a_runs_outputs_are_named_at_the_url_where_they_were_written_in_its_working_copy(tmp_path, monkeypatch):
    from pipeline.runner import at_url

    work = tmp_path / "copy"
    outputs = {"store": str(work / "embeddings"), "index": f"{work / 'embeddings' / 'index.faiss'} (flat, exact)",
               "copy": str(work), "elsewhere": str(tmp_path / "other" / "x.csv"), "said": "3 groups"}
    assert at_url(outputs, work, "s3://b/run/") == {
        "store": "s3://b/run/embeddings", "index": "s3://b/run/embeddings/index.faiss (flat, exact)",
        "copy": "s3://b/run", "elsewhere": str(tmp_path / "other" / "x.csv"), "said": "3 groups"}
    monkeypatch.chdir(tmp_path)  # a --work-dir given relative, as "copy": its outputs named so too
    assert at_url({"store": "copy/embeddings"}, Path("copy"), "s3://b/run") == {"store": "s3://b/run/embeddings"}
    assert at_url(outputs, work, None) == outputs


def test_cloud_clients_debug_lines_never_reach_the_log(capsys):
    """-v printed botocore's signed request headers (the session token in them, 36 times for one query)
    and, without -v, "Found credentials in environment variables" on every run."""
    import logging

    import main as cli

    try:
        for verbose in (True, False):
            cli.configure_logging(verbose, False)
            for name in ("botocore.endpoint", "aiobotocore.credentials", "botocore.configprovider", "s3transfer"):
                logging.getLogger(name).debug("headers: X-Amz-Security-Token: SECRET")
                logging.getLogger(name).info("Found credentials in environment variables.")
            logging.getLogger("s3fs").info("an s3fs note" if not verbose else "")
            logging.getLogger("pipeline.remote").info("our own line")
            err = capsys.readouterr().err
            assert "SECRET" not in err and "Found credentials" not in err and "an s3fs note" not in err
            assert "our own line" in err  # the pipeline's own lines still come
    finally:
        logging.basicConfig(force=True)  # main's handler writes to the captured stream: not to later tests


def test_a_url_with_or_without_its_trailing_slash_is_one_working_copy_and_catalog_open_says_it_reads_no_url():
    """s3://b/run/ got another working copy than s3://b/run: what one had not sent was never sent by the
    other. Catalog.open("s3://b/run") said "s3:/b/run holds no gallery store: build one first"."""
    from pipeline.catalog import Catalog
    from pipeline.errors import UsageError
    from pipeline.remote import default_work_dir

    assert default_work_dir("s3://bucket/run/") == default_work_dir("s3://bucket/run")
    assert default_work_dir("s3://bucket/run") != default_work_dir("s3://bucket/other")
    with pytest.raises(UsageError) as said:
        Catalog.open("s3://bucket/run")
    assert str(said.value).startswith("s3://bucket/run: Catalog.open reads a store on this machine, not at a URL: "
                                      "search it there with python main.py --output-dir s3://bucket/run")


def test_a_mode_that_only_reads_a_url_needs_no_write_access_and_sends_nothing(rows40, tiny_onnx, tmp_path,
                                                                               monkeypatch, capsys):
    """A serving node's read-only credentials: --serve and --export were refused ("cannot be written:
    PermissionError"), and at their end sent this copy's files over another machine's newer ones."""
    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://{secrets.token_hex(4)}/run"
    assert run(*_args(rows40, tiny_onnx, url, tmp_path / "w")) == 3

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    for method in ("pipe_file", "put_file", "rm_file"):
        monkeypatch.setattr(MemoryFileSystem, method, denied)
    target = tmp_path / "export.parquet"
    capsys.readouterr()
    assert cli.main(["--onnx", str(tiny_onnx), "--output-dir", url, "--work-dir", str(tmp_path / "reader"),
                     "--export", f"parquet:{target}"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"read from {url}, nothing sent there" in said and "outputs sent" not in said
    assert list(target.glob("part_*.parquet"))
    import pyarrow.parquet as pq

    exported = sorted(pq.read_table(target).column("file").to_pylist())  # the store's items, each once
    assert exported == sorted(r.file for r in read_manifest(tmp_path / "reader" / "embeddings" / "manifest.csv")
                              if r.embedding_row >= 0)
    monkeypatch.undo()
    assert run("--query-text", "red", "--onnx", tiny_onnx, "--output-dir", url, "--work-dir",
               tmp_path / "reader") == 0  # a mode that writes: it writes

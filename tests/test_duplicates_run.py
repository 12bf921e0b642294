"""Duplicates in the pipeline: every gallery run writes outputs/duplicates.csv (planted exact and
near copies found, look-alikes and distinct photos not), an update's groups equal a fresh build's,
--dedup shows one photo per group in neighbours, queries and the API, and a store made before the
signals existed says what it left out."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main as cli
import onnx
from benchmarks.duplicates import Garment, _colour_shift, _crop, _resize, catalogue_photo
from pipeline import Catalog
from pipeline.duplicates import SIGNATURE_VERSION
from pipeline.errors import PipelineError
from pipeline.store import MANIFEST_FILE, read_manifest
from tests import assets
from tests.helpers import edit_csv_lines, run

WH = (480, 640)  # JPEGs this large are decoded at 1/2 scale for the 224 px model


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def product(i: int) -> bytes:
    return jpeg(catalogue_photo(i % 3, 100 + i, Garment.of_product(300 + i), WH))


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def with_comment(data: bytes) -> bytes:
    """The same JPEG with a comment segment: other bytes, the same picture."""
    text = b"re-uploaded by the shop"
    return data[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + data[2:]


def catalogue(products: int = 10) -> tuple[list[bytes], dict[str, str]]:
    """Distinct product photos, then planted copies of products 0..3 (each labelled by the copy's
    row): the same bytes, the same pixels as PNG, re-encoded, resized, cropped, colour-shifted, and
    the same JPEG with a comment."""
    cells = [product(i) for i in range(products)]
    rng = np.random.default_rng(7)
    planted = [
        ("exact", 0, cells[0]),
        ("exact", 1, png(decoded(cells[1]))),
        ("near", 2, jpeg(decoded(cells[2]), 70)),
        ("near", 3, jpeg(_resize(decoded(cells[3]), 0.8))),
        ("near", 0, jpeg(_crop(decoded(cells[0]), 0.03, rng))),
        ("near", 1, jpeg(_colour_shift(decoded(cells[1]), 0.04, rng))),
        ("exact", 2, with_comment(cells[2])),
    ]
    kinds = {}
    for kind, of, data in planted:
        kinds[f"{len(cells)}"] = f"{kind} of {of}"
        cells.append(data)
    return cells, kinds


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def groups_by_row(path: Path) -> list[set[int]]:
    groups: dict[str, set[int]] = {}
    for line in read_csv(path):
        groups.setdefault(line["group"], set()).add(int(line["source_row"]))
    return sorted(groups.values(), key=min)


def args(data: Path, onnx: Path, out: Path, *more: object) -> list[object]:
    return ["--dataset", data, "--onnx", onnx, "--output-dir", out, "--limit", "0", "--max-result-images", "0",
            "--shard-rows", "8", "--batch-size", "4", *more]


def test_a_build_finds_the_planted_copies_and_nothing_else(tiny_onnx, tmp_path, capsys):
    cells, _ = catalogue()
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert cli.main([*map(str, args(data, tiny_onnx, out))]) == 0
    lines = read_csv(out / "outputs" / "duplicates.csv")
    assert list(lines[0]) == ["group", "source_row", "file", "kind", "distance", "source", "role", "width", "height",
                              "bytes"]
    assert all(line["source"] == f"{data}[{line['source_row']}]" for line in lines)  # the user's name of the photo
    manifest = {r.file: r for r in read_manifest(out / "embeddings" / "manifest.csv")}
    for line in lines:  # each photo's size as the manifest has it, and its image file's bytes
        row = manifest[line["file"]]
        assert (int(line["width"]), int(line["height"])) == (row.width, row.height) and row.width > 0
        assert int(line["bytes"]) == (out / "images" / line["file"]).stat().st_size
    firsts = [line["role"] for line in lines if line["role"] == "first"]
    assert len(firsts) == len({line["group"] for line in lines})  # one first a group, the others copies
    assert {int(line["source_row"]) for line in lines if line["role"] == "first"} == {0, 1, 2, 3}  # each one's first
    assert all(line["role"] in ("first", "copy") for line in lines)
    assert groups_by_row(out / "outputs" / "duplicates.csv") == [{0, 10, 14}, {1, 11, 15}, {2, 12, 16}, {3, 13}]
    by_row = {int(r["source_row"]): r for r in lines}
    assert by_row[10]["kind"] == "exact" and float(by_row[10]["distance"]) == 0.0  # the same bytes
    assert by_row[16]["kind"] == "exact" and float(by_row[16]["distance"]) == 0.0  # the same picture
    # The JPEG is decoded at the model's reduced scale, its PNG copy in full: a near copy, and close.
    assert by_row[11]["kind"] == "near" and float(by_row[11]["distance"]) <= 0.5
    for row in (12, 13, 14, 15):
        assert by_row[row]["kind"] == "near" and 0.0 < float(by_row[row]["distance"]) <= 1.5
    assert by_row[0]["kind"] == "exact" and by_row[3]["kind"] == "near"  # does the group hold its pixels?
    manifest = {r.source_row: r for r in read_manifest(out / "embeddings" / MANIFEST_FILE)}
    assert all(by_row[k]["file"] == manifest[k].file for k in by_row)  # the CSV names the gallery's files
    assert manifest[0].pixel_hash == manifest[10].pixel_hash and manifest[0].file == manifest[10].file  # one file
    assert manifest[1].pixel_hash != manifest[11].pixel_hash
    said = capsys.readouterr().out
    assert "duplicates: 11 photos in 4 groups (2 exact copies, 5 near)" in said
    # a build's summary names the model that made the vectors, as the ONNX file records it, and how it ran
    made = {p.key: p.value for p in onnx.load(str(tiny_onnx), load_external_data=False).metadata_props}
    source, precision = made["fashion_pipeline.source_model"], made["fashion_pipeline.precision"]
    assert f"\nmodel:    {source} (onnx, onnx-{precision}), {tiny_onnx}\n" in said  # and the file that ran
    report = (out / "outputs" / "report" / "sections" / "gallery.js").read_text()
    assert '"duplicates":{"groups":4,"photos":11,"csv":"duplicates.csv"' in report


def test_equal_photos_share_one_file_and_one_result_picture(tiny_onnx, tmp_path, capsys):
    cells, _ = catalogue()
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--max-result-images", "100"))]) == 0
    said = capsys.readouterr().out
    rows = [r for r in read_manifest(out / "embeddings" / MANIFEST_FILE) if r.embedding_row >= 0]
    names = {r.file for r in rows}
    assert len(rows) == 17 and len(names) == 16  # rows 0 and 10 hold the same bytes
    assert {p.name for p in (out / "images").iterdir()} == names
    pictures = {p.name for p in (out / "retrieval_results").glob("*_matches.jpg")}
    assert pictures == {f"{Path(f).stem}_matches.jpg" for f in names}
    assert "16 result pictures for 17 items: items with equal bytes share one file, and so one picture" in said
    assert "unchanged since the last run kept" not in said
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--max-result-images", "100", "--use-embeddings"))]) == 0
    assert "result pictures: 0 drawn, 16 unchanged since the last run kept" in capsys.readouterr().out
    cat = Catalog.open(out)
    shared = next(r for r in rows if r.source_row == 0)
    with pytest.raises(PipelineError, match=r"is the file of 2 items with the same bytes \(rows 0, 10\): ask for one"):
        cat.neighbours(shared.file)
    hits = cat.neighbours(shared.embedding_row, k=3)
    assert hits[0].source_row == 10 and hits[0].file == shared.file and hits[0].distance < 1e-6  # its copy first


def neighbour_lists(out: Path) -> dict[tuple[str, str], list[str]]:
    """(query line, query file) -> neighbour files (copies of equal bytes share a file, not a line)."""
    table: dict[tuple[str, str], list[str]] = {}
    for line in read_csv(out / "retrieval_results" / "neighbours.csv"):
        table.setdefault((line["query"], line["query_file"]), []).append(line["neighbour_file"])
    return table


def test_dedup_shows_one_photo_per_group(tiny_onnx, tmp_path, capsys):
    cells, _ = catalogue()
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out, "--top-k", "6")) == 0
    plain = neighbour_lists(out)
    group_of = {}
    for line in read_csv(out / "outputs" / "duplicates.csv"):
        group_of[line["file"]] = line["group"]
    assert any(len({group_of.get(f, f) for f in nb}) < len(nb) for nb in plain.values())  # copies crowd them

    assert run(*args(data, tiny_onnx, out, "--top-k", "6", "--use-embeddings", "--dedup")) == 0
    deduped = neighbour_lists(out)
    assert deduped.keys() == plain.keys()
    for (_, query), nb in deduped.items():
        assert len(nb) == 6  # filled up to k from further down
        groups = [group_of.get(f, f) for f in nb]
        assert len(set(groups)) == len(groups)
        assert group_of.get(query, query) not in groups  # a photo's own copies are not its neighbours

    query = tmp_path / "copy.jpg"
    query.write_bytes(cells[0])
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--query-image", query, "--top-k", "5", "--dedup"))]) == 0
    found = [line["gallery_file"] for line in read_csv(out / "retrieval_results" / "queries" / "query_results.csv")]
    assert len(found) == 5 and len({group_of.get(f, f) for f in found}) == 5
    # said, with the groups it folds (as a gallery run says it)
    assert "--dedup: each duplicate group stands once in the results (11 photos in 4 groups)" in " ".join(
        capsys.readouterr().out.split())

    cat = Catalog.open(out, dedup=True)
    hits = cat.neighbours(0, k=15)  # row 0: its file is also row 10's (the same bytes)
    assert len(hits) == 9  # 17 photos in 10 groups or singles: all but the photo's own group
    shown = [group_of.get(h.file, h.file) for h in hits]
    assert len(set(shown)) == len(shown)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    assert [[r.source_row for r in g] for g in cat.duplicates()] == [[0, 10, 14], [1, 11, 15], [2, 12, 16], [3, 13]]
    hits = cat.search_vectors(cat.embeddings[[0]], k=15)[0]
    assert len(hits) == 10 and hits[0].source_row in (0, 10)  # an exact copy ties with the photo itself


def test_an_update_finds_the_groups_a_fresh_build_finds(tiny_onnx, tmp_path):
    cells, _ = catalogue()
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out, fresh = tmp_path / "updated", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    # Product 0's original goes (its two copies stay a group), product 2's re-encoded copy goes (no
    # group left), and a resized copy of product 5 arrives before its original's row.
    rng = np.random.default_rng(3)
    after = [cells[i] for i in range(len(cells)) if i not in (0, 12)]
    after.insert(2, jpeg(_crop(_resize(decoded(cells[5]), 0.9), 0.02, rng)))
    assets.write_parquet_dataset(tmp_path / "catalogue", after)
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert run(*args(data, tiny_onnx, fresh)) == 0
    updated_csv = (out / "outputs" / "duplicates.csv").read_text()
    assert updated_csv == (fresh / "outputs" / "duplicates.csv").read_text()
    # rows after the update: 0 product 1, 1 product 2, 2 the new copy of 5, 3..9 products 3..9, then
    # the copies: 10 exact of 0, 11 PNG of 1, 12 resized 3, 13 cropped 0, 14 colour-shifted 1, 15 of 2
    assert groups_by_row(out / "outputs" / "duplicates.csv") == [{0, 11, 14}, {1, 15}, {2, 5}, {3, 12}, {10, 13}]


def test_a_store_without_signals_says_what_it_left_out(tiny_onnx, tmp_path, capsys):
    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    manifest = out / "embeddings" / MANIFEST_FILE
    with open(manifest, newline="") as f:
        lines = list(csv.reader(f))
    with open(manifest, "w", newline="") as f:  # as a store made before duplicates wrote it
        csv.writer(f, lineterminator="\n").writerows(line[:-2] for line in lines)
    sidecar = out / "embeddings" / "embeddings.json"
    meta = json.loads(sidecar.read_text())
    meta["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))
    (out / "embeddings" / "metadata.parquet").unlink(missing_ok=True)  # such a store kept no metadata either
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--use-embeddings"))]) == 0
    said = capsys.readouterr().out
    assert (f"duplicates: 11 items have no duplicate signals of this version ({SIGNATURE_VERSION}) and were left out: "
            "--update signs again, from their files and with no inference, those of a store made before") in said
    assert read_csv(out / "outputs" / "duplicates.csv") == []


def signed_before(out: Path, earlier: int, edit_sidecar=None) -> None:
    """Rewrite a store as if signed by the signature before this one (its first `earlier` lines) and
    made before duplicates were found (the others), its sidecar and metadata made to match."""

    def edit(lines: list[dict]) -> None:
        for line in lines[:earlier]:
            line["look"] = "look-2:" + line["look"].split(":", 1)[1][:108]
        for line in lines[earlier:]:
            line["look"] = line["pixel_hash"] = ""

    rewrite_lines(out, edit, edit_sidecar)


def signed_earlier(out: Path, rows: range) -> None:
    """Rewrite the store's lines of these dataset rows as signed by an earlier signature (look-2)."""

    def edit(lines: list[dict]) -> None:
        for line in lines:
            if int(line["source_row"]) in rows:
                line["look"] = "look-2:" + line["look"].split(":", 1)[1]

    rewrite_lines(out, edit)


def rewrite_lines(out: Path, edit, edit_sidecar=None) -> None:
    """The store's manifest lines changed by edit(lines), its sidecar made to match (edit_sidecar(meta)
    after) and its metadata dropped (keyed by the manifest: written again by the next build or update)."""
    manifest_sha256 = edit_csv_lines(out / "embeddings" / MANIFEST_FILE, edit)
    sidecar = out / "embeddings" / "embeddings.json"
    meta = json.loads(sidecar.read_text())
    meta["manifest_sha256"] = manifest_sha256
    if edit_sidecar is not None:
        edit_sidecar(meta)
    sidecar.write_text(json.dumps(meta))
    (out / "embeddings" / "metadata.parquet").unlink(missing_ok=True)


def store_signals(store: Path) -> dict[int, tuple[str, str]]:
    return {r.source_row: (r.pixel_hash, r.look) for r in read_manifest(store / "embeddings" / MANIFEST_FILE)}


def test_an_update_signs_again_the_photos_of_an_earlier_signature(tiny_onnx, tmp_path, capsys):
    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert run(*args(data, tiny_onnx, out)) == 0
    signed_before(out, earlier=7)
    vectors = (out / "embeddings" / "embeddings.npy").read_bytes()
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--use-embeddings"))]) == 0
    assert "duplicates: 11 items have no duplicate signals of this version" in capsys.readouterr().out
    assert read_csv(out / "outputs" / "duplicates.csv") == []
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = capsys.readouterr().out
    assert "duplicates: 11 kept items signed again" in said and "nothing embedded again" in said
    assert "added 0, changed 0, removed 0, unchanged 11" in said
    # every line signed as a fresh build signs it, the vectors untouched, and the same groups found
    signals = store_signals(out)
    assert signals == store_signals(fresh)
    assert all(look.startswith(SIGNATURE_VERSION + ":") for _, look in signals.values())
    assert (out / "embeddings" / "embeddings.npy").read_bytes() == vectors
    assert (out / "outputs" / "duplicates.csv").read_text() == (fresh / "outputs" / "duplicates.csv").read_text()
    assert groups_by_row(out / "outputs" / "duplicates.csv") == [{0, 4, 8}, {1, 5, 9}, {2, 6, 10}, {3, 7}]
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0  # once: nothing left to sign
    said = capsys.readouterr().out
    assert "signed again" not in said


def test_an_interrupted_update_keeps_what_it_signed(tiny_onnx, tmp_path, monkeypatch, capsys):
    """Signing a large store again takes long: an update stopped while it signs (Ctrl-C on the
    fifth file) keeps what it signed, and the next run decodes only the rest, each file once however
    many lines share it (rows 0 and 4 are the same bytes: one file), then finishes as a fresh build."""
    from pipeline import update

    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run(*args(data, tiny_onnx, out)) == 0
    signed_before(out, earlier=11)
    files = {r.file for r in read_manifest(out / "embeddings" / MANIFEST_FILE)}
    assert len(files) == 10
    assets.write_parquet_dataset(tmp_path / "catalogue", [*cells, product(9)])  # and a new photo to embed
    decoded: list[str] = []
    real = update.file_signals

    def counted(name, data, min_side):
        decoded.append(hashlib.sha256(data).hexdigest())
        if len(decoded) == 5:
            raise KeyboardInterrupt
        return real(name, data, min_side)

    monkeypatch.setattr(update, "file_signals", counted)
    monkeypatch.setattr(update, "available_cores", lambda: 1)  # one thread: the fifth file is the fifth signed
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update", "-q", "--threads", "1"))]) == 130
    log = (out / "embeddings" / ".update" / update.SIGNED_LOG.format(version=SIGNATURE_VERSION)).read_text()
    logged = [json.loads(line)[0] for line in log.splitlines()[1:]]
    assert len(logged) == 4 and set(logged) <= files
    decoded.clear()
    monkeypatch.setattr(update, "file_signals",
                        lambda name, data, min_side: decoded.append(1) or real(name, data, min_side))
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = capsys.readouterr().out
    assert len(decoded) == 10 - 4  # the rest, once each
    assert "duplicates: 11 kept items signed again" in said and "added 1" in said
    assert run(*args(data, tiny_onnx, fresh)) == 0
    assert store_signals(out) == store_signals(fresh)
    assert not (out / "embeddings" / ".update").exists()  # the log went with the staging folder


def signed_before_with_file_of(tiny_onnx, tmp_path: Path, row: int) -> tuple[Path, Path, str]:
    """A catalogue's store as the signature before this one signed it: (dataset, output folder, the
    gallery file of dataset row `row`)."""
    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    signed_before(out, earlier=11)
    return data, out, next(r.file for r in read_manifest(out / "embeddings" / MANIFEST_FILE) if r.source_row == row)


def test_a_kept_photo_that_cannot_be_read_is_left_out_and_said(tiny_onnx, tmp_path, monkeypatch, capsys):
    """Any error while a file is read or decoded (a remote store's client raises its own types; here
    one raised where the file is decoded), not only a picture that does not decode, is that photo's:
    recorded under the name the user knows it by, and the update goes on."""
    from pipeline import update

    data, out, broken = signed_before_with_file_of(tiny_onnx, tmp_path, row=2)
    real = update.file_signals

    def failing(name, data, min_side):
        if hashlib.sha256(data).hexdigest()[:16] == broken.split("_")[1].split(".")[0]:
            raise RuntimeError("the bucket said no")
        return real(name, data, min_side)

    monkeypatch.setattr(update, "file_signals", failing)
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = capsys.readouterr().out
    assert ("duplicates: 1 kept item could not be signed again and is left out of duplicate finding: "
            f"{data}[2] ({broken}): the bucket said no") in said
    assert "duplicates: 10 kept items signed again" in said


def test_a_kept_photo_that_cannot_be_decoded_is_left_out_and_said(tiny_onnx, tmp_path, capsys):
    data, out, broken = signed_before_with_file_of(tiny_onnx, tmp_path, row=3)
    path = out / "images" / broken
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)  # the same size and time: trusted by the store's check, not a picture
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = capsys.readouterr().out
    assert "duplicates: 10 kept items signed again" in said
    assert (f"duplicates: 1 kept item could not be signed again and is left out of duplicate finding: {data}[3] "
            f"({broken}): "
            in said)
    looks = {row: look for row, (_, look) in store_signals(out).items()}
    assert looks[3].startswith("look-2:")  # as it was
    assert all(look.startswith(SIGNATURE_VERSION + ":") for row, look in looks.items() if row != 3)
    assert "duplicates: 1 item has no duplicate signals of this version" in said


def test_a_store_that_records_no_preprocessing_is_not_signed_again(tiny_onnx, tmp_path, capsys):
    """Without the store's preprocessing, its JPEGs' reduced decode (and so their signals) cannot be
    a build's: the photos stay out, said, and nothing else changes."""
    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0

    def unrecorded(meta: dict) -> None:
        meta["identity"].pop("preprocess")

    signed_before(out, earlier=11, edit_sidecar=unrecorded)
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0
    said = capsys.readouterr().out
    assert ("duplicates: 11 kept items without signals of this version are left out of duplicate finding: the "
            "store records no preprocessing, so they cannot be decoded as a build decodes them; build afresh") in said
    assert all(look.startswith("look-2:") for _, look in store_signals(out).values())


def test_the_report_shows_a_dozen_photos_of_a_large_group_and_says_how_many_more(tiny_onnx, tmp_path, browser):
    """A placeholder picture re-encoded 20 times: its group lists 12 photos and says the 8 others are in
    the CSV (a catalogue's placeholder group may hold thousands), and loads only their data pages."""
    from tests.test_webreport import console_errors, wait

    placeholder = decoded(product(0))
    cells = [jpeg(placeholder, quality) for quality in range(60, 100, 2)] + [product(i) for i in range(1, 5)]
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert cli.main([*map(str, args(data, tiny_onnx, out))]) == 0
    assert groups_by_row(out / "outputs" / "duplicates.csv") == [set(range(20))]
    browser.get((out / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelectorAll('.dupgroup .tile').length > 0")
    tiles = browser.execute_script("return document.querySelectorAll('.dupgroup .tile').length")
    more = browser.execute_script("return document.querySelector('.dupgroup .more').textContent")
    assert tiles == 12 and more == "+ 8 more photos in the CSV"
    # numbered as the CSV numbers it (from 0), the number beside the tiles, not one of them when they wrap
    num = browser.execute_script("const n = document.querySelector('.dupgroup .num'); return [n.textContent, n.title,"
                                 " n.getBoundingClientRect().right, Math.min(...[...document.querySelectorAll("
                                 "'.dupgroup .tile')].map(t => t.getBoundingClientRect().left))]")
    assert num[0] == "0" and num[1] == "group 0 in duplicates.csv" and num[2] <= num[3]
    wait(browser, "[...document.querySelectorAll('.dupgroup [data-file]')].every(c => c.textContent)")
    # each photo's size under it, as the CSV has it (which to keep: the first is the dataset's first)
    sizes = browser.execute_script("return [...document.querySelectorAll('.dupgroup [data-role=size]')]"
                                   ".map(c => c.textContent)")
    with open(out / "outputs" / "duplicates.csv", newline="") as f:
        listed = [f"{r['width']}×{r['height']}" for r in csv.DictReader(f)][:12]
    assert sizes == listed and all(s != "0×0" for s in sizes)
    # names cut alike in the middle are cut from where they part (a shop's SKU mid-name)
    cuts = browser.execute_script("return distinctCuts(arguments[0], 17)",
                                  ["women-dresses-midi-SKU104233-front.jpg", "women-dresses-midi-SKU209911-front.jpg"])
    assert len(set(cuts)) == 2 and all(len(c) <= 17 for c in cuts), cuts
    assert browser.execute_script("return distinctCuts(['a.jpg', 'b.jpg'], 17)") == ["a.jpg", "b.jpg"]
    same = browser.execute_script("return distinctCuts(['shop-a-very-long-name-front.jpg', "
                                  "'shop-a-very-long-name-front.jpg'], 17)")  # one name in two folders: as it is
    assert same[0] == same[1] and same[0].startswith("shop-a-v")
    three = browser.execute_script("return distinctCuts(arguments[0], 17)", [
        "a.jpg", "women-dresses-midi-SKU104233-front.jpg", "women-dresses-midi-SKU209911-front.jpg"])
    assert three[0] == "a.jpg" and len(set(three[1:])) == 2 and all(len(c) <= 17 for c in three)  # only those alike
    browser.save_screenshot(str(tmp_path / "dups.png"))
    assert console_errors(browser) == []


def test_photos_of_an_earlier_signature_are_said_not_checked(tiny_onnx, tmp_path, capsys, caplog, browser):
    """Photos whose signals are of an earlier signature are compared with nothing: the report says
    how many were not checked, not "no copies found", and --dedup (a query, Catalog.open) warns
    that their copies may each show, naming --update. Three of them beside signed ones: the groups
    of the others shown, and the three said."""
    import logging

    from pipeline import duplicates as dup_module
    from tests.test_webreport import console_errors, wait

    cells, _ = catalogue(products=4)
    data = assets.write_parquet_dataset(tmp_path / "catalogue", cells)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    signed_before(out, earlier=11)
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--use-embeddings"))]) == 0
    report = (out / "outputs" / "report.html").as_uri()
    browser.get(report)
    wait(browser, "document.querySelector('[data-role=unchecked]')")
    said = browser.execute_script("return document.querySelector('[data-role=unchecked]').textContent")
    assert said == (f"11 photos not checked: their duplicate signals are not of this version ({SIGNATURE_VERSION}). "
                    "--update signs them again where it can, from their files and with no inference.")
    browser.execute_script("document.querySelector('[data-role=unchecked]').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "all_unchecked.png"))
    shown = browser.execute_script("return [...document.querySelectorAll('p.empty')].map(p => p.textContent)")
    assert not [p for p in shown if "No exact or near copies" in p]

    query = tmp_path / "copy.jpg"
    query.write_bytes(cells[0])
    capsys.readouterr()
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--query-image", query, "--top-k", "3", "--dedup"))]) == 0
    warned = (f"duplicates: 11 of the store's 11 items have no duplicate signals of this version "
              f"({SIGNATURE_VERSION}): they are in no group, so --dedup may show each of their copies; --update signs "
              "them again where it can")
    assert warned in capsys.readouterr().err
    logging.getLogger().addHandler(caplog.handler)  # the CLI's logging setup (force=True) removed it
    dup_module._WARNED.clear()  # said once a process: this one said it for the query above
    with caplog.at_level(logging.WARNING, logger="pipeline.duplicates"):
        cat = Catalog.open(out, dedup=True)
        cat.duplicates()
        cat.close()
    logging.getLogger().removeHandler(caplog.handler)
    assert caplog.text.count(warned) == 1  # once for this version of the store, however often its groups are read

    assert cli.main([*map(str, args(data, tiny_onnx, out, "--update"))]) == 0  # all signed again
    signed_earlier(out, rows=range(8, 11))  # a copy each of products 0, 1 and 2
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--use-embeddings"))]) == 0
    assert groups_by_row(out / "outputs" / "duplicates.csv") == [{0, 4}, {1, 5}, {2, 6}, {3, 7}]
    browser.get(report)
    wait(browser, "document.querySelector('.dupgroup') && document.querySelector('[data-role=unchecked]')")
    said = browser.execute_script("return document.querySelector('[data-role=duplicate-groups] [data-role=unchecked]')"
                                  ".textContent")
    assert said.startswith("3 photos not checked: their duplicate signals are not of this version")
    browser.execute_script("document.querySelector('[data-role=duplicate-groups]').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "unchecked.png"))
    assert console_errors(browser) == []

    signed_earlier(out, rows=range(4, 11))  # every copy: the 4 photos checked are 4 products
    assert cli.main([*map(str, args(data, tiny_onnx, out, "--use-embeddings"))]) == 0
    assert read_csv(out / "outputs" / "duplicates.csv") == []
    browser.get(report)
    wait(browser, "document.querySelector('[data-role=unchecked]')")
    shown = browser.execute_script("return [...document.querySelectorAll('p.empty')].map(p => p.textContent)")
    assert shown[:2] == ["No exact or near copies found among the 4 photos checked (duplicates.csv).",
                         "7 photos not checked: their duplicate signals are not of this version "
                         f"({SIGNATURE_VERSION}). --update signs them again where it can, from their files and with no "
                         "inference."]
    assert console_errors(browser) == []


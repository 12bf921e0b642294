"""The public API (pipeline.Catalog) and the one searcher under it: typed hits that agree with the CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline import Catalog, Hit
from pipeline.errors import CacheMismatchError, PipelineError
from pipeline.searcher import Searcher, query_crops
from pipeline.store import ManifestRow
from tests import assets
from tests.helpers import file_of


def _rows(n: int) -> list[ManifestRow]:
    return [ManifestRow(index=10 + i, file=f"img_{i:05d}.jpg", source_row=i, source=str(i), embedding_row=i)
            for i in range(n)]


def test_searcher_hits_name_row_line_and_file_and_agree_with_exact_search():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    s = Searcher(emb, _rows(40))
    hits = s.search(emb[[3, 7]], 4)
    sims = emb[[3, 7]] @ emb.T
    for q, found in zip((3, 7), hits):
        assert [h.rank for h in found] == [1, 2, 3, 4]
        assert found[0].row == q and found[0].distance == pytest.approx(0.0, abs=1e-6)
        truth = np.argsort(-sims[[3, 7].index(q)], kind="stable")[:4]
        assert [h.row for h in found] == list(truth)
        assert all(h.line == 10 + h.row and h.file == f"img_{h.row:05d}.jpg" and h.source_row == h.row
                   and h.source == str(h.row) for h in found)
    # all_neighbours never returns an item itself
    nb = s.all_neighbours(3)
    assert (nb.indices != np.arange(40)[:, None]).all()
    with pytest.raises(ValueError, match="3 manifest lines for 40 vectors"):
        Searcher(emb, _rows(3))


def test_query_crops_cut_each_person_or_keep_the_whole_picture():
    from pipeline.persons import Person, Segmenter

    class TwoPersons(Segmenter):
        def segment(self, images_rgb):
            return [[Person(np.array([0, 0, 10, 20], np.float32), 0.9),
                     Person(np.array([12, 2, 30, 38], np.float32), 0.8)] for _ in images_rgb]

    picture = assets.rgb_image(40, 40, seed=3)
    crops, found = query_crops(picture, "a.jpg", TwoPersons())
    assert found and [c.label for c in crops] == ["a.jpg#p0", "a.jpg#p1"]
    assert [c.image.size for c in crops] == [(10, 20), (18, 36)]
    assert np.array_equal(np.asarray(crops[1].image), np.asarray(picture)[2:38, 12:30])
    whole, found = query_crops(picture, "a.jpg", None)
    assert not found and whole[0].label == "a.jpg" and whole[0].image is picture


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip):
    """A standard gallery of 12 pictures built by the CLI with the torch backend."""
    tmp = tmp_path_factory.mktemp("catalog")
    ds = assets.write_parquet_dataset(tmp / "ds", [assets.jpeg_bytes(60 + 3 * i, 80, seed=i) for i in range(12)])
    out = tmp / "out"
    assert cli.main(["--dataset", str(ds), "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    return out, ds


def test_catalog_takes_a_models_short_name_as_model_does(built, tiny_clip, monkeypatch):
    """model="marqo-fashionsiglip" names the model as --model does (backends.MODELS); here a short
    name registered for the tiny model, so that nothing is asked of the hub."""
    from pipeline import backends

    out, _ = built
    monkeypatch.setitem(backends.MODELS, "tiny-test", str(tiny_clip))
    cat = Catalog.open(out, model="tiny-test")
    assert cat.search_text("a red dress", k=3)[0].rank == 1
    by_path = Catalog.open(out, model=str(tiny_clip)).search_text("a red dress", k=3)
    assert [h.row for h in cat.search_text("a red dress", k=3)] == [h.row for h in by_path]


def test_catalog_answers_as_the_cli_does(built, tiny_clip, tmp_path):
    out, _ = built
    cat = Catalog.open(out, model=str(tiny_clip))  # a run's folder: its embeddings/
    assert len(cat) == 12 and cat.cache.root == out / "embeddings"
    # an item's neighbours equal the gallery run's neighbours.csv
    four, seven = file_of(out, 4), file_of(out, 7)
    with open(out / "retrieval_results" / "neighbours.csv") as f:
        table = [r for r in csv.DictReader(f) if r["query_file"] == four]
    hits = cat.neighbours(four, k=5)
    assert [h.file for h in hits] == [r["neighbour_file"] for r in table]
    assert [round(h.distance, 6) for h in hits] == [float(r["distance"]) for r in table]
    assert all(isinstance(h, Hit) and h.file != four for h in hits)
    assert cat.neighbours(4, k=5) == hits
    # a picture of the gallery finds itself first; a text query returns k typed hits
    picture = out / "images" / seven
    result = cat.search_image(picture, k=3)
    assert len(result) == 1 and result[0].label == seven
    assert result[0].hits[0].file == seven and result[0].hits[0].distance < 1e-4
    assert cat.search_image(picture.read_bytes(), k=3)[0].hits == result[0].hits
    text = cat.search_text("red dress", k=4)
    assert [h.rank for h in text] == [1, 2, 3, 4]
    # the same text through the CLI gives the same files and distances
    assert cli.main(["--query-text", "red dress", "--model", str(tiny_clip), "--backend", "torch", "--output-dir",
                     str(out), "--top-k", "4", "-q"]) == 0
    with open(out / "retrieval_results" / "queries" / "query_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["gallery_file"] for r in rows] == [h.file for h in text]
    assert [float(r["distance"]) for r in rows] == [round(h.distance, 6) for h in text]
    by_vector = cat.search_vectors(cat.embeddings[7], k=1)
    assert by_vector[0][0].row == 7 and by_vector[0][0].file == seven


def test_a_search_mode_without_model_flags_asks_with_the_stores_own_model(built, tiny_clip, capsys):
    """--query-text on a store built with another --model than the default, no model flag given:
    the model the store records answers (as Catalog.open takes it), not the default hub model,
    which offline failed with the hub's error instead."""
    out, _ = built
    capsys.readouterr()
    assert cli.main(["--query-text", "red dress", "--output-dir", str(out), "--top-k", "4"]) == 0
    with open(out / "retrieval_results" / "queries" / "query_results.csv") as f:
        rows = list(csv.DictReader(f))
    expected = Catalog.open(out).search_text("red dress", k=4)
    assert [r["gallery_file"] for r in rows] == [h.file for h in expected]
    # the console says the best matches too, by the names the user knows, with their distances
    said = next(line for line in capsys.readouterr().out.splitlines() if "red dress: " in line)
    shown = re.fullmatch(r".*red dress: (.+) (\d\.\d{3}), (.+) (\d\.\d{3}), (.+) (\d\.\d{3})", said)
    assert shown is not None, said
    assert list(shown.groups()[::2]) == [h.shown_name for h in expected[:3]]
    assert [float(d) for d in shown.groups()[1::2]] == pytest.approx([h.distance for h in expected[:3]], abs=2e-3)


def test_update_cache_and_export_without_model_flags_go_on_with_the_stores_own_model(tiny_clip, tmp_path, capsys):
    """No --model, --onnx or --backend on a store another model made: --update embeds its new photos
    with that model (the default hub model failed offline; with the hub it was refused), a gallery
    run from the cache and --export load nothing; none says it falls back to the transformers model."""
    cells = [assets.jpeg_bytes(60 + 3 * i, 80, seed=40 + i) for i in range(8)]
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(assets.write_parquet_dataset(tmp_path / "ds", cells[:6])), "--model",
                     str(tiny_clip), "--backend", "torch", "--output-dir", str(out), "--max-result-images", "0",
                     "-q"]) == 0
    grown = assets.write_parquet_dataset(tmp_path / "ds", cells)  # two photos more
    capsys.readouterr()
    assert cli.main(["--dataset", str(grown), "--update", "--output-dir", str(out), "--max-result-images", "0"]) == 0
    said = capsys.readouterr()
    assert "added 2, changed 0, removed 0, unchanged 6" in said.out
    cat = Catalog.open(out)
    assert len(cat) == 8
    for new in (6, 7):  # the new photos' vectors are the store's model's
        assert cat.search_image(cells[new], k=1)[0].hits[0].distance < 1e-4
    assert cli.main(["--use-embeddings", "--output-dir", str(out), "--max-result-images", "0"]) == 0
    cached = capsys.readouterr()
    assert "heatmap ->" in cached.out and "result pictures ->" not in cached.out  # none written: none listed
    assert cli.main(["--export", f"parquet:{tmp_path / 'shop.parquet'}", "--output-dir", str(out)]) == 0
    said = capsys.readouterr()
    assert "using the transformers model" not in said.out + said.err + cached.out + cached.err


def test_every_file_a_run_writes_has_the_mode_open_gives_it(built, tmp_path):
    """Files moved into place from temp files (the store, the images, the report, an export's record)
    are readable as the umask allows, as any file open() makes, not mkstemp's owner-only 0600: a web
    server or a Catalog run by another account reads the store."""
    import os

    from pipeline.fileio import atomic_write_bytes

    out, _ = built
    assert cli.main(["--export", f"parquet:{tmp_path / 'shop.parquet'}", "--output-dir", str(out), "-q"]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    written = [p for root in (out, tmp_path / "shop.parquet") for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.name == "_fashion_export.json" for p in written)
    assert {str(p.relative_to(p.parents[1])): oct(p.stat().st_mode & 0o777) for p in written
            if p.stat().st_mode & 0o777 != 0o666 & ~mask} == {}
    for umask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):  # the umask of the moment, the kernel's
        old = os.umask(umask)
        try:
            atomic_write_bytes(tmp_path / f"f{umask:o}", b"x")
        finally:
            os.umask(old)
        assert (tmp_path / f"f{umask:o}").stat().st_mode & 0o777 == mode


def test_catalog_refuses_what_does_not_fit(built, tmp_path):
    out, _ = built
    with pytest.raises(PipelineError, match="holds no gallery store"):
        Catalog.open(tmp_path)
    other = assets.save_tiny_clip(tmp_path / "other-clip", seed=5)
    cat = Catalog.open(out / "embeddings", model=str(other))
    with pytest.raises(CacheMismatchError, match="made by another embedder"):
        cat.search_text("red dress")
    cat = Catalog.open(out / "embeddings", model=str(other))
    with pytest.raises(PipelineError, match="no item named 'nope.jpg'"):
        cat.neighbours("nope.jpg")
    with pytest.raises(PipelineError, match="the store has rows 0..11"):
        cat.neighbours(12)
    with pytest.raises(PipelineError, match=r"query vectors must be of shape \(16,\) or \(Q, 16\), as the store's; "
                                            r"got \(3,\)"):
        cat.search_vectors(np.ones(3, np.float32))
    with pytest.raises(PipelineError, match=r"got \(1, 1, 16\)"):
        cat.search_vectors(cat.embeddings[None, :1])
    broken = cat.embeddings[:3].copy()
    broken[1, 4] = np.nan
    with pytest.raises(PipelineError, match=r"query vector\(s\) \[1\] hold NaN or infinite values"):
        cat.search_vectors(broken, filter=None)
    # another length than 1: its distances would mean nothing (and clip at 0); zero is near nothing
    scaled = np.stack([cat.embeddings[0], cat.embeddings[3] * 10, np.zeros(16, np.float32)])
    with pytest.raises(PipelineError, match=r"L2-normalized.*vector\(s\) 1 \(10\), 2 \(0\) have another length"):
        cat.search_vectors(scaled)
    assert cat.search_vectors(cat.embeddings[3] * np.float32(1.0004), k=1)[0][0].row == 3  # float rounding passes
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="search_text takes one text, got a list"):
        cat.search_text(["red", "blue"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="is a folder: search_image takes one picture"):
        cat.search_image(tmp_path)
    # a picture of another type, an empty one, a damaged file opened lazily: said as such (not a numpy
    # truth-value error, a ZeroDivisionError, a bare OSError)
    with pytest.raises(UsageError, match=r"a file's path, its bytes or a PIL image, not a ndarray \(Image.fromarray"):
        cat.search_image(np.zeros((8, 8, 3), np.uint8))  # type: ignore[arg-type]
    from PIL import Image

    from pipeline.images import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="the picture is 0x0: nothing to search with"):
        cat.search_image(Image.new("RGB", (0, 0)))
    cut = tmp_path / "cut.jpg"
    whole = assets.jpeg_bytes(64, 64)
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # its header whole: opened, then damaged when decoded
    with Image.open(cut) as lazy, pytest.raises(ImageDecodeError, match="the picture cannot be decoded"):
        cat.search_image(lazy)
    with pytest.raises(PipelineError, match="an item is asked for by its row"):
        cat.neighbours(True)  # type: ignore[arg-type]

    for k in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="a whole number of at least 1, got"):
            cat.search_vectors(cat.embeddings[0], k=k)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="got -1"):
        cat.neighbours(0, k=-1)
    # open's own arguments: refused at open, not taken silently (index="hnsw" searched with the stored
    # index whatever its kind) or by the first query (threads=-1)
    for bad, said in (({"index": "hnsw"}, "index='hnsw': 'auto' searches with the index beside the store"),
                      ({"device": "gpu"}, "device='gpu': choose from auto, "),
                      ({"threads": -1}, "threads=-1: a whole number, 0 for every core")):
        with pytest.raises(UsageError, match=re.escape(said)):
            Catalog.open(out, **bad)  # type: ignore[arg-type]
    grouped = Catalog.open(out, model=str(other), group_by="")  # "" is each photo, as a query's group_by=""
    assert len(grouped.search_vectors(cat.embeddings[0], k=12)[0]) == 12


def test_a_service_tells_a_requests_fault_from_its_own_by_the_class(built, tiny_clip):
    """A Path as model= failed at the first query with an AttributeError (a 500); a wrong argument was
    a TypeError, or a PipelineError that the README's service answered 5xx; the classes a service
    tells apart were not importable from `pipeline`."""
    import pipeline
    from pipeline.errors import CacheMismatchError, PipelineError, UsageError
    from pipeline.filters import FilterError
    from pipeline.images import ImageDecodeError

    out, _ = built
    assert (pipeline.ImageDecodeError, pipeline.FilterError, pipeline.CacheMismatchError) == (
        ImageDecodeError, FilterError, CacheMismatchError)
    cat = Catalog.open(out, model=Path(tiny_clip))
    by_name = Catalog.open(out, model=str(tiny_clip))
    assert [h.row for h in cat.search_text("red dress", k=4)] == [h.row for h in by_name.search_text("red dress", k=4)]
    picture = assets.jpeg_bytes(60, 80, seed=3)
    dim = cat.embeddings.shape[1]
    wrong = [
        lambda: cat.search_combined(picture, None),  # type: ignore[arg-type]
        lambda: cat.search_combined(picture, 5),  # type: ignore[arg-type]
        lambda: cat.search_combined(picture, ["red"], None),  # type: ignore[arg-type]
        lambda: cat.search_combined(picture, ["red"], text_weight="x"),  # type: ignore[arg-type]
        lambda: cat.search_combined(picture, ["red"], fusion="max"),
        lambda: cat.search_vectors(np.ones(dim + 1, np.float32)),
        lambda: cat.search_vectors(np.full(dim, 2.0, np.float32)),
        lambda: cat.neighbours(99),
        lambda: cat.neighbours("nope.jpg"),
        lambda: Catalog.open(None),  # type: ignore[arg-type]
        lambda: Catalog.open(out, dedup="no"),  # type: ignore[arg-type]
        lambda: cat.search_image(picture, segment="yes"),  # type: ignore[arg-type]  # it loaded a segmenter
        lambda: cat.search_image(picture, name=5),  # type: ignore[arg-type]  # a number as the result's label
        lambda: cat.search_vectors(cat.embeddings[0].astype(complex)),  # its imaginary part dropped, warned alone
    ]
    for ask in wrong:
        with pytest.raises(UsageError):
            ask()
    assert [h.row for h in cat.search_combined(picture, "red", k=np.int64(3))[0].hits] == \
        [h.row for h in cat.search_combined(picture, ["red"], k=3)[0].hits]
    assert Catalog.open(out, threads=np.int64(1)).search_text("red", k=2)
    other = Catalog.open(out, model=str(assets.save_tiny_clip(out.parent / "other-clip", seed=5)))
    with pytest.raises(CacheMismatchError) as fault:  # the service's own: not a UsageError
        other.search_text("red")
    assert not isinstance(fault.value, UsageError) and isinstance(fault.value, PipelineError)


def test_a_catalog_opened_in_python_names_its_arguments_not_the_command_lines_flags(tiny_clip, tmp_path,
                                                                                      monkeypatch):
    """A programmer never typed --filter: `--filter: expected a value` named a flag of a tool they did not
    run. Catalog.open's catalogs name the argument; one the command line made keeps its flags."""
    from pipeline.errors import UsageError
    from pipeline.filters import FilterError
    from pipeline.searcher import combine

    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(60, 80, seed=i) for i in range(6)],
                                      {"price": [1.0, 2, 3, 4, 5, 6], "colour": list("rgbrgb")})
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(ds), "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    cat = Catalog.open(out)
    with pytest.raises(FilterError) as e:
        cat.search_text("red", filter="price < cheap")
    assert str(e.value).startswith("filter: expected a value, found 'cheap' (texts are quoted: 'cheap') "
                                   "(at character 9)")
    columns = "the catalogue's columns are: price, colour"
    with pytest.raises(FilterError, match=rf"^filter: unknown column 'size'; {columns}"):
        cat.neighbours(0, filter="size = 1")
    with pytest.raises(UsageError, match=rf"^group_by: unknown column 'size'; {columns}"):
        cat.search_vectors(cat.embeddings[0], group_by="size")
    with pytest.raises(UsageError, match=r"^group_by=3: a metadata column's name, a text"):
        cat.search_text("red", group_by=3)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=rf"^group_by: unknown column 'size'; {columns}"):
        Catalog.open(out, group_by="size")  # the catalog's own group-by, at its opening, said as the queries' is
    with pytest.raises(UsageError, match="lower --text-weight"):  # the function alone speaks as the tool does
        combine(cat.embeddings[0], -cat.embeddings[:1], text_weight=1.0)
    cat.speaks_python = False  # as the command line's own catalogs are
    with pytest.raises(FilterError, match=r"^--filter: expected a value, found 'cheap'"):
        cat.search_text("red", filter="price < cheap")
    # "~/models/clip", as the README's commands write a model's folder: the home folder's, as a shell takes it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "clip").symlink_to(tiny_clip)
    (tmp_path / "home" / "shop").symlink_to(out)
    home = Catalog.open(Path("~/shop"), model="~/models/clip")
    np.testing.assert_array_equal(home.search_text("red")[0].row, cat.search_text("red")[0].row)


def test_the_duplicate_groups_handed_out_are_copies(tiny_onnx, tmp_path):
    """g[0][0].file = ... in a notebook changed the catalog's own line: every later answer named it."""
    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(60, 80, seed=i % 3) for i in range(5)])
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    cat = Catalog.open(out)
    groups = cat.duplicates()
    assert groups and len(groups[0]) >= 2
    kept = groups[0][0].file
    groups[0][0].file = "HACKED.jpg"
    assert cat.duplicates()[0][0].file == kept
    assert "HACKED.jpg" not in {h.file for h in cat.neighbours(groups[0][1].embedding_row, k=4)}


def test_catalog_queries_of_every_form_agree(built, tiny_clip):
    """A picture as a PIL image is searched as the same file is (alpha on white, 16-bit scaled, EXIF
    upright); one text alone is one text, not its letters; a k past the catalogue gives every item
    without making k-long arrays; empty or unencodable texts are refused; close() lets the
    thumbnails file go, also as a context manager."""
    import io

    from PIL import Image

    from pipeline.errors import UsageError

    out, _ = built
    with Catalog.open(out, model=str(tiny_clip)) as cat:
        rgba = Image.new("RGBA", (64, 80), (200, 30, 40, 255))
        rgba.paste((0, 0, 0, 0), (0, 0, 32, 80))  # half transparent: white under it, as a decoded file's
        grey16 = Image.fromarray((np.arange(64 * 80).reshape(80, 64) * 12).astype(np.uint16))
        rotated = Image.new("RGB", (60, 90), (10, 120, 200))
        rotated.paste((250, 250, 0), (0, 0, 60, 30))
        exif = rotated.getexif()
        exif[0x0112] = 6  # shown turned a quarter
        for picture, fmt, extra in ((rgba, "PNG", {}), (grey16, "PNG", {}), (rotated, "JPEG", {"exif": exif})):
            data = io.BytesIO()
            picture.save(data, fmt, **extra)
            opened = Image.open(io.BytesIO(data.getvalue()))
            as_bytes = cat.embed_crops(cat.query_crops(data.getvalue())[0])
            as_image = cat.embed_crops(cat.query_crops(opened)[0])
            assert float(as_bytes[0] @ as_image[0]) > 0.9999, fmt
        both = cat.search_combined(out / "images" / file_of(out, 2), "red", k=3)[0].hits
        assert both == cat.search_combined(out / "images" / file_of(out, 2), ["red"], k=3)[0].hits
        assert len(cat.search_vectors(cat.embeddings[0], k=10**9)[0]) == 12 and len(cat.neighbours(0, k=10**9)) == 11
        for bad, said in (("  ", "must say something"), ("red \ud800", "must be valid Unicode")):
            with pytest.raises(UsageError, match=said):
                cat.search_text(bad)
            with pytest.raises(UsageError, match=said):
                cat.search_combined(out / "images" / file_of(out, 2), [bad])
        assert cat.thumbnail(3).shape[2] == 3
    with pytest.raises(PipelineError, match=r"^the catalog was closed, and its thumbnails with it: open it again"):
        cat.thumbnail(3)  # not numpy's "seek of closed file"
    assert cat.search_vectors(cat.embeddings[0], k=2)[0][0].row == 0  # searches still answer


def test_readme_api_example_runs(built, tiny_clip):
    """The README's Python example, with the tiny model and the built folder put in."""
    out, _ = built
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(from pipeline import Catalog.*?)```", text, re.S)
    assert example, "README has no Catalog example"
    code = example.group(1).replace('"runs/today"', repr(str(out))).replace('"./fashion-clip"', repr(str(tiny_clip)))
    code = code.replace('"look.jpg"', repr(str(out / "images" / file_of(out, 1))))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, on test data
    assert scope["hits"] and scope["hits"][0].rank == 1
    assert scope["alike"] and all(h.row != scope["hits"][0].row for h in scope["alike"])  # never itself


def test_the_no_matrix_note_states_its_real_cause(built, tiny_clip, tmp_path, capsys):
    """An approximate index computes no all-pairs distances; that, not --max-matrix, is why 12 items get no matrix."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    argv = ["--use-embeddings", "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
            "--max-result-images", "0"]
    assert (out / "outputs" / "distance_matrix.npy").is_file()  # the build's, exact
    assert cli.main([*argv, "--index", "hnsw"]) == 0
    said = capsys.readouterr().out
    assert "the neighbours came from the approximate index" in said and "--max-matrix" not in said
    assert "distance_matrix.npy of an earlier run removed: it was not of this run's neighbours" in said
    assert not (out / "outputs" / "distance_matrix.npy").exists()
    assert cli.main([*argv, "--index", "none", "--max-matrix", "5"]) == 0
    assert "12 items > --max-matrix 5: distance matrix not saved" in capsys.readouterr().out


@pytest.mark.parametrize("decode", ["cpu", "cpu-simd"])
def test_a_gallery_photo_asked_for_finds_itself_whichever_resizer_made_the_store(decode, tiny_onnx, tmp_path):
    """Query pictures are decoded as the gallery's photos were (these, 480x640 and larger, at half
    scale) and resized by Pillow (no torch to import for one query): a photo of a store made with
    Pillow's resize gets its stored vector to the last bit; of one made with torch's, a vector within
    the two resizers' rounding of it, and it finds itself first either way."""
    photos = [assets.jpeg_bytes(480 + 8 * i, 640, seed=i) for i in range(6)]
    ds = assets.write_parquet_dataset(tmp_path / "ds", photos)
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "--decode", decode,
                     "--max-result-images", "0", "-q"]) == 0
    cat = Catalog.open(out, onnx=str(tiny_onnx))
    exact = []
    for row in range(6):
        picture = out / "images" / cat.items[row].file
        crops, _ = cat.query_crops(picture)
        vector = cat.embed_crops(crops)[0]
        exact.append(np.array_equal(vector, cat.embeddings[row]))
        assert float(vector @ cat.embeddings[row]) > 0.999
        assert cat.search_image(picture, k=1)[0].hits[0].row == row
    assert all(exact) if decode == "cpu" else not all(exact)


def test_a_store_made_by_the_onnx_file_is_searched_with_it_when_opened_with_its_model(
        tiny_onnx, tiny_clip, mixed_dataset, tmp_path, monkeypatch, capsys):
    """The README's way (`python main.py` with the int8 file) and the README's Catalog example
    (model=): the store's queries go through the file that made it, found by the sha256 the store
    records, not through the model, whose own vectors are not the file's; where the file is not
    found, the refusal comes at open and says to pass onnx=."""
    import shutil

    out, built = tmp_path / "out", tmp_path / "built" / "m_int8.onnx"
    built.parent.mkdir()
    shutil.copy(tiny_onnx, built)
    assert cli.main(["--dataset", str(mixed_dataset), "--onnx", str(built), "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 3
    monkeypatch.chdir(tmp_path)
    # where the file is still where the store recorded it, a search with nothing named takes it from there
    assert json.loads((out / "embeddings" / "embeddings.json").read_text())["machine"]["onnx_file"] == str(built)
    first = Catalog.open(out)
    look = out / "images" / first.items[2].file
    assert first.search_image(look, k=1)[0].hits[0].row == 2
    assert cli.main(["--query-image", str(look), "--output-dir", str(out), "-q"]) == 0
    built.rename(tmp_path / "moved.onnx")  # gone from there: looked for by its sha256, and not found
    with pytest.raises(CacheMismatchError,
                       match="made by an int8 ONNX file .* pass --onnx FILE \\(onnx='FILE.onnx' from Python\\)"):
        Catalog.open(out, model=str(tiny_clip))
    # with no model= either, the store's file is named (not "make the default file with --export-onnx",
    # which makes a file of the default model); the CLI says the same, not the default hub model's failure
    opened = Catalog.open(out)  # its vectors and neighbours need no embedder: said when a query needs one
    assert opened.neighbours(0, k=2)[0].row != 0
    with pytest.raises(CacheMismatchError, match=r"made by an int8 ONNX file \(sha256 [0-9a-f]{12}…, exported from "
                       r".*\), not at .*m_int8\.onnx any more \(or with other bytes\), found neither at the default "
                       r"--onnx .* pass --onnx FILE \(onnx='FILE.onnx' from "
                       r"Python\), the file that made it \(one an export replaced is kept beside the new one as "
                       r"<name>\.[0-9a-f]{12}\.onnx\)"):
        opened.search_text("red")
    capsys.readouterr()
    assert cli.main(["--query-text", "red", "--output-dir", str(out)]) == 1
    assert "found neither at the default --onnx" in capsys.readouterr().err
    (tmp_path / "onnx").mkdir()
    shutil.copy(tiny_onnx, tmp_path / "onnx" / "mine.onnx")
    cat = Catalog.open(out, model=str(tiny_clip))
    picture = out / "images" / cat.items[2].file
    assert cat.search_image(picture, k=1)[0].hits[0].row == 2
    by_file = Catalog.open(out, onnx=str(tiny_onnx))
    assert cat.search_image(picture, k=3)[0].hits == by_file.search_image(picture, k=3)[0].hits
    # opened with nothing named, the default file not there: the file the store records, found the same way
    assert Catalog.open(out).search_image(picture, k=3)[0].hits == by_file.search_image(picture, k=3)[0].hits
    # a store of the fp32 file is named as one, not as an int8 file's
    from pipeline.export import fp32_path_for

    fp32, fp32_file = tmp_path / "fp32", tmp_path / "built" / "m_fp32.onnx"
    shutil.copy(fp32_path_for(tiny_onnx), fp32_file)
    assert cli.main(["--dataset", str(mixed_dataset), "--onnx", str(fp32_file), "--output-dir",
                     str(fp32), "--max-result-images", "0", "-q"]) == 3
    fp32_file.unlink()
    with pytest.raises(CacheMismatchError, match=r"made by an fp32 ONNX file \(sha256 "):
        Catalog.open(fp32).search_text("red")


def test_a_distance_a_few_ulps_under_zero_is_zero():
    """1 - q·g of a vector with itself comes out slightly negative in float32 for some vectors: the
    console and the tables printed -0.000. Every answer's distances are clamped at 0."""
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert (1.0 - np.einsum("ij,ij->i", emb, emb) < 0).any()  # such vectors are there
    s = Searcher(emb, _rows(200))
    nb = s.neighbours(emb, 3)
    assert (nb.distances >= 0).all() and (nb.indices[:, 0] == np.arange(200)).all()
    assert all(h[0].distance >= 0 for h in s.search(emb[:50], 1))
    assert (s.all_neighbours(2).distances >= 0).all()


def test_a_store_caught_while_a_run_writes_it_is_said_to_be_so_not_to_need_a_build(tmp_path):
    """Between an update's switch and its sidecar (and its metadata) a reader was told to build the
    store, or that the update had stopped; while another run holds the folder's lock it is told to
    wait. A run's own lock (a search holds its folder's) is no other run's."""
    import time

    from pipeline.fileio import OutputLock, writer_of
    from tests.helpers import another_run_holding

    out = tmp_path / "out"
    (out / "embeddings").mkdir(parents=True)
    with OutputLock(out):
        assert writer_of(out) is None
    with another_run_holding(out) as pid:
        assert writer_of(out) == str(pid)
        for folder in (out, out / "embeddings"):
            with pytest.raises(PipelineError, match=rf"holds no complete gallery store now; another run \(pid "
                                                    rf"{pid}\) is writing to {re.escape(str(out))} now"):
                Catalog.open(folder)
    time.sleep(0.1)
    assert writer_of(out) is None  # its pid is gone
    # a SIGKILLed run's file, its pid taken since by another live process (pid 1 here): that is no writer
    (out / OutputLock.NAME).write_text("1 123\n")
    assert writer_of(out) is None or not Path("/proc/1/stat").is_file()  # where the system says when it started
    (out / OutputLock.NAME).write_text("1\n")  # a file without the start time (an earlier version's): the pid alone
    assert writer_of(out) == "1"
    (out / OutputLock.NAME).unlink()
    with pytest.raises(PipelineError, match="holds no gallery store .* build one first"):
        Catalog.open(out)


def test_the_api_as_a_library_uses_it(tiny_clip, tmp_path):
    """What a service built on the API needs: its answers cannot be changed through what it hands out;
    a hit goes to JSON as it is (a missing price as null, a date as its text); what it is given wrong
    is a PipelineError (a bad upload, a missing file, a filter of another type); a mistyped file is
    refused at open, not at the first request; a run folder of crops alone opens; it says when the
    store on disk is no longer the one it opened; and it says that it does not pickle."""
    import datetime
    import json
    import pickle

    from pipeline import PipelineError as Exported
    from pipeline.errors import UsageError

    ds = assets.write_parquet_dataset(
        tmp_path / "ds", [assets.jpeg_bytes(60, 80, seed=i) for i in range(6)],
        {"price": [10.0, float("nan"), 30.0, 40.0, 50.0, 60.0],
         "added": [datetime.date(2026, 1, d + 1) for d in range(6)]})
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(ds), "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    cat = Catalog.open(out)
    assert Exported is PipelineError and repr(cat).startswith("<Catalog 6 items in ")
    before = [h.row for h in cat.neighbours(0, k=3)]
    items = cat.items
    with pytest.raises(TypeError):
        items[0] = items[1]  # type: ignore[index]  # a read-only sequence
    mine = items[0]
    mine.file, mine.source_row = "changed.jpg", 99  # the caller's copy of the line
    with pytest.raises(ValueError, match="read-only"):
        cat.embeddings[1] *= -1
    assert [h.row for h in cat.neighbours(0, k=3)] == before and cat.items[0].source_row == 0
    assert all(h.file != "changed.jpg" for h in cat.search_vectors(cat.embeddings[0], k=6)[0])
    assert len(cat.items) == 6 and [r.source_row for r in cat.items[:2]] == [0, 1]
    # an item asked for by the name the user knows it by (its source), as by its row or store file
    assert [h.row for h in cat.neighbours(f"{ds}[0]", k=3)] == before
    with pytest.raises(PipelineError, match=r"no item named 'robe.jpg' .*its row \(hit.row\), its store file"):
        cat.neighbours("robe.jpg")
    hit = next(h for h in cat.search_vectors(cat.embeddings[1], k=6)[0] if h.source_row == 1)
    assert hit.meta["price"] is None  # NaN: missing, as "price IS NULL" takes it
    said = json.loads(json.dumps(hit.to_dict(), allow_nan=False))
    assert said["meta"] == {"price": None, "added": "2026-01-02"} and said["row"] == hit.row
    assert said["file"] == hit.file and said["distance"] == pytest.approx(hit.distance)
    [result] = cat.search_image(out / "images" / hit.file, k=2)
    assert json.loads(json.dumps(result.to_dict()))["hits"][0]["file"] == hit.file
    for bad, said_as in ((b"not a picture", "not a recognized image format"), (tmp_path / "gone.jpg", "cannot read")):
        with pytest.raises(PipelineError, match=said_as):
            cat.search_image(bad)
    with pytest.raises(UsageError, match="a filter is a text"):
        cat.search_vectors(cat.embeddings[0], filter=5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="query vectors are numbers"):
        cat.search_vectors(["a", "b"])
    with pytest.raises(UsageError, match=r"onnx='typo.onnx': no such file"):
        Catalog.open(out, onnx="typo.onnx")
    with pytest.raises(UsageError, match=r"model='/no/such/model': no such folder"):
        Catalog.open(out, model="/no/such/model")
    with pytest.raises(TypeError, match="a Catalog does not pickle .* open it in each process"):
        pickle.dumps(cat)
    assert cat.is_current()
    from pipeline.metadata import METADATA_FILE

    table = out / "embeddings" / METADATA_FILE  # an --update that changed a price alone writes this file alone
    data = table.read_bytes()
    table.unlink()
    table.write_bytes(data)
    assert not cat.is_current()
    cat = Catalog.open(out)
    crops = tmp_path / "crops"  # a run folder that holds the segmented store alone
    crops.mkdir()
    (out / "embeddings").rename(crops / "embeddings_segment")
    assert not cat.is_current()  # the store it opened is not on disk there any more
    assert len(Catalog.open(crops)) == 6


def test_a_stopped_switch_of_the_other_gallery_does_not_refuse_a_complete_store(built, tmp_path):
    """A run folder's embeddings/ complete, its embeddings_segment/ with an update stopped in its switch:
    Catalog.open refused the complete one, naming the other's update."""
    import shutil

    from pipeline.store import SWITCH_FILE, UPDATE_DIR

    out = tmp_path / "run"
    shutil.copytree(built[0], out)
    (out / "embeddings_segment" / UPDATE_DIR).mkdir(parents=True)
    (out / "embeddings_segment" / UPDATE_DIR / SWITCH_FILE).write_text("{}")
    assert len(Catalog.open(out)) == 12


def test_a_stores_metadata_written_in_nfd_before_is_filtered_by_an_nfc_filter(tiny_clip, tmp_path):
    """A store built before texts were read in NFC keeps a Mac CSV's decomposed values: the filter, now
    taken in NFC, matched none of them."""
    import unicodedata

    import pyarrow.parquet as pq

    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(60, 80, seed=i) for i in range(4)],
                                      {"category": ["été", "hiver", "été", "hiver"]})
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(ds), "--model", str(tiny_clip), "--backend", "torch", "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    path = out / "embeddings" / "metadata.parquet"
    table = pq.read_table(path)
    nfd = [unicodedata.normalize("NFD", v) for v in table.column("category").to_pylist()]
    pq.write_table(table.set_column(table.column_names.index("category"), "category",
                                    __import__("pyarrow").array(nfd)).replace_schema_metadata(table.schema.metadata),
                   path)
    hits = Catalog.open(out).search_text("summer", k=4, filter="category = 'été'")
    assert len(hits) == 2 and all(h.meta["category"] == "été" for h in hits)


def test_an_item_of_a_folder_dataset_is_found_by_its_path_caption_or_name(tiny_onnx, tmp_path):
    """Shown by its folder and name now (SKU1/front.jpg), a photo is asked for by its source first, then
    its caption, then its file's name (an exact source was refused as ambiguous beside another item's
    caption); a name of several in the first kind that names any is refused, naming their rows."""
    from pipeline.errors import UsageError

    files = ("front.jpg", "SKU1/front.jpg", "SKU2/front.jpg", "SKU2/side.jpg", "x/SKU1/front.jpg", "y/SKU3/a.jpg",
             "z/SKU3/a.jpg")
    for seed, name in enumerate(files):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(assets.jpeg_bytes(60, 80, seed=seed))
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(tmp_path / "photos"), "--onnx", str(tiny_onnx), "--output-dir", str(out),
                     "--max-result-images", "0", "-q"]) == 0
    cat = Catalog.open(out, onnx=str(tiny_onnx))
    row = {cat.items[r].source: r for r in range(len(files))}
    assert set(row) == set(files)
    for asked, meant in (("front.jpg", "front.jpg"), ("SKU1/front.jpg", "SKU1/front.jpg"),  # sources, exactly
                         ("side.jpg", "SKU2/side.jpg"), ("x/SKU1/front.jpg", "x/SKU1/front.jpg")):
        assert cat._row_of(asked) == row[meant], asked
    # as a user has the path at hand: ./, Windows' backslashes, the file's own path on disk
    for asked in ("./x/SKU1/front.jpg", "x\\SKU1\\front.jpg", str(tmp_path / "photos" / "x" / "SKU1" / "front.jpg")):
        assert cat.neighbours(asked, k=1)[0].row != row["x/SKU1/front.jpg"], asked  # its neighbour, not itself
        assert cat._row_of(asked) == row["x/SKU1/front.jpg"], asked
    # a dataset of split folders: its sources are its split's (SKU1/a.jpg of train/SKU1/a.jpg)
    for seed, name in enumerate(("train/SKU1/a.jpg", "train/SKU2/b.jpg", "test/SKU3/c.jpg")):
        (tmp_path / "split" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "split" / name).write_bytes(assets.jpeg_bytes(60, 80, seed=seed))
    assert cli.main(["--dataset", str(tmp_path / "split"), "--onnx", str(tiny_onnx), "--output-dir",
                     str(tmp_path / "split-out"), "--max-result-images", "0", "-q"]) == 0
    split = Catalog.open(tmp_path / "split-out", onnx=str(tiny_onnx))
    assert [i.source for i in split.items] == ["SKU1/a.jpg", "SKU2/b.jpg"]
    assert split._row_of(str(tmp_path / "split" / "train" / "SKU2" / "b.jpg")) == 1
    with pytest.raises(UsageError, match=r"'SKU3/a.jpg' names 2 items \(rows "):  # two captions alike
        cat.neighbours("SKU3/a.jpg", k=1)
    with pytest.raises(UsageError, match=r"its caption \(hit.shown_name\) or its file's name"):
        cat.neighbours("nothing.jpg", k=1)

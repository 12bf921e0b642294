"""The pictures a run writes, as a person finds them in the output folder: result pictures of the
store's thumbnails, query pictures with larger tiles made from the image files, named once
(q000_img_00042.jpg) and never mixed with an earlier query's."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

import main as cli
from pipeline.images import decode_image
from pipeline.plots import THUMB_SIZE, caption_size, make_thumbnail
from pipeline.search import QUERY_TILE, match_tile
from pipeline.webreport import read_section
from tests import assets
from tests.helpers import file_of

K = 3


def garment_jpeg(i: int) -> bytes:
    """A photo-sized garment (300 x 400), so a 224 px tile has more to show than a 128 px thumbnail."""
    g = assets.garment(i % 3, 300, 400).astype(np.int16) - np.array([(37 * i) % 80, (53 * i) % 80, 0], np.int16)
    return assets.encode(Image.fromarray(np.clip(g, 0, 255).astype(np.uint8)), "JPEG", quality=92)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_onnx):
    out = tmp_path_factory.mktemp("pictures")
    ds = assets.write_parquet_dataset(out / "ds", [garment_jpeg(i) for i in range(8)])
    assert cli.main(["--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "--top-k", str(K),
                     "-q"]) == 0
    return out


def query(out, tiny_onnx, *args) -> int:
    return cli.main([*map(str, args), "--onnx", str(tiny_onnx), "--output-dir", str(out), "--top-k", str(K), "-q"])


def composite_size(tile: int, k: int = K, title: bool = False) -> tuple[int, int]:
    line_h = round(caption_size(tile) * 1.35)
    top = (round(line_h * 1.5) if title else 0) + 2
    return (k + 1) * (tile + 6) + 6 + 12, top + tile + 4 + 2 * line_h + 6


def test_result_pictures_show_the_stores_thumbnails_with_two_caption_lines(catalogue):
    pictures = sorted((catalogue / "retrieval_results").glob("*_matches.jpg"))
    assert len(pictures) == 8
    with Image.open(pictures[0]) as pic:
        assert pic.size == composite_size(THUMB_SIZE)


def test_pictures_are_captioned_by_what_the_user_knows_the_photos_by(tiny_onnx, tmp_path, monkeypatch):
    """A folder of photos: the result and query pictures' captions name them by their file in the
    folder, not by the gallery's content name. A parquet cell's `<dataset>[row]`, which an update
    removing a row before it changes, leaves a result picture (kept across runs) its gallery file,
    while a query picture (drawn each time) names the row."""
    from pipeline import plots, runner, search
    from pipeline.store import read_manifest

    folder = tmp_path / "looks"
    folder.mkdir()
    for i in range(4):
        (folder / f"dress_{i}.jpg").write_bytes(garment_jpeg(i))
    jobs: list = []
    monkeypatch.setattr(runner, "draw_pictures", lambda paths, todo, done: jobs.extend(todo) or done(len(todo)))
    labels: list[str] = []
    real = plots.neighbour_tiles

    def tiles(indices, distances, tile, names):
        got = real(indices, distances, tile, names)
        labels.extend(got[1])
        return got

    monkeypatch.setattr(search, "neighbour_tiles", tiles)
    out = tmp_path / "out"
    assert query(out, tiny_onnx, "--dataset", folder) == 0
    names = {f"dress_{i}.jpg" for i in range(4)}
    assert {job.query_label.split("\n")[1] for job in jobs} == names
    assert all(label.split("\n")[1] in names for job in jobs for label in job.labels)
    assert query(out, tiny_onnx, "--query-text", "a dress") == 0
    assert labels and all(label.split("\n")[1] in names for label in labels)
    jobs.clear()
    labels.clear()
    parquet = assets.write_parquet_dataset(tmp_path / "ds", [garment_jpeg(i) for i in range(4)])
    rows = tmp_path / "rows"
    assert query(rows, tiny_onnx, "--dataset", parquet) == 0
    files = {r.file for r in read_manifest(rows / "embeddings" / "manifest.csv")}
    assert {job.query_label.split("\n")[1] for job in jobs} == files
    assert query(rows, tiny_onnx, "--query-text", "a dress") == 0
    assert labels and {label.split("\n")[1] for label in labels} <= {f"ds[{i}]" for i in range(4)}


def test_query_pictures_are_named_once_and_an_earlier_querys_go(catalogue, tiny_onnx, tmp_path):
    folder = catalogue / "retrieval_results" / "queries"
    folder.mkdir(parents=True, exist_ok=True)
    # an earlier run's pictures (one with the old double suffix), and files the tool did not name
    for name in ("q000_old_query.jpg", "q007_img_00001.jpg.jpg", "notes.jpg", "q1.jpg"):
        (folder / name).write_bytes(b"x")
    looks = tmp_path / "looks"
    looks.mkdir()
    (looks / "img_00042.jpg").write_bytes((catalogue / "images" / file_of(catalogue, 2)).read_bytes())
    (looks / "look.png").write_bytes(assets.encode(assets.rgb_image(60, 80, seed=3), "PNG"))
    assert query(catalogue, tiny_onnx, "--query-image", looks) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.jpg", "q000_img_00042.jpg", "q001_look.jpg", "q1.jpg", "query_results.csv"
    ]
    section = read_section(catalogue / "outputs", "query")
    assert section["data"]["pictures"] == [
        "../retrieval_results/queries/q000_img_00042.jpg", "../retrieval_results/queries/q001_look.jpg"
    ]
    assert query(catalogue, tiny_onnx, "--query-text", "red striped dress") == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.jpg", "q000_red_striped_dress.jpg", "q1.jpg", "query_results.csv"
    ]


def test_query_pictures_use_larger_tiles_made_from_the_image_files(catalogue, tiny_onnx, tmp_path):
    """The query and its matches are QUERY_TILE px: the query from its own picture, each match from its
    image file (the store keeps 128 px thumbnails only), not a thumbnail blown up."""
    picture = tmp_path / "same.jpg"
    picture.write_bytes((catalogue / "images" / file_of(catalogue, 4)).read_bytes())
    assert query(catalogue, tiny_onnx, "--query-image", picture) == 0
    with Image.open(catalogue / "retrieval_results" / "queries" / "q000_same.jpg") as pic:
        arr = np.asarray(pic.convert("RGB")).astype(int)
        assert pic.size == composite_size(QUERY_TILE, title=True)
    top = round(caption_size(QUERY_TILE) * 1.35 * 1.5) + 2
    first_match = arr[top : top + QUERY_TILE, 6 + QUERY_TILE + 6 + 12 :][:, :QUERY_TILE]
    own = make_thumbnail(decode_image(picture.read_bytes()).image, QUERY_TILE).astype(int)
    assert np.abs(first_match - own).mean() < 4  # the picture finds itself, drawn from its file
    query_tile = arr[top : top + QUERY_TILE, 6 : 6 + QUERY_TILE]
    assert np.abs(query_tile - own).mean() < 4
    small = make_thumbnail(decode_image(picture.read_bytes()).image, THUMB_SIZE)
    blown_up = np.asarray(Image.fromarray(small).resize((QUERY_TILE,) * 2, Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(first_match - own).mean() < np.abs(first_match - blown_up).mean()


def test_a_match_whose_file_is_not_here_is_drawn_from_its_thumbnail(tmp_path):
    """A URL --output-dir keeps the images in the bucket: the stored thumbnail, enlarged, stands in."""
    thumb = np.zeros((THUMB_SIZE, THUMB_SIZE, 3), np.uint8)
    thumb[:, THUMB_SIZE // 2 :] = 255
    catalog = types.SimpleNamespace(
        cache=types.SimpleNamespace(images_dir=tmp_path),
        searcher=types.SimpleNamespace(rows=[types.SimpleNamespace(file="not_here.jpg")]),
        thumbnail=lambda row: thumb,
    )
    tile = match_tile(catalog, 0)
    assert tile.shape == (QUERY_TILE, QUERY_TILE, 3)
    assert tile[:, : QUERY_TILE // 2 - 4].max() < 10 and tile[:, QUERY_TILE // 2 + 4 :].min() > 245
    assert match_tile(catalog, 0, THUMB_SIZE) is not None and (match_tile(catalog, 0, THUMB_SIZE) == thumb).all()


def thumbnail_files(folder, n: int = 40, parts: int = 2) -> list[str]:
    """n distinct thumbnails in `parts` .npy files (a store's thumbnails.npy and a segment)."""
    rng = np.random.default_rng(3)
    thumbs = rng.integers(0, 256, (n, THUMB_SIZE, THUMB_SIZE, 3), dtype=np.uint8)
    paths = []
    for k, part in enumerate(np.array_split(thumbs, parts)):
        paths.append(str(folder / f"thumbs-{k}.npy"))
        np.save(paths[-1], part)
    return paths


def picture_jobs(folder, n: int) -> list:
    from pipeline.pictures import PictureJob

    rng = np.random.default_rng(4)
    return [PictureJob(str(folder / f"img_{i:04d}_matches.jpg"), i, f"query\nimg_{i:04d}.jpg",
                       tuple(int(j) for j in rng.integers(0, n, 5)),
                       tuple(f"d=0.{i:03d}\nimg_{j}.jpg" for j in range(5)))
            for i in range(n)]


@pytest.mark.subprocess
def test_a_long_list_of_pictures_is_shared_with_a_worker_process_and_drawn_the_same(tmp_path, monkeypatch):
    from pipeline import pictures

    monkeypatch.setattr(pictures, "available_cores", lambda: 2)  # a one-core machine draws alone
    monkeypatch.chdir(tmp_path)  # a folder named like the package here is not what the worker imports
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("raise ImportError('the wrong pipeline')\n")
    files = thumbnail_files(tmp_path)
    here, shared = tmp_path / "here", tmp_path / "shared"
    here.mkdir()
    shared.mkdir()
    counted: list[int] = []
    assert pictures.draw_pictures(files, picture_jobs(here, 40), counted.append, process_at=10**9) == 0
    assert sum(counted) == 40
    counted.clear()
    by_worker = pictures.draw_pictures(files, picture_jobs(shared, 40), counted.append, process_at=1)
    assert sum(counted) == 40 and 0 < by_worker <= 40  # the worker drew some; every chunk reported once
    names = sorted(p.name for p in here.iterdir())
    assert len(names) == 40 and names == sorted(p.name for p in shared.iterdir())
    for name in names:  # the same code on the same thumbnails: the same bytes, whichever process drew
        assert (here / name).read_bytes() == (shared / name).read_bytes()
    pic = Image.open(shared / names[7])
    assert pic.format == "JPEG" and pic.height > THUMB_SIZE


def test_a_worker_that_fails_leaves_its_pictures_to_this_process(tmp_path, monkeypatch, caplog):
    from pipeline import pictures

    monkeypatch.setattr(pictures, "available_cores", lambda: 2)
    class Dying:
        closed = False

        def draw(self, files, jobs):
            raise RuntimeError("exit code 1: MemoryError")

        def close(self):
            Dying.closed = True

    monkeypatch.setattr(pictures, "_Worker", Dying)
    files = thumbnail_files(tmp_path)
    counted: list[int] = []
    assert pictures.draw_pictures(files, picture_jobs(tmp_path, 40), counted.append, process_at=1) == 0
    assert sum(counted) == 40 and len(list(tmp_path.glob("*_matches.jpg"))) == 40 and Dying.closed
    assert "the drawing worker failed (exit code 1: MemoryError); drawing here instead" in caplog.text


def test_a_worker_that_cannot_start_leaves_everything_to_this_process(tmp_path, monkeypatch, caplog):
    from pipeline import pictures

    def no_python(*a, **kw):
        raise FileNotFoundError(2, "No such file or directory", "/no/python")

    monkeypatch.setattr(pictures.subprocess, "Popen", no_python)
    monkeypatch.setattr(pictures, "available_cores", lambda: 2)
    counted: list[int] = []
    assert pictures.draw_pictures(thumbnail_files(tmp_path), picture_jobs(tmp_path, 40), counted.append,
                                  process_at=1) == 0
    assert sum(counted) == 40 and len(list(tmp_path.glob("*_matches.jpg"))) == 40
    assert "the drawing worker did not start" in caplog.text and "/no/python" in caplog.text


@pytest.mark.subprocess
def test_a_worker_that_cannot_draw_says_why(tmp_path):
    """The real worker, given a thumbnail file that is not there: its last words reach the error."""
    from pipeline import pictures

    worker = pictures._Worker()
    try:
        with pytest.raises(RuntimeError, match=r"exit code 1: FileNotFoundError: .*no-such\.npy"):
            worker.draw([str(tmp_path / "no-such.npy")], picture_jobs(tmp_path, 1))
    finally:
        worker.close()
    assert worker.proc.returncode is not None

"""User-visible outputs checked by their content: the picture a tile shows belongs to the item it names."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.webreport import PAGE_SIZE, SPRITE_COLUMNS, THUMB_SIZE, write_gallery_pages
from tests import assets
from tests.helpers import row_files, run


def _colour(i: int) -> tuple[int, int, int]:
    return (40 + (i * 37) % 180, 40 + (i * 59) % 180, 40 + (i * 83) % 180)


def test_report_pages_past_the_first_show_each_items_own_thumbnail(tmp_path):
    n = PAGE_SIZE + 13
    files = [f"img_{i:05d}.jpg" for i in range(n)]
    lines = [i + 2 for i in range(n)]  # manifest lines run ahead of embedding rows (two failed rows)
    nb = SimpleNamespace(indices=np.array([[(i + 1) % n] for i in range(n)]), distances=np.full((n, 1), 0.25))
    write_gallery_pages(tmp_path, "gallery", files, lines, nb, lambda i: np.full((THUMB_SIZE, THUMB_SIZE, 3),
                                                                                  _colour(i), np.uint8))
    sprite = np.asarray(Image.open(tmp_path / "gallery" / "page_0001.jpg").convert("RGB")).astype(int)
    assert sprite.shape[1] == SPRITE_COLUMNS * THUMB_SIZE
    page = (tmp_path / "gallery" / "page_0001.js").read_text()
    items = json.loads(page[page.index("(") + 1 : page.rindex(")")])["items"]
    assert [it["i"] for it in items] == list(range(PAGE_SIZE, n))
    for k, it in enumerate(items):
        i = it["i"]
        assert it["file"] == files[i] and it["row"] == lines[i] and it["nb"][0][2] == files[(i + 1) % n]
        y, x = (k // SPRITE_COLUMNS) * THUMB_SIZE + THUMB_SIZE // 2, (k % SPRITE_COLUMNS) * THUMB_SIZE + THUMB_SIZE // 2
        assert np.abs(sprite[y, x] - np.array(_colour(i))).max() <= 8, (k, i)



def test_a_pages_sprite_is_drawn_again_only_when_its_items_thumbnails_changed(tmp_path):
    n = 2 * PAGE_SIZE + 5
    files = [f"img_{i:05d}.jpg" for i in range(n)]
    nb = SimpleNamespace(indices=np.array([[(i + 1) % n] for i in range(n)]), distances=np.full((n, 1), 0.25))
    colour = {i: _colour(i) for i in range(n)}
    drawn: list[int] = []

    def thumbnail(i):
        drawn.append(i)
        return np.full((THUMB_SIZE, THUMB_SIZE, 3), colour[i], np.uint8)

    def write(keys):
        drawn.clear()
        write_gallery_pages(tmp_path, "gallery", files, list(range(n)), nb, thumbnail, tile_keys=keys)
        return sorted({i // PAGE_SIZE for i in drawn})

    keys = [f"k{i}" for i in range(n)]
    assert write(keys) == [0, 1, 2]
    assert write(keys) == []  # nothing changed: no sprite drawn, every page's data written
    colour[PAGE_SIZE + 3], keys[PAGE_SIZE + 3] = (250, 10, 10), "changed"  # one item of page 1
    assert write(keys) == [1]
    sprite = np.asarray(Image.open(tmp_path / "gallery" / "page_0001.jpg").convert("RGB")).astype(int)
    y, x = THUMB_SIZE // 2, 3 * THUMB_SIZE + THUMB_SIZE // 2
    assert np.abs(sprite[y, x] - np.array((250, 10, 10))).max() <= 8
    (tmp_path / "gallery" / "sprites.json").unlink()  # a run killed while drawing: nothing is trusted
    assert write(keys) == [0, 1, 2]
    assert write(None) == [0, 1, 2]  # without keys, always drawn


@pytest.fixture(scope="module")
def gallery_with_failures(tmp_path_factory, tiny_clip):
    """Rows 0 and 3 do not decode, so embedding rows and manifest lines differ."""
    tmp = tmp_path_factory.mktemp("content")
    cells = [assets.encode(assets.rgb_image(40 + i, 50, color=_colour(i)), "PNG") for i in range(9)]
    cells[0] = cells[3] = assets.corrupt_bytes()
    ds = assets.write_parquet_dataset(tmp / "ds", cells)
    out = tmp / "out"
    assert run("--dataset", ds, "--model", tiny_clip, "--backend", "torch", "--output-dir", out,
               "--max-result-images", "0") == 3
    return out


def test_search_hits_and_their_thumbnails_are_the_named_items_after_failed_rows(gallery_with_failures, tiny_clip):
    from pipeline import Catalog
    from pipeline.serve import SearchService

    cat = Catalog.open(gallery_with_failures, model=str(tiny_clip))
    files = row_files(gallery_with_failures)
    assert len(cat) == 7 and [r.file for r in cat.items][:2] == [files[1], files[2]] and 0 not in files
    for row, item in enumerate(cat.items):
        colour = np.array(_colour(item.source_row))
        centre = cat.thumbnail(row)[THUMB_SIZE // 2, THUMB_SIZE // 2].astype(int)  # tiles are letterboxed in white
        assert np.abs(centre - colour).max() <= 2
    service = SearchService(None, cat)  # type: ignore[arg-type]  # the thumbnail path reads no settings
    for hit in cat.search_image(gallery_with_failures / "images" / files[5], k=7)[0].hits:
        served = np.asarray(Image.open(io.BytesIO(service.thumbnail_jpeg(hit.row)))).astype(int)
        centre = served[THUMB_SIZE // 2, THUMB_SIZE // 2]
        assert np.abs(centre - np.array(_colour(hit.source_row))).max() <= 6, hit
        assert hit.file == files[hit.source_row] and cat.items[hit.row].index == hit.line


@pytest.mark.parametrize("source, file, lasting, person, shown", [
    ("p00.jpg", "img_a.jpg", False, -1, "p00.jpg"),  # a file of the dataset folder
    # one in a subfolder, by its path there: a folder per product names each one's photos alike (front.jpg)
    ("SKU1001/front.jpg", "img_a.jpg", False, -1, "SKU1001/front.jpg"),
    ("looks/sub/p00.jpg", "img_a.jpg", True, -1, "sub/p00.jpg"),  # its folder and name; a path lasts: kept in a
    # result picture
    ("women/dresses/SKU2001/front.jpg", "img_a.jpg", False, -1, "SKU2001/front.jpg"),
    ("/photos/looks/p00.jpg", "img_a.jpg", False, -1, "p00.jpg"),  # a parquet's path cell: absolute, its name
    ("C:\\shop\\looks\\p00.jpg", "img_a.jpg", False, -1, "p00.jpg"),
    ("/data/deepfashion[12]", "img_a.jpg", False, -1, "deepfashion[12]"),  # a parquet cell
    ("./cat/[12]", "img_a.jpg", False, -1, "cat[12]"),  # --dataset ./cat/ as the shell completes it
    ("/data/deepfashion[12]", "img_a.jpg", True, -1, "img_a.jpg"),  # a row moves with an update
    ("looks/p01.jpg", "seg_b.png", False, 2, "looks/p01.jpg#p2"),  # a person crop, as a query's person is labelled
    ("", "img_a.jpg", False, -1, "img_a.jpg"),  # no source: the gallery's file
])
def test_items_are_shown_by_what_the_user_knows_them_by(source, file, lasting, person, shown):
    from pipeline.store import shown_name

    assert shown_name(source, file, lasting=lasting, person=person) == shown

"""outputs/report.html in a real headless Chromium, opened from file://: items, paging, click-through,
filter, failures, and the sections of query, evaluation and video runs kept side by side."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import numpy as np
import pytest

import main as cli
from pipeline import galleries
from pipeline.persons import Person, Segmenter
from pipeline.store import read_manifest
from pipeline.webreport import PAGE_SIZE, build_summary, read_section
from tests import assets
from tests.conftest import mixed_cells


def wait(driver, script: str, timeout: float = 15.0):
    """Poll a JavaScript expression until it is truthy; return its value."""
    end = time.time() + timeout
    while time.time() < end:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@contextmanager
def viewport(driver, width: int, height: int = 900):
    """The page laid out as on a screen `width` CSS pixels wide (a phone at 420)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# Everything a card shows lies inside the card (a table too wide for it scrolls inside its .scroll
# box, which itself fits; a long title wraps), and the page never scrolls sideways.
OUT_OF_CARDS = """(() => { const bad = [];
  if (document.documentElement.scrollWidth > innerWidth) bad.push('page ' + document.documentElement.scrollWidth);
  for (const card of document.querySelectorAll('section.run')) {
    if (card.scrollWidth > card.clientWidth) bad.push(`${card.id} content ${card.scrollWidth} > ${card.clientWidth}`);
    const edge = card.getBoundingClientRect().right;
    for (const e of card.querySelectorAll('*')) {
      const box = e.closest('.scroll');
      if (box && box !== e) continue;
      const r = e.getBoundingClientRect();
      if (r.width && r.right > edge + 0.5) bad.push(`${card.id} ${e.tagName}.${e.className} ${r.right} > ${edge}`);
    }
  }
  return bad; })()"""

VISIBLE_IMAGES_LOADED = """(() => { const imgs = [...document.images].filter(i => { const r = i.getBoundingClientRect();
  return r.bottom > 0 && r.top < innerHeight && r.width > 0; });
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0; })()"""


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, tiny_onnx):
    """A gallery of 24 mixed rows (two broken) plus 240 pictures: three pages of items."""
    out = tmp_path_factory.mktemp("report")
    cells = [c for _, c in mixed_cells()] + [assets.jpeg_bytes(90, 120, seed=500 + i) for i in range(240)]
    ds = assets.write_parquet_dataset(out / "ds", cells)
    assert (
        cli.main(
            ["--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q", "--max-result-images", "5"]
        )
        == 3
    )
    return out, ds


def test_the_report_shows_every_item_pages_and_follows_neighbours(report_run, browser):
    out, _ = report_run
    browser.get((out / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelectorAll('[data-role=grid] .tile').length")
    assert browser.execute_script("return document.querySelectorAll('[data-role=grid] .tile').length") == PAGE_SIZE
    info = browser.execute_script("return document.querySelector('.tools .sub').textContent")
    assert info == "page 1 of 3 · 262 items"
    browser.execute_script("document.querySelector('[data-role=grid]').scrollIntoView()")
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    failures = browser.execute_script("return [...document.querySelectorAll('tr.failure')].map(r => r.textContent)")
    assert len(failures) == 2 and any("ds[2]" in f and "(it starts like a text file)" in f for f in failures)
    assert not any("b'" in f for f in failures)  # what the file is, in words, not its bytes
    # paging
    browser.execute_script("document.querySelector('[data-role=next]').click()")
    wait(browser, "document.querySelector('[data-role=grid] .tile').dataset.item === '120'")
    browser.execute_script("document.querySelector('[data-role=next]').click()")
    wait(browser, "document.querySelector('.tools .sub').textContent.startsWith('page 3 of 3')")
    assert (
        browser.execute_script("return document.querySelectorAll('[data-role=grid] .tile').length")
        == 262 - 2 * PAGE_SIZE
    )
    # click an item: its 5 neighbours with distances; click a neighbour: it becomes the item shown
    browser.execute_script("document.querySelector('[data-role=grid] .tile').click()")
    wait(browser, "document.querySelectorAll('.detail [data-neighbour]').length === 5")
    first = browser.execute_script("return document.querySelector('.detail [data-neighbour]').dataset.neighbour")
    dist = browser.execute_script("return document.querySelector('.detail [data-neighbour] .dist').textContent")
    assert 0 <= float(dist) <= 2
    browser.execute_script("document.querySelector('.detail [data-neighbour]').click()")
    wait(
        browser,
        f"document.querySelector('.detail .sub').textContent.includes('img_') && "
        f"document.querySelector('.detail .query .cap[title]').title.endsWith("  # the source, then the gallery's file
        f"window.__report.pages['gallery/' + Math.floor({first} / {PAGE_SIZE})].items[{first} % {PAGE_SIZE}].file)",
    )
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    # by keyboard: Tab from the filter box reaches the tiles, Enter opens one, as a click does
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.CSS_SELECTOR, "[data-role=filter]").click()
    for _ in range(12):  # the filter, the paging buttons, then the first tile
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.execute_script("return document.activeElement.dataset.item !== undefined"):
            break
    item = browser.execute_script("return document.activeElement.dataset.item")
    assert item is not None and browser.execute_script("return document.activeElement.getAttribute('role')") == "button"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, f"document.querySelector('[data-role=grid] .tile.on') && "
                  f"document.querySelector('[data-role=grid] .tile.on').dataset.item === '{item}'")
    # the filter searches every page's names, the files' and the sources': those of one first hex digit,
    # on every page; an item's caption is its source's name, its file on hover
    lines = [r for r in read_manifest(out / "embeddings" / "manifest.csv") if r.embedding_row >= 0]
    files = [r.file for r in lines]
    prefix = max({f[:5] for f in files}, key=lambda p: sum(f.startswith(p) for f in files))
    expected = sorted(f for f in files if prefix in f)

    def filtered(text: str) -> list[tuple[str, str]]:
        browser.execute_script(
            f"const f = document.querySelector('[data-role=filter]'); f.value = '{text}';"
            "f.dispatchEvent(new Event('input'))"
        )
        wait(browser, "document.querySelector('.tools .sub').textContent.includes('matching') && "
                      "[...document.querySelectorAll('[data-role=grid] .tile .cap[title]')].every(c => "
                      f"c.title.toLowerCase().includes('{text}'.toLowerCase()))")
        return browser.execute_script(
            "return [...document.querySelectorAll('[data-role=grid] .tile .cap[title]')]"
            ".map(c => [c.textContent, c.title])"
        )

    shown = filtered(prefix)
    assert len(expected) > 10 and sorted(title.split("\n")[-1] for _, title in shown) == expected
    source_of = {r.file: r.source for r in lines}
    assert all(title == f"{source_of[title.split(chr(10))[-1]]}\n{title.split(chr(10))[-1]}" and
               name == source_of[title.split(chr(10))[-1]].rsplit("/", 1)[-1] for name, title in shown)
    # a name too long for a caption is cut in the middle, its end kept (a copy's suffix tells it apart)
    assert browser.execute_script("return [midCut('p02_q75_resized90_of_the_shoot.jpg'), midCut('short.jpg')]") == [
        "p02_q75_r…shoot.jpg", "short.jpg"]
    # a photo's folder and name: the name kept whole, the folder cut in its middle ("front" was cut to "ront")
    assert browser.execute_script(
        "return [midCut('Robe-été-Käse-Ærø/side.jpg', 17), midCut('SKU2001/front.jpg', 17), "
        "midCut('summer-collection-2024/a_very_long_photo_name.jpg', 17)]") == [
        "Robe…Ærø/side.jpg", "SKU2001/front.jpg", "summer-c…name.jpg"]
    # a video's matches are named in the page as Python names the gallery's items (store.shown_name)
    from pipeline.store import shown_name

    sources = ["p00.jpg", "SKU1/front.jpg", "women/dresses/SKU2/front.jpg", "/photos/a/b.jpg", "./cat/[12]",
               "/data/deepfashion[3]", "C:\\shop\\x.jpg", ""]
    for person in (-1, 2):
        assert browser.execute_script("return arguments[0].map(s => nameOf('img_a.jpg', s, arguments[1]))",
                                      sources, person) == [shown_name(s, "img_a.jpg", person=person) for s in sources]
    row = lines[200]
    by_source = filtered(f"[{row.source_row}]")  # the user's name of the photo finds it
    assert [t.split("\n")[-1] for _, t in by_source] == [row.file]
    assert console_errors(browser) == []


def test_the_report_is_small_and_paged(report_run):
    out, _ = report_run
    assert (out / "outputs" / "report.html").stat().st_size < 60_000
    pages = sorted((out / "outputs" / "report" / "gallery").glob("page_*.js"))
    assert len(pages) == 3 and all(p.stat().st_size < 200_000 for p in pages)
    assert len(list((out / "outputs" / "report" / "gallery").glob("page_*.jpg"))) == 3


def test_query_and_evaluation_sections_join_the_gallery(report_run, tiny_onnx, tmp_path, browser):
    out, _ = report_run
    assert cli.main(["--query-text", "red dress", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 0
    pairs = [assets.rgb_image(96, 128, seed=300 + i) for i in range(6)]
    ds = assets.write_parquet_dataset(
        tmp_path / "pairs",
        [assets.encode(p, "JPEG", quality=80) for p in pairs],
        extra={"cloth": [assets.encode(p, "JPEG", quality=95) for p in pairs]},
    )
    assert cli.main(["--evaluate", "--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 0
    browser.get((out / "outputs" / "report.html").as_uri())
    kinds = wait(
        browser,
        "document.querySelectorAll('section.run').length === 3 && "
        "[...document.querySelectorAll('section.run')].map(s => s.dataset.kind)",
    )
    assert kinds == ["gallery", "query", "evaluation"]  # the gallery section was kept
    rows = browser.execute_script(
        "return [...document.querySelectorAll('[data-role=evaluation] tr')].slice(1)"
        ".map(r => r.cells[0].textContent + '|' + r.cells[1].textContent)"
    )
    assert rows == ["person->garment|onnx-int8"]
    # the results are shown once, as the table; the notes do not repeat them as markdown
    notes = browser.execute_script(
        "return [...document.querySelectorAll('#evaluation .notes li')].map(li => li.textContent)"
    )
    assert not any("|" in n for n in notes)
    assert browser.execute_script(
        "return [...document.querySelectorAll('#evaluation')].map(e => e.textContent.split('R@10').length - 1)"
    ) == [1]
    assert browser.execute_script("return document.querySelectorAll('#query .pics img').length") == 1
    # the results: the query once, as a heading row over its matches, rank and distance before the name
    table = browser.execute_script(
        "return [...document.querySelectorAll('#query [data-role=query-results] tr')].map(r => "
        "[r.className, [...r.cells].map(c => c.textContent)])")
    assert table[0] == ["", ["rank", "distance", "gallery photo"]] and table[1] == ["query-row", ["red dress · text"]]
    assert [cells[0] for _, cells in table[2:]] == ["1", "2", "3", "4", "5"]
    assert all(0 <= float(cells[1]) <= 2 and cells[2] for _, cells in table[2:])
    with viewport(browser, 390, 844):  # on a phone the table stays within its card, the distances on screen
        assert browser.execute_script(
            "const t = document.querySelector('#query [data-role=query-results]');"
            "return t.getBoundingClientRect().right <= document.getElementById('query').getBoundingClientRect().right")
    # a query picture shown smaller than it is opens at full size
    assert browser.execute_script(
        "const a = document.querySelector('#query .pics a');"
        "return a.getAttribute('href') === a.firstChild.getAttribute('src')"
    )
    browser.execute_script("document.getElementById('evaluation').scrollIntoView()")
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    assert console_errors(browser) == []
    sections = json.loads((out / "outputs" / "report" / "sections.js").read_text().split("(", 1)[1].rsplit(")", 1)[0])
    assert sections == ["gallery", "query", "evaluation"]


def test_pictures_keep_their_aspect_ratio(report_run, browser):
    """The heatmap and the histogram sit in one row; the histogram is not stretched to the
    heatmap's height (nor any picture squeezed), at a desktop's width and at a phone's."""
    out, _ = report_run
    for width in (1366, 420):
        with viewport(browser, width):
            browser.get((out / "outputs" / "report.html").as_uri())
            wait(browser, "document.querySelectorAll('#gallery .plots img').length === 2")
            browser.execute_script("document.querySelectorAll('.plots img').forEach(i => i.loading = 'eager')")
            wait(browser, "[...document.querySelectorAll('.plots img')].every(i => i.complete && i.naturalWidth > 0)")
            shapes = browser.execute_script(
                "return [...document.querySelectorAll('.plots img')].map(i => [i.getAttribute('src'), "
                "i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight, i.clientWidth])"
            )
            assert len(shapes) >= 2
            for src, natural, shown, shown_width in shapes:
                assert shown == pytest.approx(natural, rel=0.02), (width, src)
                assert shown_width > 0.5 * min(width, 560), (width, src)  # and not shrunk to a stamp


def test_nothing_overflows_a_card_at_420_px(report_run, browser):
    """On a phone (420 px) the stage bars, the tables and the pictures stay inside their cards."""
    out, _ = report_run
    with viewport(browser, 420):
        browser.get((out / "outputs" / "report.html").as_uri())
        wait(browser, "document.querySelectorAll('section.run').length >= 1 && "
                      "document.querySelectorAll('[data-role=grid] .tile').length")
        assert browser.execute_script("return document.querySelectorAll('.bar').length") > 5
        assert browser.execute_script(f"return {OUT_OF_CARDS}") == []
        browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        assert browser.execute_script(f"return {OUT_OF_CARDS}") == []
    assert console_errors(browser) == []


def test_sub_stages_sit_under_the_stage_they_belong_to(report_run, browser, tiny_onnx):
    out, _ = report_run
    browser.get((out / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelectorAll('#gallery tr[data-stage]').length")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#gallery tr[data-stage]')].map(r => [r.dataset.stage, +r.dataset.depth,"
        " parseFloat(getComputedStyle(r.cells[0]).paddingLeft)])"
    )
    assert_parts_follow_their_stage(rows)
    assert {name for name, *_ in rows} >= {"embed", "embed/items", "embed/infer", "finalize store"}
    # the section says what made its vectors, as the printed summary's "model:" line does
    sub = browser.execute_script("return document.querySelector('#gallery > .sub').textContent")
    assert sub.startswith("standard · finished ") and " · vectors by " in sub
    assert sub.endswith(f"tiny-clip (onnx, onnx-int8-static-matmul-per-channel-7bit), {tiny_onnx}")  # and its file


def assert_parts_follow_their_stage(rows: list) -> None:
    """Each part (a/b) comes after its stage (a) with nothing of depth <= a's between, indented more."""
    for k, (name, depth, indent) in enumerate(rows):
        assert depth == name.count("/")
        if depth:
            parent = name.rsplit("/", 1)[0]
            above = next(r for r in reversed(rows[:k]) if r[1] < depth)
            assert above[0] == parent and indent > above[2], (name, rows)


class _CentrePerson(Segmenter):
    """A person in the middle of every picture, found at once (a stand-in for YOLO)."""

    predict_seconds = 0.0

    def segment(self, images_rgb):
        self.predict_seconds += 0.001 * len(images_rgb)
        return [[Person(np.array([w / 4, h / 8, 3 * w / 4, 7 * h / 8], np.float32), 0.9)]
                for h, w in (im.shape[:2] for im in images_rgb)]


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, tiny_onnx):
    """Six garments built, then reused twice (--use-embeddings); a segmented gallery of them (its
    segmentation time is known only after the store is finalized); galleries of one and no items."""
    out = tmp_path_factory.mktemp("small")
    pictures = [assets.encode(assets.rgb_image(120, 160, seed=40 + i), "JPEG", quality=90) for i in range(6)]
    six = assets.write_parquet_dataset(out / "six", pictures)
    one = assets.write_parquet_dataset(out / "one", pictures[:1])
    none = assets.write_parquet_dataset(out / "none", [assets.corrupt_bytes()])
    common = ["--onnx", str(tiny_onnx), "-q"]
    assert cli.main(["--dataset", str(six), "--output-dir", str(out / "run"), *common]) == 0
    built = read_section(out / "run" / "outputs", "gallery")
    for _ in range(2):
        assert cli.main(["--dataset", str(six), "--output-dir", str(out / "run"), "--use-embeddings", *common]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(galleries, "make_segmenter", lambda spec, device: _CentrePerson())
        assert cli.main(["--dataset", str(six), "--output-dir", str(out / "run"), "--use-segmentation", *common]) == 0
    assert cli.main(["--dataset", str(one), "--output-dir", str(out / "one"), *common]) == 0
    assert cli.main(["--dataset", str(none), "--output-dir", str(out / "none"), *common]) == 3
    return out, built


def test_a_reuse_run_keeps_the_builds_figures(small_runs, browser):
    """--use-embeddings reports its own run and keeps the summary of the run that built the store
    (counts, stage times), through any number of reuses; the build's failures are not listed twice."""
    out, built = small_runs
    section = read_section(out / "run" / "outputs", "gallery")
    assert section["summary"]["mode"] == "standard (from cache)"
    assert section["data"]["build"] == built["summary"] and built["data"]["built"] is True
    assert built["summary"]["counts"]["embedded"] == 6 and "embed" in {s["name"] for s in built["summary"]["stages"]}
    browser.get((out / "run" / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelector('#gallery [data-role=build] tr[data-stage=embed]')")
    block = browser.execute_script(
        "const b = document.querySelector('#gallery [data-role=build]');"
        "return [b.open, b.querySelector('summary').textContent, b.querySelectorAll('.failures-box').length,"
        "[...b.querySelectorAll('.stat')].map(s => s.textContent)]"
    )
    assert block[0] is True and block[1].startswith("How this gallery was built: standard · finished ")
    assert block[2] == 0 and "6embedded" in block[3]
    # the segmented gallery's section: its segmentation time sits under the item stage, not at the end
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#gallery_segment > div tr[data-stage]')].map(r => [r.dataset.stage,"
        " +r.dataset.depth, parseFloat(getComputedStyle(r.cells[0]).paddingLeft)])"
    )
    names = [r[0] for r in rows]
    assert names.index("embed/items/segment") == names.index("embed/items") + 1 < names.index("finalize store")
    assert_parts_follow_their_stage(rows)
    assert console_errors(browser) == []


def test_a_build_summary_is_carried_only_for_its_own_store(small_runs):
    out, built = small_runs
    plots = out / "run" / "outputs"
    store = built["data"]["store"]
    assert build_summary(plots, "gallery", store) == built["summary"]
    assert build_summary(plots, "gallery", "another store's sha256") is None
    assert build_summary(plots, "gallery", "") is None
    assert build_summary(plots, "no_such_section", store) is None


def test_one_item_is_shown_and_no_items_is_said(small_runs, browser):
    out, _ = small_runs
    browser.get((out / "one" / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelectorAll('[data-role=grid] .tile').length === 1")
    said = browser.execute_script(
        "return [document.querySelector('#gallery h2').textContent, document.querySelector('#nav').textContent,"
        " [...document.querySelectorAll('#gallery h3')].map(h => h.textContent),"
        " document.querySelector('.tools .sub').textContent,"
        " document.querySelector('#gallery').textContent.includes('No embedded items')]"
    )
    assert said[0] == said[1] == "Gallery (1 item)"
    assert "The item (neighbours need at least two items)" in said[2] and said[3] == "page 1 of 1 · 1 item"
    assert said[4] is False
    browser.execute_script("document.querySelector('[data-role=grid] .tile').click()")
    wait(browser, "document.querySelector('.detail .sub')?.textContent.includes('no neighbours')")
    notes = browser.execute_script("return [...document.querySelectorAll('.notes li')].map(li => li.textContent)")
    assert notes == ["one embedded item: no neighbours, distance matrix or plots (they need two items)"]
    browser.get((out / "none" / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelector('#gallery .empty')")
    assert browser.execute_script("return document.querySelector('#gallery h2').textContent") == "Gallery (0 items)"
    assert browser.execute_script("return document.querySelector('#gallery .empty').textContent") == (
        "No embedded items to show."
    )
    assert console_errors(browser) == []


def test_a_sprite_holds_each_thumbnail_in_its_cell_on_white():
    # the pixels one Pillow paste per tile gives: full rows, a short last row, a tile of another size
    from PIL import Image

    from pipeline.plots import THUMB_SIZE as T
    from pipeline.webreport import SPRITE_COLUMNS, sprite_image

    rng = np.random.default_rng(7)
    for n in (1, SPRITE_COLUMNS, SPRITE_COLUMNS + 1, 37):
        tiles = [rng.integers(0, 256, (T, T, 3), dtype=np.uint8) for _ in range(n)]
        tiles[-1] = tiles[-1][: T // 2, : T - 3]  # smaller: at its cell's top left, white around it
        want = Image.new("RGB", (SPRITE_COLUMNS * T, -(-n // SPRITE_COLUMNS) * T), (255, 255, 255))
        for k, tile in enumerate(tiles):
            want.paste(Image.fromarray(tile), ((k % SPRITE_COLUMNS) * T, (k // SPRITE_COLUMNS) * T))
        got = sprite_image(tiles)
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want)), n


def test_a_sprites_cells_keep_their_own_colours_to_their_edges():
    """Halved colour (JPEG's 4:2:0) drew a line of each thumbnail's colour along its neighbour's edge."""
    import io

    from PIL import Image

    from pipeline.images import encode_jpeg
    from pipeline.plots import THUMB_SIZE as T
    from pipeline.webreport import SPRITE_QUALITY, sprite_image

    colours = [(200, 20, 30), (255, 255, 255), (20, 60, 220), (30, 190, 60)]
    sprite = sprite_image([np.full((T, T, 3), c, np.uint8) for c in colours])
    data = encode_jpeg(sprite, quality=SPRITE_QUALITY, full_colour=True)
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    for k, colour in enumerate(colours):
        cell = got[:T, k * T:(k + 1) * T]
        assert np.abs(cell - np.array(colour)).max() <= 8, (k, np.abs(cell - np.array(colour)).max())


def test_a_long_query_name_and_the_catalogues_values_fit_a_phone(tiny_onnx, tmp_path, browser):
    """At 390 px: a query picture's name with no space to break at (it stands in the query's notes)
    wraps inside its card instead of widening the page; an item's catalogue values read as the search
    page shows them (1,299.99, yes, a year 2024), and its thumbnail's alt is its name, not the gallery's file."""
    from selenium.webdriver.common.by import By

    pictures = [assets.encode(assets.rgb_image(60, 80, seed=70 + i), "JPEG", quality=90) for i in range(4)]
    ds = assets.write_parquet_dataset(tmp_path / "shop", pictures,
                                      {"price": [1299.99, 5.0, 19.5, 80.0], "in_stock": [True, False, True, True],
                                       "year": [2024, 2025, 2024, 2023]})
    out = tmp_path / "out"
    common = ["--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]
    assert cli.main(["--dataset", str(ds), *common]) == 0
    query = tmp_path / ("look_tres_long_nom_de_fichier_pour_une_photo_de_robe_rouge_sans_espaces" * 2 + ".jpg")
    query.write_bytes(pictures[0])
    assert cli.main(["--query-image", str(query), *common]) == 0
    with viewport(browser, 390, 844):
        browser.get((out / "outputs" / "report.html").as_uri())
        wait(browser, "document.querySelectorAll('section.run').length === 2 && "
                      "document.querySelectorAll('[data-role=grid] .tile').length === 4")
        browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        assert browser.execute_script(f"return {OUT_OF_CARDS}") == []
        tile = browser.find_elements(By.CSS_SELECTOR, "[data-role=grid] .tile")[0]
        assert tile.find_element(By.TAG_NAME, "img").get_attribute("alt") == f"{ds.name}[0]"  # its shown name
        tile.click()
        values = wait(browser, "document.querySelector('[data-role=meta]') && "
                               "[...document.querySelectorAll('[data-role=meta] dd')].map(d => d.textContent)")
        assert values == ["1,299.99", "yes", "2024"]  # a year as written, not 2,024
    assert console_errors(browser) == []


def test_shop_names_are_told_apart_and_a_selection_opens_under_its_tile(tiny_onnx, tmp_path, browser):
    """Shop photos named alike but for a SKU mid-name read apart in the grid and the panel (cut in
    the middle, each read `women-dre…front.jpg`); the panel opens under the clicked tile's row and
    fits a phone; a filter that leaves the selection out lets it go."""
    from selenium.webdriver.common.by import By

    folder = tmp_path / "shop"
    folder.mkdir()
    names = [f"women-dress-summer-collection-SKU{1000 + i}-front.jpg" for i in range(20)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(assets.jpeg_bytes(60, 80, seed=300 + i))
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(folder), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 0
    with viewport(browser, 390, 844):
        browser.get((out / "outputs" / "report.html").as_uri())
        wait(browser, "document.querySelectorAll('[data-role=grid] .tile').length === 20")
        captions = browser.execute_script("return [...document.querySelectorAll('[data-role=grid] .tile .cap[title]')]"
                                          ".map(c => [c.textContent, c.title])")
        assert len({c for c, _ in captions}) == 20, captions  # each its own SKU, from its own name
        assert all(len(c) <= 19 and c.removeprefix("…")[:4] in t and c.removeprefix("…")[:4].isdigit()
                   for c, t in captions), captions
        assert browser.execute_script("return document.querySelector('[data-role=pager-bottom]').hidden")  # one page
        tiles = browser.find_elements(By.CSS_SELECTOR, "[data-role=grid] > .tile")
        per_row = browser.execute_script(
            "return getComputedStyle(document.querySelector('[data-role=grid]')).gridTemplateColumns.split(' ').length")
        tiles[per_row + 1].click()  # second row: the panel follows that row's last tile, inside the grid
        wait(browser, "document.querySelectorAll('.detail [data-neighbour]').length === 5")
        after = browser.execute_script("const d = document.querySelector('.detail'); "
                                       "return [d.parentElement.dataset.role, d.previousElementSibling.dataset.item]")
        assert after == ["grid", tiles[2 * per_row - 1].get_attribute("data-item")]
        panel = browser.execute_script("return [...document.querySelectorAll('.detail .tile .cap:last-child')]"
                                       ".map(c => c.textContent)")
        assert len(set(panel)) == 6 and all(len(c) <= 19 for c in panel), panel
        assert browser.execute_script(f"return {OUT_OF_CARDS}") == []
        # a neighbour followed: the panel goes under that item's own row (left under the first, it read as its)
        followed = browser.execute_script("const n = document.querySelector('.detail [data-neighbour]');"
                                          "const j = n.dataset.neighbour; n.click(); return +j;")
        wait(browser, f"document.querySelector('[data-role=grid] > .tile.on')?.dataset.item === '{followed}'")
        order = [int(t.get_attribute("data-item")) for t in tiles]
        row_end = order[min(len(order), (order.index(followed) // per_row + 1) * per_row) - 1]
        wait(browser, f"document.querySelector('.detail').previousElementSibling?.dataset.item === '{row_end}'")
        browser.execute_script("const f = document.querySelector('[data-role=filter]'); f.value = 'nothing-like-it';"
                               "f.dispatchEvent(new Event('input'))")
        wait(browser, "document.querySelector('[data-role=grid] .empty')")
        assert browser.execute_script("return document.querySelector('.detail').hidden")
    assert console_errors(browser) == []


def test_the_pager_under_the_grid_turns_the_page_and_goes_back_to_its_top(report_run, browser):
    out, _ = report_run
    with viewport(browser, 390, 844):
        browser.get((out / "outputs" / "report.html").as_uri())
        wait(browser, "document.querySelectorAll('[data-role=grid] .tile').length")
        bottom = "document.querySelector('[data-role=pager-bottom]')"
        assert browser.execute_script(f"return {bottom}.textContent") == "‹ PreviousNext ›page 1 of 3 · 262 items"
        browser.execute_script("document.querySelectorAll('[data-role=grid] > .tile')[5].click()")
        wait(browser, "document.querySelectorAll('.detail [data-neighbour]').length === 5")
        browser.execute_script(f"{bottom}.scrollIntoView(); document.querySelector('[data-role=next-bottom]').click()")
        wait(browser, "document.querySelector('[data-role=grid] .tile').dataset.item === '120'")
        top = browser.execute_script("return document.querySelector('[data-role=filter]').getBoundingClientRect().top")
        assert -2 <= top < 100  # the new page from its start, not its end
        # the selection of page 1 let go: its panel filled the phone's screen above page 2
        assert browser.execute_script("return document.querySelector('.detail').hidden")
        first = browser.execute_script("return document.querySelector('[data-role=grid] > .tile')"
                                       ".getBoundingClientRect().top")
        assert first < 844
    assert console_errors(browser) == []


def test_both_pages_carry_the_shared_caption_script_once():
    """The report (opened from file://) and the search page inline templates/captions.js, not a copy each."""
    import re

    from pipeline.webreport import template

    for page in ("report.html", "search.html"):
        text = template(page)
        assert text.count("function distinctCuts(") == 1 and text.count("function midCut(") == 1, page
        assert not re.search(r"^// @include", text, flags=re.MULTILINE), page

"""outputs/report.html in a real headless Chromium, opened from file://: items, paging, click-through,
filter, failures, and the sections of query, evaluation and video runs kept side by side."""

from __future__ import annotations

import json
import time

import pytest

import main as cli
from pipeline.webreport import PAGE_SIZE
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
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    failures = browser.execute_script("return [...document.querySelectorAll('tr.failure')].map(r => r.textContent)")
    assert len(failures) == 2 and any("ds[2]" in f and "not a recognized image format" in f for f in failures)
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
        f"document.querySelector('.detail .query img').title === "
        f"window.__report.pages['gallery/' + Math.floor({first} / {PAGE_SIZE})].items[{first} % {PAGE_SIZE}].file",
    )
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    # the filter searches every page's names
    browser.execute_script(
        "const f = document.querySelector('[data-role=filter]'); f.value = 'img_0012';"
        "f.dispatchEvent(new Event('input'))"
    )
    wait(browser, "document.querySelector('.tools .sub').textContent.includes('matching')")
    names = browser.execute_script(
        "return [...document.querySelectorAll('[data-role=grid] .tile .cap[title]')].map(c => c.title)"
    )
    assert names and all("img_0012" in n for n in names) and len(names) == 10  # img_00120 .. img_00129
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
    assert browser.execute_script("return document.querySelectorAll('#query .pics img').length") == 1
    browser.execute_script("document.getElementById('evaluation').scrollIntoView()")
    assert wait(browser, VISIBLE_IMAGES_LOADED)
    assert console_errors(browser) == []
    sections = json.loads((out / "outputs" / "report" / "sections.js").read_text().split("(", 1)[1].rsplit(")", 1)[0])
    assert sections == ["gallery", "query", "evaluation"]

"""Metadata kept and filtered on (issue 27, points 1 and 2): the dataset's plain columns stored
beside the store, typed and keyed by source_row; --update keeps them current; --filter runs inside
the search, giving k results whenever k items match, checked against a brute-force search over the
matching rows; every hit carries its values."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import main as cli
from pipeline import Catalog
from pipeline.errors import CacheMismatchError
from pipeline.retrieval import topk_neighbours
from tests import assets
from tests.helpers import row_files, run

N = 40
CATEGORIES = ["dress", "top", "skirt", "coat"]


def shop(n: int = N, price_of: dict[int, float] | None = None) -> dict[str, list]:
    rng = np.random.default_rng(11)
    price = [float(round(x, 2)) for x in rng.uniform(5, 150, n)]
    for i, p in (price_of or {}).items():
        price[i] = p
    return {
        "category": [CATEGORIES[i % 4] for i in range(n)],
        "colour": [["red", "blue", "black"][i % 3] for i in range(n)],
        "price": price,
        "stock": [int(i % 7) for i in range(n)],
        "item_id": [f"P{i // 2:03d}" for i in range(n)],  # two photos a product
    }


def write_shop(folder: Path, n: int = N, price_of: dict[int, float] | None = None) -> Path:
    cells = [assets.jpeg_bytes(40 + i % 5 * 4, 56, seed=300 + i) for i in range(n)]
    return assets.write_parquet_dataset(folder, cells, extra=shop(n, price_of))


def args(data: Path, onnx: Path, out: Path, *more: object) -> list[str]:
    return [str(a) for a in ["--dataset", data, "--onnx", onnx, "--output-dir", out, "--limit", "0",
                             "--max-result-images", "0", *more]]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_onnx) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("meta")
    data = write_shop(root / "shop")
    out = root / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    return data, out


def test_the_plain_columns_are_kept_typed_and_keyed_by_row(built):
    data, out = built
    table = pq.read_table(out / "embeddings" / "metadata.parquet")
    assert table.column_names == ["source_row", "category", "colour", "price", "stock", "item_id"]
    assert table.column("source_row").to_pylist() == list(range(N))
    assert str(table.schema.field("price").type) == "double" and str(table.schema.field("stock").type) == "int64"
    assert table.column("price").to_pylist() == shop()["price"]


def brute_force(cat: Catalog, query: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    ids = np.flatnonzero(mask)
    if not len(ids):
        return []
    nb = topk_neighbours(query[None, :], cat.embeddings[ids], min(k, len(ids)))
    return [int(ids[j]) for j in nb.indices[0] if j >= 0]


@pytest.mark.parametrize(
    "text, truth",
    [
        ("category = 'dress'", lambda m: m["category"] == "dress"),
        ("category = 'dress' AND price < 60", lambda m: m["category"] == "dress" and m["price"] < 60),
        ("colour IN ('red', 'black') OR stock >= 6", lambda m: m["colour"] in ("red", "black") or m["stock"] >= 6),
        ("item_id = 'P003'", lambda m: m["item_id"] == "P003"),
        ("price > 1000", lambda m: False),
    ],
)
def test_a_filtered_search_is_the_exact_search_over_the_matching_items(built, text, truth):
    _, out = built
    cat = Catalog.open(out)
    mask = np.array([truth(cat.searcher.metadata.values(j)) for j in range(len(cat))])
    for k in (1, 5, 12):
        for q in (0, 17, 33):
            hits = cat.search_vectors(cat.embeddings[q], k=k, filter=text)[0]
            assert len(hits) == min(k, int(mask.sum()))  # k whenever k match; all of them when fewer
            assert [h.row for h in hits] == brute_force(cat, cat.embeddings[q], mask, k)
            assert all(truth(h.meta) for h in hits)
            assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    hits = cat.neighbours(0, k=3, filter=text)
    assert all(truth(h.meta) and h.row != 0 for h in hits)


def test_every_hit_carries_its_values(built):
    _, out = built
    hit = Catalog.open(out).search_vectors(Catalog.open(out).embeddings[5], k=1)[0][0]
    assert hit.row == 5 and hit.meta == {k: v[5] for k, v in shop().items()}


def test_query_results_carry_the_metadata_and_honour_the_filter(built, tiny_onnx, tmp_path):
    data, out = built
    query = tmp_path / "q.jpg"
    query.write_bytes(assets.jpeg_bytes(44, 56, seed=305))
    assert run(*args(data, tiny_onnx, out, "--query-image", query, "--top-k", "4",
                     "--filter", "category = 'top' AND price < 100")) == 0
    with open(out / "retrieval_results" / "queries" / "query_results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0])[-5:] == ["category", "colour", "price", "stock", "item_id"]
    assert len(lines) == 4 and all(r["category"] == "top" and float(r["price"]) < 100 for r in lines)
    prices = {f"{v:.6f}": v for v in shop()["price"]}
    assert all(r["price"] == repr(prices[f"{float(r['price']):.6f}"]) for r in lines)  # as it is, not to 6 places
    assert all(len(r["distance"].split(".")[1]) == 6 for r in lines)


def test_a_metadata_float_is_written_as_it_is_and_a_nan_as_missing(tmp_path):
    from pipeline.retrieval import write_neighbours_csv

    path = tmp_path / "t.csv"
    write_neighbours_csv(path, iter([("q", 1, 0.12345678, 1e-07, float("nan"), 2.5)]),
                         columns=("query", "rank", "distance", "tiny", "missing", "price"))
    assert path.read_text().splitlines()[1] == "q,1,0.123457,1e-07,,2.5"


@pytest.mark.parametrize(
    "text, said",
    [
        ("colour = 'red' AND", "--filter: expected a column name, found the end of the filter (at character 19)"),
        ("size = 'M'",
         "--filter: unknown column 'size'; the catalogue's columns are: category, colour, price, stock, item_id"),
        ("price = 'cheap'", "type mismatch: 'price' is a number column, compared with text 'cheap'"),
    ],
)
def test_a_bad_filter_is_a_clear_message_and_exit_2(built, tiny_onnx, text, said, capsys):
    data, out = built
    code = cli.main([*args(data, tiny_onnx, out, "--query-text", "red dress", "--filter", text)])
    err = capsys.readouterr().err
    assert code == 2 and said in err and "Traceback" not in err


def test_chosen_columns_and_a_missing_one(tiny_onnx, tmp_path, capsys):
    data = write_shop(tmp_path / "shop", n=8)
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out, "--meta-columns", "price,category")) == 0
    assert pq.read_table(out / "embeddings" / "metadata.parquet").column_names == ["source_row", "price", "category"]
    capsys.readouterr()
    assert run(*args(data, tiny_onnx, tmp_path / "out2", "--meta-columns", "price,size")) == 2  # as --group-by
    err = capsys.readouterr().err
    assert "--meta-columns: dataset" in err and "has no column 'size'; its columns are" in err
    assert not (tmp_path / "out2" / "embeddings").exists()  # refused before the build


def test_an_update_keeps_the_metadata_current(tiny_onnx, tmp_path):
    data = write_shop(tmp_path / "shop")
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    write_shop(tmp_path / "shop", price_of={3: 1.5})  # same photos, a new price
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    table = pq.read_table(out / "embeddings" / "metadata.parquet")
    assert table.column("price").to_pylist()[3] == 1.5
    hits = Catalog.open(out).search_vectors(Catalog.open(out).embeddings[3], k=5, filter="price < 2")[0]
    assert [h.source_row for h in hits] == [3]
    # a table left from before an update's switch (stamped with another store) is refused, and the
    # update run again rewrites it
    path = out / "embeddings" / "metadata.parquet"
    old = pq.read_table(path)
    pq.write_table(old.replace_schema_metadata({b"fashion.manifest_sha256": b"0" * 64}), path)
    with pytest.raises(CacheMismatchError, match="written for another version of the store .* --update again"):
        Catalog.open(out)
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    assert Catalog.open(out).searcher.metadata.values(3)["price"] == 1.5


def test_the_search_page_filters_with_controls_built_from_the_columns(built, tiny_onnx, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from pipeline.config import config_from_flags
    from pipeline.serve import SearchService
    from tests.test_serve import serving
    from tests.test_webreport import console_errors, viewport, wait

    _, out = built
    cfg = config_from_flags(vars(cli.build_parser().parse_args(
        ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve", "--top-k", "6"])))
    with serving(SearchService.load(cfg)) as url:
        info = httpx.get(url + "/api/info").json()
        assert {c["name"]: c["kind"] for c in info["columns"]} == {
            "category": "text", "colour": "text", "price": "number", "stock": "number", "item_id": "text"}
        assert next(c for c in info["columns"] if c["name"] == "category")["values"] == sorted(CATEGORIES)
        # the API: a filter in the query, the metadata in each hit, a bad filter is a 422 with its message
        body = httpx.post(url + "/api/text", json={"text": "a coat", "k": 4, "filter": "category = 'coat'"}).json()
        assert len(body["results"]) == 4 and all(r["meta"]["category"] == "coat" for r in body["results"])
        bad = httpx.post(url + "/api/text", json={"text": "a coat", "filter": "category = coat"})
        assert bad.status_code == 422 and "texts are quoted" in bad.json()["detail"]
        evil = httpx.post(url + "/api/text", json={"text": "x", "filter": "__import__('os').system('false')"})
        assert evil.status_code == 422  # parsed, never run
        # a picture and a text as one query, filtered
        both = httpx.post(url + "/api/image", files={"file": ("look.jpg", assets.jpeg_bytes(44, 56, seed=3))},
                          data={"text": "in red", "filter": "colour = 'red'", "k": "3"}).json()
        assert [q["label"] for q in both["queries"]] == ["look.jpg + “in red”"]
        assert len(both["queries"][0]["results"]) == 3
        assert all(r["meta"]["colour"] == "red" for r in both["queries"][0]["results"])
        # the page: choose skirt, a price bound, search; every tile is a skirt under the bound
        browser.get(url + "/")
        wait(browser, "document.querySelectorAll('#filter-controls [data-column]').length === 7")
        from pipeline.filters import parse_filter  # the page names any column as the parser reads it back

        for name in ("price", "colour name", 'say "hi"', "a`b", 'both " and `', "and", "größe"):
            written = browser.execute_script("return column(arguments[0])", name)
            assert parse_filter(f"{written} = 1").column == name, (name, written)
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-column=category]")).select_by_visible_text("skirt")
        browser.find_element(By.CSS_SELECTOR, "input[data-column=price][data-bound=max]").send_keys("120")
        browser.find_element(By.ID, "text").send_keys("a skirt")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.querySelectorAll('#results .tile[data-file]').length > 0")
        metas = browser.execute_script(  # each tile's values, those a tap away too
            "return [...document.querySelectorAll('#results .tile .meta')].map(m => "
            "Object.fromEntries([...m.querySelectorAll('div')].map(d => [d.firstChild.textContent.trim(), "
            "d.lastChild.textContent])))")
        assert metas and all(m["category"] == "skirt" for m in metas)
        assert all(float(m["price"].replace(",", "")) <= 120 for m in metas)
        # each value under its column's name, the price first (a product's name would come before it)
        first = browser.execute_script("return [...document.querySelectorAll('#results .tile .meta > div')]"
                                       ".slice(0, 4).map(d => d.textContent)")
        assert first[0].startswith("price ") and any(line.startswith("category skirt") for line in first)
        said = browser.execute_script("return document.getElementById('status').textContent")
        assert "· filter category = 'skirt' AND price <= 120 ·" in said
        browser.save_screenshot(str(tmp_path / "filtered.png"))
        # a filter that matches nothing says so, with no stale results under it
        browser.find_element(By.ID, "filter-text").send_keys("stock > 100")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.getElementById('status').textContent.startsWith('No item matches the filter')")
        assert browser.execute_script("return document.querySelectorAll('#results .tile[data-file]').length") == 0
        assert not console_errors(browser)
        # a filter the server refuses: its reason, and the filter with a caret under the place, in fixed width
        browser.find_element(By.ID, "filter-text").send_keys(" OR price < fifty")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.getElementById('status').textContent.startsWith('Could not search')")
        said = browser.execute_script("return document.getElementById('status').firstChild.textContent")
        assert said.startswith("Could not search: in the filter, expected a value, found 'fifty'"), said
        caret = browser.execute_script("return document.querySelector('#status pre').textContent").split("\n")
        assert caret[0].strip().endswith("(stock > 100 OR price < fifty)")
        assert caret[1].index("^") == caret[0].index("fifty")
        browser.find_element(By.ID, "filter-text").clear()
        # typed alone, a filter the columns refuse is quoted as typed, the caret under its own place
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-column=category]")).select_by_visible_text("any")
        browser.find_element(By.CSS_SELECTOR, "input[data-column=price][data-bound=max]").clear()
        browser.find_element(By.ID, "filter-text").send_keys("colour = 'red' AND price < 'cheap'")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.getElementById('status').textContent.includes('type mismatch')")
        caret = browser.execute_script("return document.querySelector('#status pre').textContent").split("\n")
        assert caret[0].strip() == "colour = 'red' AND price < 'cheap'", caret
        assert caret[1].index("^") == caret[0].index("price")
        browser.find_element(By.ID, "filter-text").clear()
        assert [e for e in console_errors(browser) if "status of 422" not in e] == []  # the refusal's own, read off
        # on a phone, a menu of long values (a shop's product titles) stays within the screen
        with viewport(browser, 390, 844):
            browser.execute_script(
                "const s = document.querySelector('select[data-column=category]');"
                "s.append(new Option('a very long product title of a summer dress with white polka dots, "
                "a belt and pockets'))")
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        # each range box holds its placeholder whole, beside the number input's spinner (about 15 px)
        room = browser.execute_script(
            "return [...document.querySelectorAll('input.num')].map(i => { const s = getComputedStyle(i);"
            " const c = document.createElement('canvas').getContext('2d'); c.font = `${s.fontSize} ${s.fontFamily}`;"
            " return i.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight) - 16"
            " - c.measureText(i.placeholder).width; })")
        assert len(room) == 4 and min(room) >= 0, room


def test_group_by_gives_one_result_per_product_filled_until_k(built):
    _, out = built
    cat = Catalog.open(out, group_by="item_id")
    plain = Catalog.open(out)
    for q in (0, 9, 26):
        hits = cat.search_vectors(cat.embeddings[q], k=6)[0]
        products = [h.meta["item_id"] for h in hits]
        assert len(hits) == 6 and len(set(products)) == 6  # six products, not six photos
        # each product scored by its best photo: the first photo of each product in the plain ranking
        ranking = plain.search_vectors(plain.embeddings[q], k=N)[0]
        best: dict[str, int] = {}
        for h in ranking:
            best.setdefault(h.meta["item_id"], h.row)
        assert [h.row for h in hits] == list(best.values())[:6]
    # an item's neighbours are never other photos of its product
    for item in (0, 1, 30):
        own = cat.searcher.metadata.values(item)["item_id"]
        nb = cat.neighbours(item, k=5)
        assert len(nb) == 5 and own not in [h.meta["item_id"] for h in nb]
    # with a filter: products among the matching items
    hits = cat.search_vectors(cat.embeddings[4], k=30, filter="category = 'dress'")[0]
    assert len(hits) == 10 and len({h.meta["item_id"] for h in hits}) == 10  # 10 dresses, each its own product


def test_group_by_in_the_gallery_run_and_its_messages(built, tiny_onnx, capsys):
    data, out = built
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--use-embeddings", "--group-by", "item_id")) == 0
    said = capsys.readouterr().out
    assert "--group-by item_id: 20 products among 40 items" in said
    # with a filter, the products counted are the filter's (the count of all read as what a search could return)
    assert cli.main(args(data, tiny_onnx, out, "--query-text", "red", "--group-by", "item_id", "--top-k", "30",
                         "--filter", "category = 'dress'")) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert ("--group-by item_id: 10 products among the 10 items --filter keeps (20 among all 40); a search returns "
            "at most 10") in said, said
    with open(out / "retrieval_results" / "neighbours.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    product = {f: f"P{i // 2:03d}" for i, f in row_files(out).items()}
    for query in {r["query_file"] for r in lines}:
        shown = [product[r["neighbour_file"]] for r in lines if r["query_file"] == query]
        assert len(shown) == 5 and len(set(shown)) == 5 and product[query] not in shown
    code = cli.main(args(data, tiny_onnx, out, "--query-text", "red", "--group-by", "size"))
    err = capsys.readouterr().err
    assert code == 2 and "--group-by: unknown column 'size'; the catalogue's columns are: category" in err
    # a gallery build is told before it embeds anything (a misspelt column cost the whole build before)
    fresh = out.parent / "never-built"
    code = cli.main(args(data, tiny_onnx, fresh, "--group-by", "size"))
    err = capsys.readouterr().err
    assert code == 2 and "--group-by: unknown column 'size'; the catalogue's columns are: category" in err
    assert not (fresh / "embeddings").exists()


def test_items_without_a_value_stand_alone(tiny_onnx, tmp_path, capsys):
    cells = [assets.jpeg_bytes(40, 56, seed=700 + i) for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={"item_id": ["A", "A", None, None, "B", "B"]})
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    cat = Catalog.open(out, group_by="item_id")
    hits = cat.search_vectors(cat.embeddings[0], k=10)[0]
    assert sorted(h.meta["item_id"] or f"none{h.row}" for h in hits) == ["A", "B", "none2", "none3"]
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, out, "--use-embeddings", "--group-by", "item_id")) == 0
    assert "2 item(s) have no value there; each stands as a product of its own" in capsys.readouterr().out


def test_the_gallery_run_filters_every_items_neighbours(built, tiny_onnx, capsys):
    """--filter on a gallery run: every item's neighbours among the items the filter keeps (the
    exact top-k over them, the item itself never), with --group-by too."""
    data, out = built
    capsys.readouterr()
    text = "category IN ('dress', 'coat') AND price < 120"
    assert cli.main(args(data, tiny_onnx, out, "--use-embeddings", "--filter", text, "--top-k", "4")) == 0
    said = capsys.readouterr().out
    truth = shop()
    keep = np.array([c in ("dress", "coat") and p < 120 for c, p in zip(truth["category"], truth["price"])])
    assert f"every item's neighbours among the {int(keep.sum())} of 40 items it keeps" in said
    with open(out / "retrieval_results" / "neighbours.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    cat = Catalog.open(out)
    row_of = {r.file: j for j, r in enumerate(cat.searcher.rows)}
    files = row_files(out)
    for item in range(N):
        shown = [row_of[r["neighbour_file"]] for r in lines if r["query_file"] == files[item]]
        others = keep.copy()
        others[item] = False
        assert shown == brute_force(cat, cat.embeddings[item], others, 4)
    assert not (out / "outputs" / "distance_matrix.npy").exists()  # all-pairs distances of other neighbours
    assert cli.main(args(data, tiny_onnx, out, "--use-embeddings", "--filter", "category = 'dress'",
                         "--group-by", "item_id", "--top-k", "3")) == 0
    with open(out / "retrieval_results" / "neighbours.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    product = {f: truth["item_id"][i] for i, f in files.items()}
    for query in {r["query_file"] for r in lines}:
        shown = [r["neighbour_file"] for r in lines if r["query_file"] == query]
        assert len(shown) == 3 and all(truth["category"][row_of[f]] == "dress" for f in shown)
        assert len({product[f] for f in shown}) == 3 and product[query] not in {product[f] for f in shown}


def test_a_gallery_runs_filter_is_checked_before_anything_is_embedded(tiny_onnx, tmp_path, capsys):
    data = write_shop(tmp_path / "shop", n=6)
    out = tmp_path / "out"
    code = cli.main(args(data, tiny_onnx, out, "--filter", "size = 'M'"))
    err = capsys.readouterr().err
    assert code == 2 and "--filter: unknown column 'size'" in err and "category, colour, price" in err
    assert not (out / "embeddings" / "embeddings.npy").exists()
    code = cli.main(args(data, tiny_onnx, out, "--filter", "price <"))
    assert code == 2 and "expected a value" in capsys.readouterr().err


def test_the_report_shows_each_items_metadata(built, tiny_onnx, browser):
    from selenium.webdriver.common.by import By

    from tests.test_webreport import console_errors, wait

    data, out = built
    assert run(*args(data, tiny_onnx, out, "--use-embeddings")) == 0
    browser.get((out / "outputs" / "report.html").as_uri())
    wait(browser, "document.querySelectorAll('[data-role=grid] .tile').length > 0")
    browser.find_elements(By.CSS_SELECTOR, "[data-role=grid] .tile")[7].click()
    wait(browser, "document.querySelector('[data-role=meta]') !== null")
    shown = browser.execute_script(
        "const d = document.querySelector('[data-role=meta]');"
        "return [...d.querySelectorAll('dt')].map((t, i) => [t.textContent, d.querySelectorAll('dd')[i].textContent])")
    assert dict(shown) == {k: str(v[7]) for k, v in shop().items()}
    # the grid's filter finds items by their values too: a product id, a category
    item_id = shop()["item_id"][7]
    browser.execute_script(f"const f = document.querySelector('[data-role=filter]'); f.value = '{item_id}';"
                           "f.dispatchEvent(new Event('input'));")
    wait(browser, "document.querySelector('.tools .sub').textContent.includes('matching')")
    found = browser.execute_script(
        "return [...document.querySelectorAll('[data-role=grid] > .tile')].map(t => +t.dataset.item)")
    assert 7 in found and len(found) == sum(v == item_id for v in shop()["item_id"])
    assert browser.execute_script("return document.querySelector('[data-role=filter]').placeholder") == (
        "Filter by name or value…")
    # and by a price as the details show it (a decimal), where only texts and whole numbers were found
    price = shown[[k for k, _ in shown].index("price")][1]
    browser.execute_script(f"const f = document.querySelector('[data-role=filter]'); f.value = '{price}';"
                           "f.dispatchEvent(new Event('input'));")
    wait(browser, f"document.querySelector('.tools .sub').textContent.includes('matching') && "
                  f"document.querySelector('[data-role=filter]').value === '{price}'")
    found = browser.execute_script(
        "return [...document.querySelectorAll('[data-role=grid] > .tile')].map(t => +t.dataset.item)")
    assert 7 in found
    assert not console_errors(browser)


def test_a_value_is_indexed_as_the_report_shows_it():
    from pipeline.webreport import shown_value

    assert [shown_value(v) for v in (61.42, 20.0, True, False, 7, "P001", 1e22, 1e-05, 2.5e-07, 1.5e16)] == [
        "61.42", "20", "true", "false", "7", "P001", "1e+22", "0.00001", "2.5e-7", "15000000000000000"]


def test_group_by_per_query_in_the_api_and_on_the_page(built, tiny_onnx, browser, tmp_path):
    """A query chooses its own grouping (the API's group_by, the page's "One result per" menu),
    leaving the server's and other queries' as they are."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from pipeline.config import config_from_flags
    from pipeline.serve import SearchService
    from tests.test_serve import serving
    from tests.test_webreport import console_errors, wait

    _, out = built
    cat = Catalog.open(out)
    grouped = cat.search_vectors(cat.embeddings[3], k=6, group_by="item_id")[0]
    assert len({h.meta["item_id"] for h in grouped}) == 6
    assert cat.searcher.grouped_by is None and len(cat.search_vectors(cat.embeddings[3], k=40)[0]) == 40
    assert cat.neighbours(3, k=4, group_by="item_id")[0].meta["item_id"] != "P001"  # never its own product
    cfg = config_from_flags(vars(cli.build_parser().parse_args(
        ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve", "--top-k", "8", "--group-by", "item_id"])))
    with serving(SearchService.load(cfg)) as url:
        assert httpx.get(url + "/api/info").json()["group_by"] == "item_id"
        by_server = httpx.post(url + "/api/text", json={"text": "a coat", "k": 8}).json()["results"]
        by_photo = httpx.post(url + "/api/text", json={"text": "a coat", "k": 8, "group_by": ""}).json()["results"]
        assert len({r["meta"]["item_id"] for r in by_server}) == 8
        assert len({r["meta"]["item_id"] for r in by_photo}) < 8  # two photos a product: some come together
        # the form of a picture query: "(photo)" means each photo, as "" does in JSON (an empty form
        # field would read as absent, the server's item_id)
        picture = {"file": ("q.jpg", (out / "images" / by_photo[0]["file"]).read_bytes(), "image/jpeg")}
        form = httpx.post(url + "/api/image", files=picture, data={"k": "8", "group_by": "(photo)"}).json()
        assert len({r["meta"]["item_id"] for r in form["queries"][0]["results"]}) < 8
        form = httpx.post(url + "/api/image", files=picture, data={"k": "8", "group_by": ""}).json()
        assert len({r["meta"]["item_id"] for r in form["queries"][0]["results"]}) == 8
        bad = httpx.post(url + "/api/text", json={"text": "a coat", "group_by": "size"})
        assert bad.status_code == 422 and "--group-by: unknown column 'size'" in bad.json()["detail"]
        browser.get(url + "/")
        wait(browser, "document.querySelectorAll('#group-by option').length === 6")
        assert Select(browser.find_element(By.ID, "group-by")).first_selected_option.text == "item_id"
        Select(browser.find_element(By.ID, "group-by")).select_by_visible_text("photo")
        browser.find_element(By.ID, "text").send_keys("a coat")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 8")
        files = browser.execute_script("return [...document.querySelectorAll('#results .tile[data-file]')]"
                                       ".map(t => t.dataset.file)")
        assert files == [r["file"] for r in by_photo]
        Select(browser.find_element(By.ID, "group-by")).select_by_visible_text("category")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 4")  # four categories
        browser.save_screenshot(str(tmp_path / "grouped.png"))
        assert not console_errors(browser)


def test_shards_that_disagree_on_a_columns_type_or_lack_one(tmp_path, caplog):
    """Shards written apart: an int32 and an int64 price are one int64 column, a shard without a
    column (the first one too) gives nulls there; a text in one and a number in another is a clear
    refusal."""
    import pyarrow as pa

    from pipeline.dataset import DatasetSpec, check_meta_columns, read_metadata
    from pipeline.errors import PipelineError

    def shard(folder: Path, name: str, **columns) -> None:
        (folder / "data").mkdir(parents=True, exist_ok=True)
        n = len(next(iter(columns.values())))
        image = pa.array([{"bytes": assets.jpeg_bytes(16, 16, seed=i), "path": None} for i in range(n)])
        pq.write_table(pa.table({"image": image, **columns}), folder / "data" / name)

    good = tmp_path / "good"
    shard(good, "train-00000-of-00002.parquet", price=pa.array([1, 2], pa.int32()), colour=pa.array(["red", "tan"]))
    shard(good, "train-00001-of-00002.parquet", price=pa.array([3], pa.int64()))
    table = read_metadata(DatasetSpec(name=str(good)))
    assert table.column("source_row").to_pylist() == [0, 1, 2]
    assert table.column("price").to_pylist() == [1, 2, 3] and str(table.schema.field("price").type) == "int64"
    assert table.column("colour").to_pylist() == ["red", "tan", None]
    # the first shard lacks a column, or holds only nulls in it (arrow's null type): kept, from the others
    late = tmp_path / "late"
    shard(late, "train-00000-of-00003.parquet", price=pa.array([1, 2]))
    shard(late, "train-00001-of-00003.parquet", price=pa.array([3]), colour=pa.array([None], pa.null()))
    shard(late, "train-00002-of-00003.parquet", price=pa.array([4]), colour=pa.array(["red"]))
    table = read_metadata(DatasetSpec(name=str(late)))
    assert table.column("colour").to_pylist() == [None, None, None, "red"]
    assert str(table.schema.field("colour").type) == "string"
    assert check_meta_columns(DatasetSpec(name=str(late)), ["colour"]).names == ["colour"]
    bad = tmp_path / "bad"
    shard(bad, "train-00000-of-00002.parquet", size=pa.array(["M", "L"]))
    shard(bad, "train-00001-of-00002.parquet", size=pa.array([40], pa.int64()))
    assert read_metadata(DatasetSpec(name=str(bad))).column_names == ["source_row"]  # left out, said
    # a column of lists (or structs) is not kept, and said by name
    listed = tmp_path / "listed"
    shard(listed, "train-00000-of-00001.parquet", tags=pa.array([["a"], ["b", "c"]]), price=pa.array([1, 2]))
    import logging

    with caplog.at_level(logging.INFO, logger="pipeline.dataset"):
        assert read_metadata(DatasetSpec(name=str(listed))).column_names == ["source_row", "price"]
    assert "metadata: 'tags' not kept: a column must hold one plain value a row" in caplog.text
    assert "'image'" not in caplog.text
    with pytest.raises(PipelineError, match=r"--meta-columns: the parquet files of .* disagree on the type of 'size' "
                                            r"\(string in train-00000-of-00002.parquet; int64 in train-00001"):
        read_metadata(DatasetSpec(name=str(bad)), ["size"])


def test_a_dataset_column_named_source_row_is_not_taken_for_the_key(tiny_onnx, tmp_path, capsys):
    cells = [assets.jpeg_bytes(40, 56, seed=800 + i) for i in range(4)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={"source_row": [9, 8, 7, 6],
                                                                        "colour": ["a", "b", "c", "d"]})
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    table = pq.read_table(out / "embeddings" / "metadata.parquet")
    assert table.column_names == ["source_row", "colour"] and table.column("source_row").to_pylist() == [0, 1, 2, 3]
    capsys.readouterr()
    assert cli.main(args(data, tiny_onnx, tmp_path / "o2", "--meta-columns", "source_row")) == 2
    assert "'source_row' is the name the store keys its rows by" in capsys.readouterr().err


def test_catalogue_columns_named_as_the_results_own_get_a_prefix_in_the_csv(tiny_onnx, tmp_path):
    """A catalogue with `kind` and `rank` columns: query_results.csv names them meta_kind and
    meta_rank, so no header is there twice and the query's own kind and rank are read back."""
    cells = [assets.jpeg_bytes(40, 56, seed=820 + i) for i in range(6)]
    data = assets.write_parquet_dataset(tmp_path / "shop", cells, extra={"kind": ["dress"] * 6,
                                                                        "rank": list(range(10, 16))})
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out)) == 0
    assert run(*args(data, tiny_onnx, out, "--query-text", "a dress", "--top-k", "3")) == 0
    with open(out / "retrieval_results" / "queries" / "query_results.csv", newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        lines = list(csv.DictReader(f))
    assert header == ["query", "kind", "rank", "gallery_file", "row", "distance", "gallery_source", "meta_kind",
                      "meta_rank"]
    assert [(r["kind"], r["rank"], r["meta_kind"]) for r in lines] == [("text", str(k), "dress") for k in (1, 2, 3)]
    from pipeline.store import read_manifest

    manifest = {r.index: r for r in read_manifest(out / "embeddings" / "manifest.csv")}
    assert all(r["gallery_source"] == manifest[int(r["row"])].source == f"{data}[{manifest[int(r['row'])].source_row}]"
               for r in lines)  # the user's name of the photo: a cell of the dataset, by its row
    assert all(10 <= int(r["meta_rank"]) <= 15 for r in lines)


def test_a_float32_value_is_the_decimal_it_was_written_as():
    """A float32 column's 19.99 is 19.99 in hits and query_results.csv, not 19.989999771118164; a
    missing value stays missing and a double column stays as it is."""
    import pyarrow as pa

    from pipeline.metadata import Metadata

    meta = Metadata(pa.table({"price": pa.array([19.99, None, 0.1], pa.float32()),
                              "exact": pa.array([0.1 + 0.2, 1.0, 2.5], pa.float64())}))
    assert [meta.values(j)["price"] for j in range(3)] == [19.99, None, 0.1]
    assert meta.values(0)["exact"] == 0.1 + 0.2


def test_a_dictionary_column_of_doubles_keeps_its_precision():
    """A dictionary-encoded column's width is its index's: its double values are not rounded to floats."""
    import pyarrow as pa

    from pipeline.metadata import Metadata

    values = pa.array([0.123456789012, 1234567.891]).dictionary_encode()
    assert Metadata(pa.table({"v": values})).values(0)["v"] == 0.123456789012
    assert Metadata(pa.table({"v": values})).values(1)["v"] == 1234567.891


def write_catalogue_folder(root: Path, metadata: str | None, name: str = "metadata.csv") -> Path:
    """A shop's pictures filed by category (dresses/, shirts/, and one at the root), with a metadata
    file at the root when given."""
    for i, rel in enumerate(["dresses/d1.jpg", "dresses/d2.jpg", "dresses/d10.jpg", "shirts/s1.jpg",
                             "shirts/s2.jpg", "top.jpg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(assets.jpeg_bytes(48, 64, seed=700 + i))
    if metadata is not None:
        (root / name).write_text(metadata)
    return root


def test_an_image_folder_keeps_its_subfolders_and_its_metadata_csv(tiny_onnx, tmp_path, capsys):
    """A folder of pictures has metadata too: each picture's subfolder (`folder`) and the columns of
    a metadata.csv beside them, as the Hugging Face ImageFolder reads it (file_name, then the
    columns), typed; aligned to the pictures as the folder is read (natural order). A picture
    without a line has missing values, a line naming no picture is left out, each said; filters and
    --group-by work on them; an update reads the file as it is now."""
    data = write_catalogue_folder(tmp_path / "cat", (
        "file_name,price,product_id,in_sale\n"
        "dresses/d1.jpg,39.5,D1,true\n./dresses/d2.jpg,45,D1,false\ndresses/d10.jpg,80,D2,false\n"
        "shirts/s1.jpg,15,S1,false\nshirts/gone.jpg,10,S9,true\ntop.jpg,99,T1,false\n"
    ))
    out = tmp_path / "out"
    assert run(*args(data, tiny_onnx, out, "--group-by", "product_id")) == 0  # read before the build and after
    said = capsys.readouterr().err
    assert said.count("1 line(s) name no picture of the folder, left out ('shirts/gone.jpg')") == 1
    assert said.count("1 picture(s) have no line ('shirts/s2.jpg' first): their values are missing") == 1
    table = pq.read_table(out / "embeddings" / "metadata.parquet")
    assert table.column_names == ["source_row", "folder", "price", "product_id", "in_sale"]
    assert [str(t) for t in table.schema.types[1:]] == ["string", "double", "string", "bool"]
    sources = {int(r["source_row"]): r["source"] for r in csv.DictReader(open(out / "embeddings" / "manifest.csv"))}
    got = {sources[r]: (f, p, pid) for r, f, p, pid in zip(*(table.column(c).to_pylist() for c in
                                                           ("source_row", "folder", "price", "product_id")))}
    assert got == {
        "dresses/d1.jpg": ("dresses", 39.5, "D1"), "dresses/d2.jpg": ("dresses", 45.0, "D1"),
        "dresses/d10.jpg": ("dresses", 80.0, "D2"), "shirts/s1.jpg": ("shirts", 15.0, "S1"),
        "shirts/s2.jpg": ("shirts", None, None), "top.jpg": ("", 99.0, "T1"),
    }
    catalog = Catalog.open(out)
    hits = catalog.search_vectors(catalog.embeddings[0], k=6, filter="folder = 'dresses' AND price < 50")[0]
    assert sorted(h.source for h in hits) == ["dresses/d1.jpg", "dresses/d2.jpg"]
    grouped = catalog.search_vectors(catalog.embeddings[0], k=6, filter="folder = 'dresses'", group_by="product_id")[0]
    assert sorted(h.meta["product_id"] for h in grouped) == ["D1", "D2"]
    # the file edited: the update reads it as it is now (no picture embedded again)
    (data / "metadata.csv").write_text("file_name,price,product_id,in_sale\nshirts/s2.jpg,12.5,S2,true\n")
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    catalog = Catalog.open(out)
    prices = {item.source: catalog.searcher.metadata.values(i)["price"] for i, item in enumerate(catalog.items)}
    assert prices == {source: 12.5 if source == "shirts/s2.jpg" else None for source in got}


@pytest.mark.parametrize(
    "metadata, name, said",
    [
        (None, "", "is a folder of pictures without subfolders or a metadata.csv (.jsonl, .parquet) with columns"),
        ("price\n10\n", "metadata.csv", "metadata.csv has no file_name column (each picture's path relative to"),
        ("file_name,price\na.jpg,1\na.jpg,2\n", "metadata.csv",
         "metadata.csv: 'a.jpg' is named by two lines (data lines 1 and 2)"),
        ("file_name,price\na.jpg,1\n,2\n", "metadata.csv", "metadata.csv: data line 2 has no file_name"),
        ("file_name,image\na.jpg,x\n", "metadata.csv", "its column 'image' is a name the store keeps for itself"),
        ("file_name,folder\na.jpg,x\n", "metadata.csv", "its column 'folder' is a name the store keeps for itself"),
        ("file_name,source_row,price\na.jpg,7,1\n", "metadata.csv",
         "its column 'source_row' is a name the store keeps for itself"),
        ("file_name,price,colour,colour\na.jpg,1,red,blue\n", "metadata.csv",
         "cannot be read as a table: the column(s) ['colour'] are named twice"),
        (b"file_name,price,name\na.jpg,1,caf\xe9\n", "metadata.csv", "the column(s) ['name'] are not UTF-8 text"),
        ('{"file_name": "a.jpg", "price": 1}\n{"file_name": "b.jpg", "price": "dear"}\n', "metadata.jsonl",
         "metadata.jsonl: cannot be read as a table"),
    ],
    ids=["none", "no-file-name", "twice", "empty-file-name", "image", "folder", "source-row", "same-name", "latin-1",
         "mixed-types"],
)
def test_a_folder_metadata_file_that_cannot_be_used_is_refused_before_the_build(
    metadata, name, said, tiny_onnx, tmp_path, capsys
):
    data = tmp_path / "flat"
    for i, rel in enumerate(["a.jpg", "b.jpg"]):
        data.mkdir(exist_ok=True)
        (data / rel).write_bytes(assets.jpeg_bytes(40, 40, seed=i))
    if metadata is not None:
        (data / name).write_bytes(metadata if isinstance(metadata, bytes) else metadata.encode())
    flags = ("--meta-columns", "price") if metadata is None else ()  # a plain run is refused as early
    assert run(*args(data, tiny_onnx, tmp_path / "out", *flags)) == 1
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out" / "embeddings").exists()


def _flat_folder(root: Path, n: int, metadata_csv: str) -> Path:
    """n pictures p0.jpg .. at the root, and its metadata.csv."""
    root.mkdir()
    for i in range(n):
        (root / f"p{i}.jpg").write_bytes(assets.jpeg_bytes(40, 40, seed=i))
    (root / "metadata.csv").write_text(metadata_csv)
    return root


def test_a_code_written_with_leading_zeros_stays_text(tmp_path):
    from pipeline.config import DatasetSpec
    from pipeline.dataset import folder_metadata

    data = _flat_folder(tmp_path / "cat", 3, "file_name,product_id,stock,size,price\n"
                        "p0.jpg,00123,4,7,05.99\np1.jpg,4567,0, 08,12\np2.jpg,,12,9,0.5\n")
    table = folder_metadata(data, DatasetSpec(name=str(data)))
    assert table.column("product_id").to_pylist() == ["00123", "4567", None]
    assert table.column("size").to_pylist() == ["7", " 08", "9"]  # as written, a space too
    assert table.column("stock").to_pylist() == [4, 0, 12]  # numbers where none is written so
    assert table.column("price").to_pylist() == [5.99, 12.0, 0.5]  # a price is a number however written


def test_empty_text_cells_are_missing_values_and_blank_ones_name_no_product(tmp_path):
    """As pandas (the Hugging Face reader's) reads a CSV: an empty cell, NA, null, None or <NA> is
    missing in a text column as in a number column; --group-by lets such items, and blank text of another
    source (a parquet's ""), stand alone, as --eval-id-column does."""
    import pyarrow as pa

    from pipeline.config import DatasetSpec
    from pipeline.dataset import folder_metadata
    from pipeline.metadata import product_labels

    data = _flat_folder(tmp_path / "shop", 7, "file_name,product_id,price\np0.jpg,P1,10\np1.jpg,None,None\n"
                        "p2.jpg,NA,12\np3.jpg,<NA>,\np4.jpg,P2,<NA>\np5.jpg,P2,15\np6.jpg,,16\n")
    table = folder_metadata(data, DatasetSpec(name=str(data)))
    assert table.column("product_id").to_pylist() == ["P1", None, None, None, "P2", "P2", None]
    assert table.column("price").to_pylist() == [10, None, 12, None, None, 15, 16]  # numbers: None, <NA> pandas' NA
    labels, missing = product_labels(table.column("product_id"))
    assert missing == 4 and len(set(labels.tolist())) == 6 and labels[4] == labels[5]
    labels, missing = product_labels(pa.chunked_array([["P1", "", " ", None, "P1"]]))
    assert missing == 3 and len(set(labels.tolist())) == 4 and labels[0] == labels[4]


def test_parquet_files_that_disagree_on_a_column_are_found_before_the_build(tiny_onnx, tmp_path, capsys):
    """Shards written apart, `price` a number in one and text in another: a plain build keeps the other
    columns and says why `price` is left out (it used to embed every photo, then fail on the
    metadata); --meta-columns price is refused before anything is embedded."""
    import pyarrow as pa

    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "cat" / "data").mkdir(parents=True)
    for k, prices in enumerate(([1, 2, 3], ["cheap", "dear", None])):
        pq.write_table(pa.table({
            "image": pa.array([{"bytes": assets.jpeg_bytes(40, 40, seed=3 * k + i), "path": None} for i in range(3)],
                              cell),
            "price": prices, "colour": ["red", "blue", "red"]}),
            tmp_path / "cat" / "data" / f"train-0000{k}-of-00002.parquet")
    data, out = tmp_path / "cat", tmp_path / "out"
    assert cli.main(args(data, tiny_onnx, out)) == 0
    assert capsys.readouterr().err.count("the parquet files disagree on the type of the column 'price' (int64 in "
                             "train-00000-of-00002.parquet; string in train-00001-of-00002.parquet)") == 1
    cat = Catalog.open(out)
    assert cat.searcher.metadata.columns == ["colour"] and len(cat) == 6
    assert cli.main(args(data, tiny_onnx, tmp_path / "out2", "--meta-columns", "price")) == 1
    assert f"--meta-columns: the parquet files of '{data}' disagree on the type of 'price'" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "embeddings").exists()


def test_an_image_folder_with_a_metadata_parquet_file_is_read_as_the_hugging_face_reader_reads_it(
        tiny_onnx, tmp_path, capsys):
    """metadata.parquet is the ImageFolder's third form: the folder is still a folder of pictures (not
    a parquet dataset without an image column, as it was taken for), its columns keep their types,
    and a folder with it beside a metadata.csv is refused as two files are."""
    import datetime

    import pyarrow as pa

    data = _split_folder(tmp_path / "cat", {"test/metadata.csv": "file_name,price\nc.jpg,9\n"})
    pq.write_table(pa.table({"file_name": ["images/b.jpg", "images/a.jpg"], "price": pa.array([12, 10], pa.int32()),
                             "added": [datetime.date(2024, 1, 2), datetime.date(2024, 1, 1)]}),
                   data / "train" / "metadata.parquet")
    out = tmp_path / "out"
    assert cli.main(args(data, tiny_onnx, out, "--filter", "price >= 10 AND added > '2024-01-01'")) == 0
    said = capsys.readouterr().out
    # the train split's pictures (its subfolder's), as that reader reads them: not test/'s, nor one at the root
    assert "rows 2, embedded 2" in said and "items matching the filter 1" in said
    table = Catalog.open(out).searcher.metadata.table
    assert table.column("price").to_pylist() == [10, 12]  # train/images/a.jpg, b.jpg
    assert table.column("folder").to_pylist() == ["images", "images"]
    assert cli.main(args(data, tiny_onnx, tmp_path / "test", "--split", "test")) == 0
    assert Catalog.open(tmp_path / "test").searcher.metadata.table.column("price").to_pylist() == [9]
    assert str(table.schema.field("added").type) == "date32[day]"
    (data / "train" / "metadata.csv").write_text("file_name,price\nimages/a.jpg,1\n")
    assert cli.main(args(data, tiny_onnx, tmp_path / "out2")) == 1
    assert f"{data}/train has both metadata.csv and metadata.parquet: keep one" in capsys.readouterr().err


def _split_folder(root: Path, files: dict[str, str]) -> Path:
    """Pictures filed as a Hugging Face ImageFolder with splits (train/images/, test/, one at the
    root), and the metadata files given (path -> text)."""
    for i, rel in enumerate(["train/images/a.jpg", "train/images/b.jpg", "test/c.jpg", "top.jpg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(assets.jpeg_bytes(40, 40, seed=710 + i))
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_metadata_files_in_subfolders_name_pictures_from_their_own_folder(tmp_path, caplog):
    """As the Hugging Face ImageFolder reads them: `train/metadata.csv` names `images/a.jpg` for
    train/images/a.jpg. Several files' columns go side by side (a column one lacks missing for its
    pictures; a code with leading zeros in one file and plain digits in another stays text; whole
    prices and decimal ones are numbers); a picture no file names has missing values, said."""
    import logging

    from pipeline.config import DatasetSpec
    from pipeline.dataset import folder_metadata, folder_metadata_files

    data = _split_folder(tmp_path / "cat", {
        "train/metadata.csv": "file_name,price,code,added\nimages/b.jpg,12.5,00456,2024-01-02\n"
                              "./images/a.jpg,10,00123,2024-01-01\nimages/gone.jpg,1,1,2024-01-01\n",
        "test/metadata.jsonl": '{"file_name": "c.jpg", "price": 9, "code": 789, "colour": "red", '
                               '"added": "2024-01-03"}\n',
        ".hidden/metadata.csv": "file_name,price\nx.jpg,1\n",  # a hidden folder is not read, as its pictures
    })
    assert [p.relative_to(data).as_posix() for p in folder_metadata_files(data)] == [
        "test/metadata.jsonl", "train/metadata.csv"]
    with caplog.at_level(logging.WARNING):
        table = folder_metadata(data, DatasetSpec(name=str(data)))
    assert table.column_names == ["source_row", "folder", "price", "code", "colour", "added"]
    rows = list(zip(*(table.column(c).to_pylist() for c in table.column_names[:-1])))
    assert rows == [(0, "test", 9.0, "789", "red"), (1, "", None, None, None),
                    (2, "train/images", 10.0, "00123", None), (3, "train/images", 12.5, "00456", None)]
    # the CSV's dates and the JSONL's date-times as one type
    assert [d and d.isoformat() for d in table.column("added").to_pylist()] == [
        "2024-01-03T00:00:00", None, "2024-01-01T00:00:00", "2024-01-02T00:00:00"]
    assert "2 metadata files of" in caplog.text and "1 picture(s) have no line ('top.jpg' first)" in caplog.text
    # a line naming no picture: said by its own file, as written there
    gone = f"{data}/train/metadata.csv: 1 line(s) name no picture of the folder, left out ('images/gone.jpg')"
    assert gone in caplog.text
    assert ("the column 'code' is whole numbers in test/metadata.jsonl and text in train/metadata.csv: read as text "
            "in every file") in caplog.text


@pytest.mark.parametrize("files, said", [
    ({"metadata.csv": "file_name,price\ntrain/images/a.jpg,1\n",
      "train/metadata.csv": "file_name,price\nimages/b.jpg,2\nimages/a.jpg,3\n"},
     "train/metadata.csv: 'train/images/a.jpg' is named by two lines ({root}/metadata.csv data line 1 and "
     "{root}/train/metadata.csv data line 2); each picture takes one"),
    ({"train/metadata.csv": "file_name,price\nimages/a.jpg,1.5\n",
      "test/metadata.csv": "file_name,price\nc.jpg,dear\n"},
     "the metadata files of {root} cannot be read as one table: their column 'price' is string in "
     "{root}/test/metadata.csv, double in {root}/train/metadata.csv"),
    ({"train/metadata.csv": "file_name,price,in_sale\nimages/a.jpg,10,true\n",  # price joins, in_sale not
      "test/metadata.csv": "file_name,price,in_sale\nc.jpg,9.5,soon\n"},
     "their column 'in_sale' is string in {root}/test/metadata.csv, bool in {root}/train/metadata.csv"),
    ({"train/metadata.csv": "file_name,price\nimages/a.jpg,1\n", "train/metadata.jsonl": '{"file_name": "x"}\n'},
     "{root}/train has both metadata.csv and metadata.jsonl: keep one"),
    ({"train/metadata.csv": "price\n1\n"}, "{root}/train/metadata.csv has no file_name column (each picture's "
     "path relative to {root}/train)"),
    ({"train/metadata.csv": "file_name,price\n../top.jpg,1\n"},  # inside the root, outside its file's folder
     "{root}/train/metadata.csv: data line 1: its file_name '../top.jpg' leaves its metadata file's folder; name "
     "that picture in a metadata file of a folder above it"),
    ({"metadata.csv": "file_name,price\ntop.jpg,1\n/top.jpg,2\n"},
     "{root}/metadata.csv: data line 2: its file_name '/top.jpg' is an absolute path"),
    ({"test/metadata.csv": "file_name,price\nC:\\data\\c.jpg,1\n"},
     "{root}/test/metadata.csv: data line 1: its file_name 'C:\\data\\c.jpg' is an absolute path"),
    ({"metadata.csv": "file_name,price\nfile://top.jpg,1\n"},
     "{root}/metadata.csv: data line 1: its file_name 'file://top.jpg' is a URL"),
    ({"train/metadata.csv": "file_name,price\nimages/..,1\n"},
     "{root}/train/metadata.csv: data line 1: its file_name 'images/..' names its metadata file's folder, not a "
     "picture"),
    ({"train/metadata.csv": "file_name,price\nimages/a.jpg,1\nimages/../images//a.jpg,2\n"},
     "'train/images/a.jpg' is named by two lines (data lines 1 and 2)"),  # one picture, however written
], ids=["named-twice", "types", "the-column-at-fault", "two-files", "no-file-name", "leaves-its-folder", "absolute",
        "absolute-windows", "url", "its-own-folder", "named-twice-as-normalised"])
def test_metadata_files_in_subfolders_that_cannot_be_used_are_refused(files, said, tmp_path):
    from pipeline.config import DatasetSpec
    from pipeline.dataset import folder_metadata
    from pipeline.errors import PipelineError

    data = _split_folder(tmp_path / "cat", files)
    with pytest.raises(PipelineError) as e:
        folder_metadata(data, DatasetSpec(name=str(data)))
    assert said.format(root=data) in str(e.value)


def test_file_names_are_normalised_as_the_hugging_face_image_folder_does(tmp_path, caplog):
    """`./`, doubled or back slashes and `x/..` inside a file's own folder name the picture they lead to."""
    import logging

    from pipeline.config import DatasetSpec
    from pipeline.dataset import folder_metadata

    data = _split_folder(tmp_path / "cat", {
        "train/metadata.csv": "file_name,price\nimages//b.jpg,2\n./old/../images/./a.jpg,1\n",
        "metadata.csv": "file_name,price\ntest\\c.jpg,3\n",
    })
    with caplog.at_level(logging.WARNING):
        table = folder_metadata(data, DatasetSpec(name=str(data)))
    assert table.column("price").to_pylist() == [3, None, 1, 2]  # test/c.jpg, top.jpg, train/images/a.jpg, b.jpg
    assert "name no picture" not in caplog.text and "1 picture(s) have no line ('top.jpg' first)" in caplog.text


def test_a_folder_without_subfolders_or_metadata_says_how_to_add_some(tiny_onnx, tmp_path, capsys):
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(2):
        (data / f"p{i}.jpg").write_bytes(assets.jpeg_bytes(40, 40, seed=i))
    assert cli.main(args(data, tiny_onnx, tmp_path / "out")) == 0
    said = capsys.readouterr().out
    assert f"metadata: none ({data} is a folder of pictures without subfolders or a metadata.csv" in said
    assert not (tmp_path / "out" / "embeddings" / "metadata.parquet").exists()


@pytest.mark.parametrize("damaged", [0, 1], ids=["first-file", "second-file"])
def test_a_parquet_file_cut_short_is_named_not_an_unexpected_error(damaged, tiny_onnx, tmp_path, capsys):
    """A shard whose copy was cut short: the run stops with the file named and what to do, whether
    it is the first file (checked before the build) or a later one (met as the build reads it)."""
    import pyarrow as pa

    (tmp_path / "cat" / "data").mkdir(parents=True)
    files = [tmp_path / "cat" / "data" / f"train-0000{k}-of-00002.parquet" for k in range(2)]
    for k, f in enumerate(files):
        pq.write_table(pa.table({"image": [{"bytes": assets.jpeg_bytes(40, 40, seed=k), "path": None}]}), f)
    files[damaged].write_bytes(files[damaged].read_bytes()[:300])
    assert cli.main(args(tmp_path / "cat", tiny_onnx, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert f"error: {files[damaged]}: cannot be read as a parquet file (" in err
    assert "copy or download it again" in err and "unexpected" not in err


def test_a_parquet_dataset_named_metadata_parquet_is_refused_with_what_to_rename(tiny_onnx, tmp_path, capsys):
    """A folder holding only a parquet dataset that happens to be named metadata.parquet is read as
    an image folder's metadata, as the Hugging Face ImageFolder reads it: the refusal says that the
    file holds pictures itself and how to have it read as a dataset, not only that file_name is missing."""
    ds = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 40, seed=i) for i in range(3)])
    data = tmp_path / "folder"
    data.mkdir()
    (ds / "data" / "train-00000-of-00001.parquet").rename(data / "metadata.parquet")
    assert run(*args(data, tiny_onnx, tmp_path / "out")) == 1
    said = capsys.readouterr().err
    assert f"{data}/metadata.parquet holds pictures itself (column 'image'): it is a parquet dataset" in said
    assert "rename it, e.g. to data/train-00000-of-00001.parquet, to read it as a dataset" in said
    (data / "data").mkdir()
    (data / "metadata.parquet").rename(data / "data" / "train-00000-of-00001.parquet")
    assert run(*args(data, tiny_onnx, tmp_path / "out")) == 0  # renamed as said, it is read


def test_an_id_column_for_an_image_folder_is_a_usage_error_that_says_what_to_do(tiny_onnx, tmp_path, capsys):
    """--id-column names a column of a parquet or saved dataset; a folder's photos are known by their
    content: exit 2 (a request that cannot work as given), before anything is embedded."""
    data = _flat_folder(tmp_path / "flat", 2, "file_name,item_id\np0.jpg,A\np1.jpg,B\n")
    assert cli.main(args(data, tiny_onnx, tmp_path / "out", "--id-column", "item_id")) == 2
    err = capsys.readouterr().err
    assert f"{data} is a folder of images: --id-column takes a column of a parquet or saved dataset" in err
    assert "without it, --update knows each photo by its content" in err
    assert not (tmp_path / "out" / "embeddings").exists()


def test_the_rows_whose_values_changed_are_counted_missing_and_nan_alike():
    import pyarrow as pa

    from pipeline.metadata import changed_rows

    old = pa.table({"source_row": [0, 1, 2, 3], "price": [1.0, float("nan"), None, 4.0], "name": ["a", "b", None, "d"]})
    new = pa.table({"source_row": [0, 1, 2, 4], "price": [1.5, float("nan"), None, 9.0], "name": ["a", "b", None, "e"]})
    assert changed_rows(old, new) == 1  # row 0's price; NaN and missing are as they were; row 4 is new, 3 gone
    assert changed_rows(old, new.drop_columns(["name"])) is None  # a column gone
    assert changed_rows(old, new.set_column(1, "price", pa.array([1, 2, 3, 4]))) is None  # another type
    # an update's kept photos, renumbered: row 0 removed moves every later photo up one; only the price of
    # the photo at 2 (now 1) changed. Matched by row number, every moved photo counted (3)
    moved = pa.table({"source_row": [0, 1, 2], "price": [float("nan"), 7.0, 4.0], "name": ["b", None, "d"]})
    assert changed_rows(old, moved) == 3
    assert changed_rows(old, moved, {1: 0, 2: 1, 3: 2}) == 1
    assert changed_rows(old, moved.slice(0, 2), {1: 0, 2: 1}) == 1  # a photo not kept: not compared

"""--serve on 127.0.0.1: queries through the page in Chromium equal --query-text/--query-image on the
same cache, bad uploads get a 4xx without harming the next query, and a bounded load test."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import main as cli
from pipeline.config import config_from_flags
from pipeline.serve import MAX_UPLOAD_BYTES, SearchService, create_app
from tests import assets
from tests.helpers import file_of, free_port
from tests.test_images import png_header_only
from tests.test_webreport import console_errors, wait


@contextmanager
def serving(service: SearchService):
    """The app over a loaded service on a free port of 127.0.0.1; yields its URL, stops at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/api/info", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory, mixed_dataset, tiny_onnx):
    """A gallery, then the app over it on a free port of 127.0.0.1, stopped at the end."""
    out = tmp_path_factory.mktemp("served")
    assert cli.main(["--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 3
    cfg = config_from_flags(
        vars(cli.build_parser().parse_args(["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve"]))
    )
    service = SearchService.load(cfg)
    with serving(service) as url:
        yield url, out, service


def _cli_results(out, tiny_onnx, *query) -> list[tuple[str, float]]:
    assert cli.main([*query, "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 0
    with open(out / "retrieval_results" / "queries" / "query_results.csv") as f:
        return [(r["gallery_file"], round(float(r["distance"]), 3)) for r in csv.DictReader(f)]


def _page_results(browser) -> list[tuple[str, float]]:
    tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile[data-file]")
    return [(t.get_attribute("data-file"), round(float(t.get_attribute("data-distance")), 3)) for t in tiles]


def search_text(browser, url: str, text: str, loaded: str = "items") -> None:
    """Open the search page, wait until it says `loaded`, search for `text` and wait for 5 results."""
    browser.get(url + "/")
    wait(browser, f"document.getElementById('info').textContent.includes('{loaded}')")
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "text-go").click()
    wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 5")


def test_text_and_image_queries_through_the_page_equal_the_query_mode(served, browser, tiny_onnx, tmp_path):
    url, out, _ = served
    search_text(browser, url, "red floral dress", loaded="22 items")
    assert _page_results(browser) == _cli_results(out, tiny_onnx, "--query-text", "red floral dress")
    # each result named as the user knows the photo (its source's last part), the gallery's file on hover
    with open(out / "retrieval_results" / "queries" / "query_results.csv") as f:
        sources = [r["gallery_source"] for r in csv.DictReader(f)]
    names = browser.find_elements(By.CSS_SELECTOR, "#results .tile .cap.name")
    assert [n.text for n in names] == [s.rsplit("/", 1)[-1] for s in sources] and all("[" in s for s in sources)
    files = [f for f, _ in _page_results(browser)]
    assert [n.get_attribute("title") for n in names] == [f"{s}\n{f}" for s, f in zip(sources, files)]
    picture = tmp_path / "look.jpg"
    picture.write_bytes((out / "images" / file_of(out, 11)).read_bytes())
    browser.find_element(By.ID, "file").send_keys(str(picture))
    browser.find_element(By.ID, "image-go").click()
    wait(
        browser,
        "document.querySelector('#results .query')?.dataset.query === 'look.jpg'",
    )
    wait(
        browser, "[...document.images].filter(i => i.closest('#results')).every(i => i.complete && i.naturalWidth > 0)"
    )
    got = _page_results(browser)
    assert got == _cli_results(out, tiny_onnx, "--query-image", str(picture))
    assert got[0] == (file_of(out, 11), 0.0)  # the picture finds itself first
    assert console_errors(browser) == []


def test_a_result_clicked_on_the_page_searches_its_look_alikes(served, browser, tmp_path):
    """A result is a way on ("more like this"): clicked, the item's neighbours, as Catalog.neighbours
    gives them, under the item's own thumbnail; a picture dropped on the page is searched as one chosen."""
    url, out, service = served
    search_text(browser, url, "red floral dress", loaded="22 items")
    first = browser.find_element(By.CSS_SELECTOR, "#results .tile[data-file]")
    rows = service.current().searcher.rows
    name, file = first.find_element(By.CSS_SELECTOR, ".cap.name").text, first.get_attribute("data-file")
    first.click()
    wait(browser, "document.querySelector('#results .query')?.dataset.query.startsWith('More like ')")
    assert browser.find_element(By.CSS_SELECTOR, "#results .query h2").text == f"More like {name}"
    mine = browser.find_element(By.CSS_SELECTOR, "#results .tile.mine")
    assert mine.text == f"this item\n{name}" and "/thumb/" in mine.find_element(By.TAG_NAME, "img").get_attribute("src")
    clicked = next(r.embedding_row for r in rows if r.file == file)
    hits = service.current().neighbours(clicked, 5)
    wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 5")
    assert _page_results(browser) == [(h.file, round(h.distance, 3)) for h in hits]
    assert clicked not in [h.row for h in hits]
    # Enter in a filter's box runs the last search again: this look-alike search, not the text's
    browser.execute_script("window.__asked = []; const f = window.fetch;"
                           "window.fetch = (u, o) => { window.__asked.push(u); return f(u, o); };"
                           "document.getElementById('filter-text').dispatchEvent("
                           "new KeyboardEvent('keydown', { key: 'Enter', bubbles: true }))")
    wait(browser, "window.__asked.length === 1")
    assert browser.execute_script("return window.__asked") == ["/api/similar"]
    wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 5")
    # by the keyboard too: Enter on a focused result
    browser.find_elements(By.CSS_SELECTOR, "#results .tile[data-file]")[1].send_keys(Keys.ENTER)
    wait(browser, "document.querySelector('#results .query h2').textContent !== " + json.dumps(f"More like {name}"))
    # a dropped picture: the browser would otherwise open it in the page's place
    look = (out / "images" / file_of(out, 11)).read_bytes()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const moved = new DataTransfer();
        moved.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
        const dropped = new DragEvent("drop", { dataTransfer: moved, bubbles: true, cancelable: true });
        document.getElementById("results").dispatchEvent(dropped);
    """, base64.b64encode(look).decode())
    wait(browser, "document.querySelector('#results .query')?.dataset.query === 'dropped.jpg'")
    assert _page_results(browser)[0] == (file_of(out, 11), 0.0) and browser.current_url.startswith(url)
    assert console_errors(browser) == []


def test_a_look_alike_search_of_an_earlier_store_or_another_row_is_refused(served):
    url, _, service = served
    version = service.version(service.current())
    asked = httpx.post(url + "/api/similar", json={"row": 3, "v": version, "k": 4}, timeout=30)
    assert asked.status_code == 200 and len(asked.json()["queries"][0]["results"]) == 4
    assert asked.json()["queries"][0]["picture"] == f"/thumb/3.jpg?v={version}"
    stale = httpx.post(url + "/api/similar", json={"row": 3, "v": "0" * 16}, timeout=30)
    assert stale.status_code == 409 and "updated since these results were given" in stale.json()["detail"]
    gone = httpx.post(url + "/api/similar", json={"row": 10_000, "v": version}, timeout=30)
    assert gone.status_code == 404 and gone.json()["detail"] == "no gallery item 10000"
    bad = httpx.post(url + "/api/similar", json={"row": 3, "v": version, "filter": "nope = 1"}, timeout=30)
    assert bad.status_code == 422 and "nope" in bad.json()["detail"]


@pytest.mark.parametrize(
    "name, data, status, message",
    [
        ("notes.txt", b"just some text", 415, "not a recognized image format"),
        ("bomb.png", png_header_only(50_000, 50_000), 413, "refused as a decompression bomb: its header claims over "
                                                               "179 megapixels; a query picture may have at most 40"),
        ("huge.jpg", b"\xff\xd8\xff" + bytes(MAX_UPLOAD_BYTES), 413, "over 20 MB"),
        ("empty.jpg", b"", 422, "empty"),
    ],
    ids=["text", "bomb", "huge", "empty"],  # not the 20 MB of bytes as the test's name
)
def test_bad_uploads_get_a_4xx_and_the_next_query_still_works(served, name, data, status, message):
    url, _, service = served
    answered, refused = len(service.latencies), len(service.declined)
    r = httpx.post(url + "/api/image", files={"file": (name, data)}, timeout=30)
    assert r.status_code == status and message in r.json()["detail"]
    # counted as refused, not answered (the summary's "queries answered" and its latencies): the
    # huge one by the middleware, before it is read
    assert service.declined[refused:] == [status] and len(service.latencies) == answered
    ok = httpx.post(url + "/api/text", json={"text": "blue shirt"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 5
    assert len(service.latencies) == answered + 1 and len(service.declined) == refused + 1


def test_a_failed_upload_clears_the_previous_results(served, browser, tmp_path):
    """The error is said where the results were: no earlier query's results stay under it."""
    url, _, _ = served
    search_text(browser, url, "blue shirt")
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(b"hello\nthis is text, not a picture\n")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    browser.find_element(By.ID, "image-go").click()
    said = wait(browser, "document.getElementById('status').className === 'error' && "
                         "document.getElementById('status').textContent")
    assert said == "Could not search: notes.jpg: not a recognized image format (it starts like a text file)"
    assert browser.execute_script("return document.getElementById('results').children.length") == 0
    assert all("status of 415" in e for e in console_errors(browser))  # the refused upload, and nothing else


def test_the_person_option_is_offered_only_by_a_server_that_segments(served, browser):
    """A server of the whole-picture gallery cannot cut a picture into persons: the page does not offer
    it, and the API refuses such a request with the reason and the flag to use; a server of the
    segmented gallery (--use-segmentation) offers it, checked."""
    url, _, service = served
    assert httpx.get(url + "/api/info").json()["segment"] is False
    browser.get(url + "/")
    wait(browser, "document.getElementById('info').textContent.includes('items')")
    assert browser.execute_script("return document.getElementById('segment-option').offsetParent") is None
    picture = (service.cfg.output_dir / "images" / file_of(service.cfg.output_dir, 3)).read_bytes()
    r = httpx.post(url + "/api/image", files={"file": ("q.jpg", picture)}, data={"segment": "true"}, timeout=30)
    assert r.status_code == 422 and "--use-segmentation" in r.json()["detail"]
    assert httpx.post(url + "/api/image", files={"file": ("q.jpg", picture)}, timeout=30).status_code == 200
    segmenting = SearchService(replace(service.cfg, use_segmentation=True), service.catalog)
    with serving(segmenting) as other:
        assert httpx.get(other + "/api/info").json()["segment"] is True
        browser.get(other + "/")
        wait(browser, "document.getElementById('segment-option').offsetParent !== null")
        assert browser.execute_script("return document.getElementById('segment').checked") is True


def test_the_page_fits_a_phone(served, browser):
    url, _, _ = served
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        search_text(browser, url, "red dress")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 420
        assert browser.execute_script(
            "return [...document.querySelectorAll('.panel, .query')].every(p => p.scrollWidth <= p.clientWidth)"
        )
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_bad_text_requests_are_refused_with_a_reason(served):
    url, _, service = served
    answered, refused = len(service.latencies), len(service.declined)
    assert httpx.post(url + "/api/text", json={"text": "  "}).status_code == 422
    assert httpx.post(url + "/api/text", json={"text": "x" * 501}).status_code == 413
    picture = {"file": ("look.jpg", assets.jpeg_bytes(40, 56))}
    long_text = httpx.post(url + "/api/image", files=picture, data={"text": "x" * 501})
    assert long_text.status_code == 413 and "501 characters; at most 500" in long_text.json()["detail"]
    assert httpx.post(url + "/api/text", json={"text": "dress", "k": 0}).status_code == 422
    assert httpx.post(url + "/api/text", json={"text": "dress", "k": True}).status_code == 422
    assert httpx.get(url + "/thumb/9999.jpg").status_code == 404
    assert httpx.get(url + "/thumb/0.jpg").headers["content-type"] == "image/jpeg"
    # values JSON allows Python to read but not to write back: said as the field at fault, not a 500
    for body, field in (('{"text": "dress", "k": NaN}', "k"), ('{"text": NaN}', "text"),
                        ('{"text": "dress", "k": 1e400}', "k")):
        r = httpx.post(url + "/api/text", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: ")
    lone = httpx.post(url + "/api/text", content='{"text": "red \\ud800"}',
                      headers={"content-type": "application/json"})
    assert lone.status_code == 422 and "must be valid Unicode" in lone.json()["detail"]
    # a body that is no JSON, or no object: said of the body ("17: JSON decode error" read as a field 17)
    for body, said in (('{"text": "red", }', "the body is not valid JSON (at character 17)"),
                       ('["red"]', 'the body must be a JSON object, e.g. {"text": "red dress"}')):
        r = httpx.post(url + "/api/text", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"] == said, r.json()
    # each refused query counted apart from those answered, FastAPI's own 422s (k: true) too; a thumbnail is no query
    assert service.declined[refused:] == [422, 413, 413, 422, 422, 422, 422, 422, 422, 422, 422]  # not the 404
    assert len(service.latencies) == answered
    # a report folder this run did not make: not found, not a 500
    assert httpx.get(url + "/files/video_results/x.html").status_code == 404


def test_the_report_is_served(served):
    url, _, _ = served
    r = httpx.get(url + "/report", follow_redirects=True)
    assert r.status_code == 200 and "run report" in r.text
    assert httpx.get(url + "/files/outputs/report/sections.js").status_code == 200


def _raw_post(url: str, path: str, headers: str, chunks) -> str:
    """POST through a plain socket (a client that declares what it likes, or sends in chunks); the
    server may answer and close before the body is all sent: what it answered is returned."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        try:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
            for chunk in chunks:
                conn.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, body, length = b"", b"", 0
        try:
            while b"\r\n\r\n" not in answer and (got := conn.recv(4096)):
                answer += got
            head, _, body = answer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length and (got := conn.recv(4096)):
                body += got
        except (TimeoutError, ConnectionResetError):
            head = answer.partition(b"\r\n\r\n")[0]
        return (head + b"\r\n\r\n" + body).decode(errors="replace")


def _chunked(parts, size: int, count: int):
    for part in parts:
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    for _ in range(count):
        yield f"{size:x}\r\n".encode() + bytes(size) + b"\r\n"
    yield b"0\r\n\r\n"


def test_bodies_over_their_limit_are_refused_before_they_are_read(served):
    """A body's declared size over its endpoint's limit is answered 413 at once; one sent in chunks
    with no size, as soon as it passes the limit; the next query still works."""
    url, _, _ = served
    declared = _raw_post(url, "/api/image", f"Content-Type: multipart/form-data; boundary=b\r\n"
                         f"Content-Length: {300 << 20}\r\n", [b"x" * 16])  # says 300 MiB, sends 16 bytes
    assert declared.startswith("HTTP/1.1 413") and "the picture is over 20 MB: choose a smaller one" in declared
    chunked = "Transfer-Encoding: chunked\r\n"
    text = _raw_post(url, "/api/text", "Content-Type: application/json\r\n" + chunked, _chunked([], 8192, 40))
    assert text.startswith("HTTP/1.1 413") and "the request is over 64 KiB" in text  # 40 x 8 KiB: over 64 KiB
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
    upload = _raw_post(url, "/api/image", "Content-Type: multipart/form-data; boundary=b\r\n" + chunked,
                       _chunked([head], 1 << 20, 22))  # past the 20 MB a picture may have
    assert upload.startswith("HTTP/1.1 413") and "the picture is over 20 MB" in upload
    assert httpx.post(url + "/api/text", json={"text": "blue shirt"}, timeout=30).status_code == 200


def test_two_uploads_at_a_time_are_decoded_and_text_queries_go_on_meanwhile(served, monkeypatch):
    """Uploads past the two being decoded wait without a worker thread: a text query and a thumbnail
    are answered while four uploads are held, and never more than two are inside at once."""
    url, _, service = served
    release, lock = threading.Event(), threading.Lock()
    inside, most = [0], [0]
    real = service.image

    def held(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            release.wait(20)
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(service, "image", held)
    picture = (service.cfg.output_dir / "images" / file_of(service.cfg.output_dir, 3)).read_bytes()
    with ThreadPoolExecutor(4) as pool:
        uploads = [pool.submit(httpx.post, url + "/api/image", files={"file": ("q.jpg", picture)}, timeout=30)
                   for _ in range(4)]
        for _ in range(100):
            if inside[0] == 2:
                break
            time.sleep(0.05)
        assert inside[0] == 2  # two decoding, two waiting
        assert httpx.post(url + "/api/text", json={"text": "blue shirt"}, timeout=10).status_code == 200
        assert httpx.get(url + "/thumb/0.jpg", timeout=10).status_code == 200
        release.set()
        assert [u.result().status_code for u in uploads] == [200] * 4
    assert most[0] == 2


def test_an_upload_of_too_many_pixels_is_refused_from_its_header(served):
    """A small PNG that decodes to 81 megapixels: refused by its header, never decoded."""
    url, _, _ = served
    r = httpx.post(url + "/api/image", files={"file": ("wide.png", png_header_only(9000, 9000))}, timeout=30)
    assert r.status_code == 413 and "81 megapixels; a query picture may have at most 40" in r.json()["detail"]


def test_only_the_reports_folders_are_files_and_only_loopbacks_names_are_answered(served):
    url, out, _ = served
    assert httpx.get(url + "/files/outputs/report/sections.js").status_code == 200
    assert (out / "embeddings" / "manifest.csv").is_file()
    for path in ("/files/embeddings/manifest.csv", "/files/embeddings/embeddings.npy", "/files/images/"):
        assert httpx.get(url + path).status_code == 404, path
    rebound = httpx.get(url + "/api/info", headers={"host": "attacker.example"})
    assert rebound.status_code == 400  # and says why, and what a reverse proxy's owner does about it
    assert rebound.json()["detail"].startswith("this server answers only the names of loopback (127.0.0.1, "
                                               "localhost, [::1]) while it runs without a token, and this "
                                               "request named 'attacker.example'. Behind a reverse proxy, set")
    assert "$FASHION_SEARCH_TOKEN" in rebound.json()["detail"]
    for name in ("localhost", "[::1]", "LOCALHOST"):
        assert httpx.get(url + "/api/info", headers={"host": f"{name}:8000"}).status_code == 200, name
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/api/info").status_code == 200


def test_the_reports_files_are_revalidated_and_no_answer_is_sniffed_or_framed_elsewhere(served):
    """A later run rewrites sections.js under its name while the server runs: sent without a cache
    rule, a browser reused last run's for hours (its sections, another run's captions)."""
    url, _, _ = served
    for path in ("/files/outputs/report/sections.js", "/report", "/api/info", "/thumb/0.jpg"):
        answer = httpx.get(url + path, follow_redirects=True)
        assert answer.status_code == 200, path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["x-frame-options"] == "SAMEORIGIN", path
        if path.startswith("/files/"):
            assert answer.headers["cache-control"] == "no-cache" and answer.headers["etag"]


def test_a_thumbnail_is_revalidated_by_the_stores_version(served):
    url, _, service = served
    first = httpx.get(url + "/thumb/3.jpg")
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    tag = first.headers["etag"]
    assert tag == service.thumbnail_etag(3) and service.catalog.cache.sidecar.manifest_sha256[:16] in tag
    again = httpx.get(url + "/thumb/3.jpg", headers={"if-none-match": tag})
    assert again.status_code == 304 and not again.content
    assert httpx.get(url + "/thumb/3.jpg", headers={"if-none-match": '"other-3"'}).status_code == 200


def test_a_text_query_the_model_cannot_answer_is_a_503_with_the_reason(served, monkeypatch):
    from pipeline.errors import PipelineError

    url, _, service = served

    def no_text_tower(*args, **kwargs):
        raise PipelineError("text search with the ONNX backend needs its text tower beside the file")

    monkeypatch.setattr(service.catalog, "search_text", no_text_tower)
    r = httpx.post(url + "/api/text", json={"text": "dress"}, timeout=30)
    assert r.status_code == 503 and "needs its text tower" in r.json()["detail"]


def test_bounded_load_200_requests_from_8_clients(served):
    """200 requests (text and image, mixed), 8 at a time, each bounded by a timeout: no errors."""
    url, out, _ = served
    picture = (out / "images" / file_of(out, 3)).read_bytes()

    def one(k: int) -> float:
        t = time.perf_counter()
        with httpx.Client(timeout=30) as c:
            if k % 4 == 3:
                r = c.post(url + "/api/image", files={"file": ("q.jpg", picture)})
            else:
                r = c.post(url + "/api/text", json={"text": f"red dress number {k % 7}"})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=8) as pool:
        latencies = np.array(list(pool.map(one, range(200)))) * 1000
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"\nload test: 200 requests, 8 clients: p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    assert len(latencies) == 200 and p95 < 30_000


def test_a_busy_port_is_one_line_and_exit_1_before_any_model_loads(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["--serve", "--port", str(port), "--output-dir", str(tmp_path / "none")]) == 1
    said = capsys.readouterr()
    assert said.err == f"error: port {port} is in use; choose another with --port\n"
    assert "serving" not in said.out


@pytest.mark.subprocess
def test_sigterm_stops_the_server_cleanly_with_exit_0(served, tiny_onnx):
    import signal
    import subprocess
    import sys

    _, out, _ = served
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, str(root / "main.py"), "--serve", "--port", str(port), "--onnx", str(tiny_onnx),
         "--output-dir", str(out)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the socket is bound and the model loaded
        assert line.startswith("serving ") and f"127.0.0.1:{port}" in line
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).status_code == 200
        assert httpx.post(f"http://127.0.0.1:{port}/api/text", json={"text": " "}, timeout=10).status_code == 422
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    said = proc.stdout.read()
    assert "queries answered 0" in said and "queries refused (answered with an error) 1" in said


def test_beyond_loopback_the_page_and_its_api_need_the_token(served, tiny_onnx, browser, monkeypatch):
    """--host 0.0.0.0 (the app is still bound to 127.0.0.1 here): every path but the page's shell
    answers 401 without the token; the page asks for it once, then searches; --no-auth opens it;
    without a token in the environment the server does not start."""
    from pipeline.serve import TOKEN_ENV, required_token

    _, out, _ = served
    flags = ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve", "--host", "0.0.0.0"]
    cfg = config_from_flags(vars(cli.build_parser().parse_args(flags)))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(Exception, match=f"set a token of 16 or more characters in \\${TOKEN_ENV}"):
        required_token(cfg)
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(Exception, match=f"\\${TOKEN_ENV} holds 5 characters, too few to guess-proof; set a token"):
        required_token(cfg)
    assert required_token(config_from_flags(vars(cli.build_parser().parse_args([*flags, "--no-auth"])))) is None
    token = "s3cret-token-for-the-shop-page"
    monkeypatch.setenv(TOKEN_ENV, token)
    with serving(SearchService.load(cfg)) as url:
        assert httpx.get(url + "/").status_code == 200  # the shell, which asks for the token
        for path in ("/api/info", "/thumb/0.jpg", "/report"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.post(url + "/api/text", json={"text": "red"}).status_code == 401
        assert httpx.post(url + "/api/text", json={"text": "red"},
                          headers={"Authorization": "Bearer wrong-token-of-the-same-len"}).status_code == 401
        ok = httpx.post(url + "/api/text", json={"text": "red"}, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["results"]
        for scheme in ("bearer", "BEARER"):  # a scheme's name is case-insensitive
            assert httpx.post(url + "/api/text", json={"text": "red"},
                              headers={"Authorization": f"{scheme} {token}"}).status_code == 200
        assert httpx.post(url + "/api/text", json={"text": "red"},
                          headers={"Authorization": f"Basic {token}"}).status_code == 401
        # a body over the limit, sent in chunks through the token's middleware: 413 too, not its 400
        over = _raw_post(url, "/api/text", f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n", _chunked([], 8192, 40))
        assert over.startswith("HTTP/1.1 413") and "KiB" in over
        browser.delete_all_cookies()
        browser.get(url + "/")
        wait(browser, "!document.getElementById('token-form').hidden")
        said = browser.execute_script("return document.getElementById('status').textContent")
        assert said.startswith("Type the token")
        # the report's link waits for the token: before it, the link answered the 401's raw JSON
        assert not browser.find_element(By.ID, "report-link").is_displayed()
        browser.find_element(By.ID, "token").send_keys("not it")
        browser.find_element(By.ID, "token-go").click()
        wait(browser, "document.getElementById('status').textContent.startsWith('That token was not accepted')")
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "token-go").click()
        wait(browser, "document.getElementById('info').textContent.includes('items')")
        assert browser.find_element(By.ID, "report-link").is_displayed()
        browser.find_element(By.ID, "text").send_keys("red dress")
        browser.find_element(By.ID, "text-go").click()
        wait(browser, "document.querySelectorAll('#results .tile img').length === 5")
        wait(browser, "[...document.querySelectorAll('#results .tile img')]"
                      ".every(i => i.complete && i.naturalWidth > 0)")  # the thumbnails carry the cookie
        browser.delete_all_cookies()
        errors = console_errors(browser)  # read here, so the next test starts with an empty log
        assert errors and all("401 (Unauthorized)" in e for e in errors)  # the two refused /api/info


def test_a_token_set_is_required_on_loopback_too_and_then_any_host_name_is_answered(served, tiny_onnx,
                                                                                     monkeypatch):
    """A reverse proxy on the same machine forwards to 127.0.0.1: the token set for it was dropped
    there (the catalogue open to anyone who reached the proxy), and a proxy that keeps the Host header
    got "Invalid host header"."""
    from pipeline.serve import TOKEN_ENV, required_token

    _, out, _ = served
    cfg = _serve_config(out, tiny_onnx)
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(Exception, match=f"^\\${TOKEN_ENV} holds 5 characters, too few to guess-proof; set a token"):
        required_token(cfg)
    token = "s3cret-token-for-the-proxy-page"
    monkeypatch.setenv(TOKEN_ENV, token)
    with serving(SearchService.load(cfg)) as url:
        assert httpx.get(url + "/api/info").status_code == 401
        proxied = {"host": "search.shop.internal", "authorization": f"Bearer {token}"}
        assert httpx.get(url + "/api/info", headers=proxied).status_code == 200
        assert httpx.get(url + "/api/info", headers={"host": "search.shop.internal"}).status_code == 401
    monkeypatch.delenv(TOKEN_ENV)
    assert required_token(cfg) is None  # loopback without a token: open, as before


def test_a_top_k_over_what_a_query_may_ask_is_refused_before_serving(tiny_onnx, tmp_path, capsys):
    """The page asks with the server's --top-k: over the API's bound, every query would be a 422."""
    from tests.helpers import run

    assert run("--onnx", tiny_onnx, "--output-dir", tmp_path / "o", "--serve", "--top-k", "150") == 2
    assert "--serve answers at most 100 results a query; --top-k 150 is over it" in capsys.readouterr().err


def test_a_number_columns_range_leaves_out_nan_and_infinities():
    """The page's range boxes show a float column's finite bounds: NaN is a missing value, and an
    infinity or an all-NaN column gives no bound a person can type against (JSON has none for them)."""
    from types import SimpleNamespace

    import pyarrow as pa

    from pipeline.serve import filter_controls

    table = pa.table({"price": [float("nan"), 12.5, float("inf"), None, 3.0], "void": [float("nan")] * 5,
                      "stock": pa.array([4, None, 2, 9, 0], pa.int64())})
    catalog = SimpleNamespace(searcher=SimpleNamespace(metadata=SimpleNamespace(columns=table.column_names,
                                                                                 table=table)))
    controls = {c["name"]: c for c in filter_controls(catalog)}
    assert (controls["price"]["min"], controls["price"]["max"]) == (3.0, 12.5)
    assert controls["void"] == {"name": "void", "kind": "number"}  # no bound: the page shows no range
    assert (controls["stock"]["min"], controls["stock"]["max"]) == (0, 9)


def test_a_text_column_of_long_values_is_free_text_not_a_menu():
    """A description with a few values made a page-wide menu of whole marketing texts: a menu holds
    short values (a category, a colour), and long texts are filtered by the typed filter."""
    from types import SimpleNamespace

    import pyarrow as pa

    from pipeline.serve import MENU_VALUE_CHARS, filter_controls

    long = "a flowing summer dress in light cotton, with a tie waist and a midi hem" * 2
    table = pa.table({"category": ["dress", "shirt", "dress"], "description": [long, long + "!", "short"],
                      "edge": ["x" * MENU_VALUE_CHARS, "y", "z"]})
    catalog = SimpleNamespace(searcher=SimpleNamespace(metadata=SimpleNamespace(columns=table.column_names,
                                                                                 table=table)))
    controls = {c["name"]: c for c in filter_controls(catalog)}
    assert controls["category"]["values"] == ["dress", "shirt"]
    assert controls["description"] == {"name": "description", "kind": "text"}
    assert controls["edge"]["values"] == ["x" * MENU_VALUE_CHARS, "y", "z"]


def _serve_config(out: Path, onnx: Path):
    return config_from_flags(vars(cli.build_parser().parse_args(["--onnx", str(onnx), "--output-dir", str(out),
                                                                  "--serve"])))


def test_the_server_follows_an_update_and_earlier_results_keep_their_photos(tiny_onnx, tmp_path, browser, monkeypatch):
    """An --update switched in while serving is served from the next requests on (no restart), with
    the model loaded once; a result given before it still shows its own photo, though its row holds
    another photo now; the page open before it says so."""
    from PIL import Image

    from pipeline import serve
    from pipeline.catalog import Catalog
    from pipeline.images import encode_jpeg
    from tests.helpers import run
    from tests.test_update import args, photo, write_catalogue

    monkeypatch.setattr(serve, "FOLLOW_EVERY_S", 0.0)
    data, out = tmp_path / "data", tmp_path / "out"
    write_catalogue(data, list(range(12)))
    assert run(*args(data, tiny_onnx, out)) == 0
    service = SearchService.load(_serve_config(out, tiny_onnx))
    embedder = service.catalog.embedder
    with serving(service) as url:
        browser.get(url + "/")
        wait(browser, "document.getElementById('info').textContent.includes('12 items')")
        before = httpx.post(url + "/api/text", json={"text": "a photo", "k": 12}).json()
        assert before["store"]["items"] == 12 and len(before["results"]) == 12
        first_photo = {r["row"]: httpx.get(url + r["thumb"]).content for r in before["results"]}

        write_catalogue(data, list(range(1, 18)))  # product 0 removed: every kept photo moves up a row
        assert run(*args(data, tiny_onnx, out, "--update")) == 0
        end = time.monotonic() + 30
        while httpx.get(url + "/api/info").json()["items"] != 17:
            assert time.monotonic() < end, "the updated store was not served"
            time.sleep(0.1)

        after = httpx.post(url + "/api/text", json={"text": "a photo", "k": 17}).json()
        assert after["store"]["items"] == 17 and after["store"]["version"] != before["store"]["version"]
        fresh = Catalog.open(out, onnx=str(tiny_onnx))
        assert [(r["file"], r["distance"]) for r in after["results"]] == [
            (h.file, round(h.distance, 6)) for h in fresh.search_text("a photo", 17)]
        assert service.catalog.embedder is embedder and service.updates == 1  # no model loaded again
        # of the store before, only its thumbnails are kept (not its vectors, index and metadata)
        assert [type(t).__name__ for t in service._earlier.values()] == ["Thumbnails"]

        # the results given before the update: each thumbnail the photo it showed then
        for r in before["results"]:
            assert httpx.get(url + r["thumb"]).content == first_photo[r["row"]]
        moved = before["results"][0]["row"]
        now = httpx.get(url + f"/thumb/{moved}.jpg?v={after['store']['version']}").content
        assert now != first_photo[moved]
        assert now == encode_jpeg(Image.fromarray(fresh.thumbnail(moved)), quality=88)  # the row's photo now
        gone = httpx.get(url + f"/thumb/{moved}.jpg?v=0123456789abcdef")
        assert gone.status_code == 404 and "search again" in gone.json()["detail"]

        # the page opened before the update: its next answer says the gallery changed, even one that
        # matches nothing, and its header says what /api/info says now
        browser.find_element(By.ID, "filter-text").send_keys("item_id = 'none such'")
        browser.find_element(By.ID, "text").send_keys("a photo")
        browser.find_element(By.ID, "text-go").click()
        said = wait(browser, "!document.getElementById('note').hidden && document.getElementById('note').textContent")
        assert "updated while this page was open: 17 items now (12 before)" in said
        assert "No item matches the filter" in browser.find_element(By.ID, "status").text
        info = httpx.get(url + "/api/info").json()
        wait(browser, f"document.getElementById('info').textContent.includes({info['search']!r})")
        assert "17 items" in browser.find_element(By.ID, "info").text
        assert not console_errors(browser)

        # metadata alone changed (a column added): followed, its controls too; the results given before the
        # photo update keep their thumbnails (the same rows: nothing of the earlier version is let go)
        generation = info["generation"]
        products = list(range(1, 18))
        assets.write_parquet_dataset(data, [photo(k) for k in products], extra={
            "item_id": [f"P{k:03d}" for k in products], "colour": [["red", "blue"][k % 2] for k in products]})
        assert run(*args(data, tiny_onnx, out, "--update")) == 0
        while httpx.get(url + "/api/info").json()["generation"] == generation:
            assert time.monotonic() < end + 30, "the metadata was not followed"
            time.sleep(0.1)
        info = httpx.get(url + "/api/info").json()
        assert info["version"] == after["store"]["version"] and info["items"] == 17
        assert {c["name"]: c.get("values") for c in info["columns"]}["colour"] == ["blue", "red"]
        for r in before["results"][:3]:
            assert httpx.get(url + r["thumb"]).content == first_photo[r["row"]]

        # the index alone made again (--use-embeddings --index hnsw): followed, searched as the store says
        assert run(*args(data, tiny_onnx, out, "--use-embeddings", "--index", "hnsw")) == 0
        while "hnsw" not in httpx.get(url + "/api/info").json()["search"]:
            assert time.monotonic() < end + 60, "the new index was not followed"
            time.sleep(0.1)

        # the store gone from disk: said, the loaded one served; back as it was, nothing to say
        sidecar = out / "embeddings" / "embeddings.json"
        sidecar.rename(sidecar.with_suffix(".away"))
        while "is not on disk now" not in (httpx.get(url + "/api/info").json()["not_served"] or ""):
            assert time.monotonic() < end + 90, "a store gone from disk was not said"
            time.sleep(0.1)
        assert httpx.post(url + "/api/text", json={"text": "a photo", "k": 3}).status_code == 200
        sidecar.with_suffix(".away").rename(sidecar)
        while httpx.get(url + "/api/info").json()["not_served"] is not None:
            assert time.monotonic() < end + 90, "a store back as it was is still said to be gone"
            time.sleep(0.1)


def test_the_servers_filter_is_checked_against_each_store_it_would_serve(tiny_onnx, tmp_path):
    """--serve --filter naming a column the store does not keep: refused at start (every query was a
    422 about a flag the page cannot change), and an update that drops the column is not swapped in."""
    from pipeline.filters import FilterError
    from tests.helpers import run
    from tests.test_update import args, photo

    data, out = tmp_path / "data", tmp_path / "out"
    products = list(range(6))
    assets.write_parquet_dataset(data, [photo(k) for k in products], extra={
        "item_id": [f"P{k:03d}" for k in products], "colour": [["red", "blue"][k % 2] for k in products]})
    assert run(*args(data, tiny_onnx, out)) == 0
    cfg = config_from_flags(vars(cli.build_parser().parse_args(
        ["--onnx", str(tiny_onnx), "--output-dir", str(out), "--serve", "--filter", "size = 'M'"])))
    with pytest.raises(FilterError, match="unknown column 'size'"):
        SearchService.load(cfg)
    service = SearchService.load(replace(cfg, filter="colour = 'red'"))
    assert {h["meta"]["colour"] for h in service.text("a photo", 6, service.cfg.filter)["results"]} == {"red"}
    assets.write_parquet_dataset(data, [photo(k) for k in products], extra={"item_id": [f"P{k:03d}" for k in products]})
    assert run(*args(data, tiny_onnx, out, "--update")) == 0
    loaded = service.catalog
    assert service.reopen() is False and service.catalog is loaded
    assert "unknown column 'colour'" in (service.refused or "")


def test_a_store_of_another_model_switched_in_is_said_and_the_loaded_one_served(tiny_onnx, tiny_clip, tmp_path,
                                                                                monkeypatch):
    """A build with another model over the served folder: its vectors are never searched with this
    server's model; the loaded store goes on answering, and the reason is in /api/info."""
    import shutil

    from pipeline import serve
    from pipeline.errors import PipelineError
    from tests.helpers import run
    from tests.test_update import args, write_catalogue

    monkeypatch.setattr(serve, "FOLLOW_EVERY_S", 0.0)  # every request looks at the store on disk
    data, out, other = tmp_path / "data", tmp_path / "out", tmp_path / "other"
    write_catalogue(data, list(range(6)))
    assert run(*args(data, tiny_onnx, out)) == 0
    assert run("--dataset", data, "--model", tiny_clip, "--backend", "torch", "--output-dir", other, "--limit", "0",
               "--max-result-images", "0") == 0
    service = SearchService.load(_serve_config(out, tiny_onnx))
    loaded = service.catalog
    answer = service.text("a photo", 3)
    for folder in ("embeddings", "images"):
        shutil.rmtree(out / folder)
        shutil.copytree(other / folder, out / folder)
    assert service.reopen() is False
    assert service.catalog is loaded and service.updates == 0
    said = service.refused or ""
    assert "changed on disk and is not served yet" in said and "6 items loaded before" in said
    assert "backend: cache has 'torch', asked for 'onnx'" in said  # the reason: another embedder made it
    opened = []

    def still_refused(*args, **kwargs):  # as the store on disk still is (no thread dies on a None catalog)
        opened.append(1)
        raise PipelineError("backend: cache has 'torch', asked for 'onnx'")

    monkeypatch.setattr(serve, "open_catalog", still_refused)
    for _ in range(3):  # the same store on disk is not opened again: only a change can make it servable
        service.current()
    time.sleep(0.2)
    assert opened == []
    service._refused_until = time.monotonic()  # a minute on: tried again (images copied after the store, say)
    service.current()
    for _ in range(50):
        if opened:
            break
        time.sleep(0.05)
    assert opened == [1]
    assert service.text("a photo", 3) == answer  # the loaded store's answer, vectors and thumbnails in memory


def test_each_person_of_an_upload_is_shown_beside_its_own_results(served, browser, tmp_path):
    """A picture cut into its persons: each query's answer carries the crop it searched with, and the
    page shows that crop, not the whole upload, at the head of each person's results."""
    import base64

    from PIL import Image

    from pipeline.catalog import Catalog
    from pipeline.persons import Person, Segmenter

    url, _, service = served

    class TwoPeople(Segmenter):
        """A red person on the left half, a blue one on the right."""

        def segment(self, images_rgb):
            out = []
            for im in images_rgb:
                h, w = im.shape[:2]
                left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
                left[:, : w // 2], right[:, w // 2 :] = True, True
                out.append([Person(np.array([0, 0, w // 2, h], np.float32), 0.9, left),
                            Person(np.array([w // 2, 0, w, h], np.float32), 0.8, right)])
            return out

    loaded = service.catalog
    catalog = Catalog(loaded.cache, loaded.searcher, lambda: loaded.embedder, TwoPeople)
    segmenting = SearchService(replace(service.cfg, use_segmentation=True), catalog, follow=False)
    look = np.zeros((120, 160, 3), np.uint8)
    look[:, :80], look[:, 80:] = (220, 30, 30), (30, 30, 220)
    data = assets.encode(Image.fromarray(look), "PNG")
    answer = segmenting.image(data, "look.png", 3, segment=True)
    assert [q["label"] for q in answer["queries"]] == ["look.png#p0", "look.png#p1"]
    colours = []
    for q in answer["queries"]:
        head, b64 = q["picture"].split(",", 1)
        assert head == "data:image/jpeg;base64" and len(q["results"]) == 3
        crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.float32)
        colours.append(crop.reshape(-1, 3).mean(axis=0))
    assert colours[0][0] > 150 > colours[0][2] and colours[1][2] > 150 > colours[1][0]  # red left, blue right
    assert "picture" not in service.image(data, "look.png", 3, segment=False)["queries"][0]  # the page's own

    class NoOne(Segmenter):
        def segment(self, images_rgb):
            return [[] for _ in images_rgb]

    nobody = SearchService(replace(service.cfg, use_segmentation=True),
                           Catalog(loaded.cache, loaded.searcher, lambda: loaded.embedder, NoOne), follow=False)
    whole = nobody.image(data, "look.png", 3, segment=True)["queries"]
    assert [q["label"] for q in whole] == ["look.png"] and "picture" not in whole[0]  # no person: no "this person"

    with serving(segmenting) as other:
        browser.get(other + "/")
        wait(browser, "document.getElementById('segment-option').offsetParent !== null")
        (tmp_path / "look.png").write_bytes(data)
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "look.png"))
        browser.find_element(By.ID, "image-go").click()
        wait(browser, "document.querySelectorAll('#results .query').length === 2")
        shown = browser.execute_script(
            "return [...document.querySelectorAll('#results .query')].map(q => [q.dataset.query, "
            "q.querySelector('.tile.mine img').src, q.querySelector('.tile.mine .cap').textContent])")
        assert [(label, src, cap) for label, src, cap in shown] == [
            (q["label"], q["picture"], "this person") for q in answer["queries"]]
        assert not console_errors(browser)


def test_the_segmenter_goes_on_only_with_a_store_cut_alike(served):
    """A store swapped in that was segmented otherwise (another --seg-model, confidence, size or
    weights) gets a segmenter of its own, not the loaded one."""
    from types import SimpleNamespace

    from pipeline.catalog import Catalog
    from pipeline.identity import GallerySource
    from pipeline.serve import _segmentation

    def made(**seg):
        source = GallerySource(kind="segment", **seg)
        return SimpleNamespace(cache=SimpleNamespace(sidecar=SimpleNamespace(source=source)))

    assert _segmentation(made(seg_model="a.pt", seg_conf=0.25)) == _segmentation(made(seg_model="a.pt", seg_conf=0.25))
    for other in ({"seg_model": "b.pt", "seg_conf": 0.25}, {"seg_model": "a.pt", "seg_conf": 0.4},
                  {"seg_model": "a.pt", "seg_conf": 0.25, "seg_weights": "f" * 64}):
        assert _segmentation(made(seg_model="a.pt", seg_conf=0.25)) != _segmentation(made(**other))
    _, _, service = served
    loaded = service.catalog
    first, second = (Catalog(loaded.cache, loaded.searcher, lambda: loaded.embedder, lambda: object())
                     for _ in range(2))
    assert second.keep_models_of(first, segmenter=False)._segmenter_slot is not first._segmenter_slot
    assert second.keep_models_of(first)._segmenter_slot is first._segmenter_slot
    assert second._embedder_slot is first._embedder_slot


def test_a_server_of_persons_loads_its_segmenter_before_it_says_it_is_ready(served, monkeypatch):
    """--serve --use-segmentation: the segmenter loads with the server (the first picture cut into
    persons waited about 3 s for it), once."""
    from dataclasses import replace

    from pipeline import serve
    from pipeline.catalog import _FirstUse
    from pipeline.report import RunSummary

    _, _, service = served
    made: list[int] = []
    monkeypatch.setattr(service.catalog, "_segmenter_slot", _FirstUse(lambda: made.append(1) or "segmenter"))
    monkeypatch.setattr(serve, "open_catalog", lambda cfg, summary: service.catalog)
    summary = RunSummary(mode="serve")
    SearchService.load(replace(service.cfg, use_segmentation=True), summary)
    assert made == [1] and "load segmenter" in summary.stages
    service.catalog.load_segmenter()
    assert made == [1]
    SearchService.load(service.cfg, RunSummary(mode="serve"))  # the gallery of whole photos: none to load
    assert made == [1]


def test_a_shop_on_a_phone_sees_each_search_end_and_reads_its_products(tiny_onnx, tmp_path, browser):
    """At a phone's 390 px, where the filters push the status below the screen: a search run by Enter in
    a filter's box ends with the status in sight; a tile reads its product's name and price first
    (wrapped, not cut to a few letters) and the other columns a tap away; a picture's alt is its name;
    a picture with a long name fits the screen; one over the upload limit is refused before it is sent."""
    from pipeline.store import read_manifest

    n = 6
    extra = {
        "product_name": [f"Robe longue plissée en mousseline imprimée fleurie n°{i}" for i in range(n)],
        "brand": ["Maison Été"] * n, "category": ["dress", "skirt"] * (n // 2), "colour": ["red"] * n,
        "in_stock": [True, False] * (n // 2), "price": [1299.99 + i for i in range(n)],
    }
    cells = [assets.encode(assets.rgb_image(48, 64, seed=i), "JPEG") for i in range(n)]
    data, out = assets.write_parquet_dataset(tmp_path / "shop", cells, extra), tmp_path / "out"
    assert cli.main(["--dataset", str(data), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 0
    service = SearchService.load(_serve_config(out, tiny_onnx))
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 700, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        with serving(service) as url:
            browser.get(url + "/")
            wait(browser, "document.getElementById('info').textContent.includes('6 items')")
            browser.find_element(By.ID, "text").send_keys("a long dress")
            box = browser.find_element(By.ID, "filter-text")
            box.send_keys("price < 1302")
            box.send_keys("\n")  # Enter in the filter's box runs the search
            wait(browser, "document.querySelectorAll('#results .tile[data-file]').length === 3")
            assert browser.execute_script("const b = document.getElementById('status').getBoundingClientRect(); "
                                          "return b.top >= 0 && b.bottom <= innerHeight"), "the status is off-screen"
            assert browser.find_element(By.ID, "status").text.startswith("3 results in ")
            tile = browser.find_elements(By.CSS_SELECTOR, "#results .tile[data-file]")[0]
            lines = [d.text for d in tile.find_elements(By.CSS_SELECTOR, ".meta > div")]
            row = {r.file: r.source_row for r in read_manifest(out / "embeddings" / "manifest.csv")}[
                tile.get_attribute("data-file")]  # this tile's own product, not any of the six
            assert lines[:2] == [f"product_name Robe longue plissée en mousseline imprimée fleurie n°{row}",
                                 f"price {1299.99 + row:,.2f}"]
            name_line = tile.find_elements(By.CSS_SELECTOR, ".meta > div")[0]
            assert name_line.size["height"] > 20  # two lines of 11.5 px type: wrapped, not one cut line
            assert name_line.get_attribute("title") == lines[0].replace(" ", ": ", 1)  # whole on hover, if cut
            assert tile.find_element(By.CSS_SELECTOR, ".meta details summary").text == "2 more"
            alt = tile.find_element(By.TAG_NAME, "img").get_attribute("alt")
            assert alt == tile.find_element(By.CSS_SELECTOR, ".cap.name").text and not alt.startswith("img_")
            long_name = tmp_path / ("une_photo_de_robe_rouge_au_nom_de_fichier_tres_long_sans_espaces" * 2 + ".jpg")
            long_name.write_bytes(cells[2])
            browser.find_element(By.ID, "text").clear()
            box.clear()
            browser.find_element(By.ID, "file").send_keys(str(long_name))
            browser.find_element(By.ID, "image-go").click()
            wait(browser, "document.querySelector('#results .query h2') !== null")
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
            big = tmp_path / "big.jpg"
            big.write_bytes(cells[0] + bytes(MAX_UPLOAD_BYTES))
            answered = len(service.latencies) + len(service.declined)
            browser.find_element(By.ID, "file").send_keys(str(big))
            browser.find_element(By.ID, "image-go").click()
            said = wait(browser, "document.getElementById('status').className === 'error' && "
                                 "document.getElementById('status').textContent")
            assert said == "Could not search: big.jpg is over 20 MB: choose a smaller picture, or a smaller copy of it."
            assert len(service.latencies) + len(service.declined) == answered  # never sent
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_upload_check_opens_with_pils_own_open_not_ultralytics(monkeypatch):
    """Importing ultralytics (a server of persons) replaces PIL.Image.open with a wrapper that, on any
    file it cannot identify, tries to pip-install a decoder: an upload's header check must not call it."""
    import sys
    import types

    from PIL import Image

    from pipeline.serve import check_upload_pixels

    called = []

    def wrapper(fp, *args, **kwargs):
        called.append(fp)
        raise AssertionError("ultralytics' Image.open was called")

    wrapper.__module__ = "ultralytics.utils.patches"
    patches = types.ModuleType("ultralytics.utils.patches")
    patches._image_open = Image.open  # type: ignore[attr-defined]  # PIL's own, as ultralytics keeps it
    monkeypatch.setitem(sys.modules, "ultralytics.utils.patches", patches)
    monkeypatch.setattr(Image, "open", wrapper)
    check_upload_pixels(b"just some text, not a picture")
    check_upload_pixels(assets.jpeg_bytes(8, 8))
    assert called == []

"""The report and the search page at 10,000 items: how long writing outputs/report.html takes against
the run's wall time, how soon its first page shows in headless Chromium, and how fast --serve
answers text queries (ONNX text tower of the real FashionCLIP architecture, random weights).

    python -m benchmarks.report [--n 10000]
    python -m benchmarks.report --tiny                # 16 small pictures, tiny model, 10 queries: checks the script

Needs Debian's chromium and chromium-driver for the page timing (skipped without them).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import (
    ROOT,
    Assets,
    machine_line,
    make_parser,
    parse_args,
    run_main_py,
    standard_run_args,
)


def gallery_run(assets: Assets, n: int, onnx: Path) -> tuple[Path, float, float]:
    """The standard run on n generated JPEGs: (output folder, wall seconds, report stage seconds)."""
    out = assets.work / f"report-run{n}"
    shutil.rmtree(out, ignore_errors=True)
    run = run_main_py(standard_run_args(assets.dataset(n), onnx, out, n)).check("the run")
    return out, run.wall_s, run.stages["report"]


def first_page_seconds(report: Path) -> tuple[float, int, int] | None:
    """Seconds from navigation to the first grid page drawn with every picture on it loaded, the
    items the grid says it holds, and the pictures on the page."""
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1366,900"):
        options.add_argument(arg)
    options.binary_location = chrome
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get("about:blank")
        t = time.perf_counter()
        browser.get(report.as_uri())
        images = []
        while time.perf_counter() - t < 30:
            # the grid's first page drawn and its thumbnail sprite (one JPEG for the page's tiles) loaded
            images = browser.execute_script(
                "const im = [...document.querySelectorAll('[data-role=grid] img')];"
                "return im.length && im[0].complete && im[0].naturalWidth > 0 ? im.length : 0"
            )
            if images:
                break
            time.sleep(0.01)
        seconds = time.perf_counter() - t
        info = browser.execute_script("const c = document.querySelector('.tools .sub'); return c ? c.textContent : ''")
        count = re.search(r"· ([\d,]+) item", info)
        return seconds, int(count.group(1).replace(",", "")) if count else 0, images
    finally:
        browser.quit()


def serve_latencies(out: Path, onnx: Path, queries: int = 200) -> tuple[np.ndarray, np.ndarray, float]:
    """(one client's latencies, eight clients' latencies) in ms for text queries, and the start time."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "main.py"), "--serve", "--port", str(port), "--output-dir", str(out)]
    cmd += ["--onnx", str(onnx), "-q"]
    t = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"--serve exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/api/info", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        started = time.perf_counter() - t
        words = ["red", "black", "floral", "denim", "linen", "striped", "silk", "wool", "leather", "cotton"]
        kinds = ["dress", "jacket", "skirt", "shirt", "coat", "jeans", "blouse", "sweater"]
        texts = [f"{words[i % 10]} {kinds[(i // 10) % 8]} size {i}" for i in range(queries)]

        def one(client, text):
            t = time.perf_counter()
            r = client.post(url + "/api/text", json={"text": text})
            assert r.status_code == 200, r.text
            return (time.perf_counter() - t) * 1000

        with httpx.Client(timeout=30) as c:
            one(c, "warm up")
            single = np.array([one(c, q) for q in texts])
        clients = [httpx.Client(timeout=30) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            eight = np.array(list(pool.map(lambda i: one(clients[i % 8], texts[i]), range(queries))))
        for c in clients:
            c.close()
        return single, eight, started
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=200, help="text queries sent to --serve, by each client setting")
    ap.add_argument("--reuse", action="store_true", help="reuse the last run's output folder: page and --serve only")
    args = parse_args(ap, argv, tiny={"n": 16, "queries": 10})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    onnx = assets.onnx("static")
    out = args.work / f"report-run{args.n}"
    timed: tuple[float, float] | None = None
    if args.reuse and (out / "outputs" / "report.html").is_file():
        print(f"reusing {out} (the report's share of a run is not measured again)")
    else:
        out, wall, report = gallery_run(assets, args.n, onnx)
        timed = (wall, report)
    data = sum(f.stat().st_size for f in (out / "outputs" / "report").rglob("*") if f.is_file())
    html = (out / "outputs" / "report.html").stat().st_size
    how = "run reused, not timed"
    if timed is not None:
        wall, report = timed
        how = f"wall {wall:.1f} s; report written in {report:.2f} s ({report / wall:.1%} of the run)"
    print(f"\n== {args.n:,}-image standard run: {how}; report.html {html / 1024:.0f} KiB, "
          f"report/ {data / 2**20:.1f} MiB")
    page = first_page_seconds(out / "outputs" / "report.html")
    if page is None:
        print("no chromium/chromedriver: first-page time not measured")
    else:
        print(f"first page in headless Chromium: {page[0]:.2f} s ({page[2]} tiles, sprite loaded; grid of {page[1]:,})")
    single, eight, started = serve_latencies(out, onnx, args.queries)
    print("\n| --serve text query | requests | p50 | p95 | p99 |\n|---|---|---|---|---|")
    for name, lat in (("1 client", single), ("8 clients", eight)):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        print(f"| {name} | {len(lat)} | {p50:.1f} ms | {p95:.1f} ms | {p99:.1f} ms |")
    print(f"(--serve was answering {started:.1f} s after it was started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: every asset is generated here, nothing is downloaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# No network in tests: the hub and Ultralytics must never be asked for anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests import assets  # noqa: E402

# Mutation runs (tools/mutation.py) start a fresh test session per mutant; they set this so the
# tiny model and its ONNX export are made once and reused, not rebuilt for every mutant.
ASSET_CACHE = os.environ.get("FASHION_TEST_ASSET_CACHE")


@pytest.fixture(scope="session", autouse=True)
def _user_cache_in_tmp(tmp_path_factory):
    """What main.py keeps in the user's cache (fileio.user_cache_dir: int8 graphs, dataset records,
    YOLO exports) goes to the session's own folder, for the runs in this process and the main.py
    subprocesses alike, not to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


# torch_onnx_export's files of this test process (the graph, its .data files), by what was traced
_TRACED: dict[str, tuple[Path, list[Path]]] = {}


@pytest.fixture(autouse=True)
def _torch_exports_traced_once(request, tmp_path_factory, monkeypatch):
    """torch.export takes 4-5 s to trace even the tiny towers, and dozens of tests export the same
    one: `pipeline.export.torch_onnx_export` traces each distinct module once per test process and
    copies its file after that. Distinct: its class and structure (repr), every parameter and
    buffer to the byte, its config (the attention implementation too), each submodule's forward
    code, the inputs' names, shapes, dtypes and values, the output's name and the opset; for a
    tower with its weights in a .data file (`external`), the file's name too, which the .data
    file's is made from and which the graph names it by. Not in the key: methods other than
    forward, module-level functions they call, attributes that steer a trace (timm's fused_attn):
    a test that patches such a thing before an export marks itself `real_torch_export`, as do
    those that look at the exporter itself; every export of theirs traces."""
    from pipeline import export

    real = export.torch_onnx_export
    if request.node.get_closest_marker("real_torch_export"):
        return

    def traced_once(module, inputs, output, path, external):
        path = Path(path)
        key = _trace_key(module, inputs, output, export.OPSET) + (f"-{path.name}" if external else "")
        if key not in _TRACED or not all(f.is_file() for f in (_TRACED[key][0], *_TRACED[key][1])):  # (can go)
            real(module, inputs, output, path, external)
            folder = tmp_path_factory.getbasetemp() / "traced" / key
            folder.mkdir(parents=True, exist_ok=True)
            data = [shutil.copyfile(f, folder / f.name) for f in export._data_files(path)]  # named as the graph says
            _TRACED[key] = (shutil.copyfile(path, folder / "graph.onnx"), data)
            return None
        graph, data = _TRACED[key]
        shutil.copyfile(graph, path)
        for f in data:
            shutil.copyfile(f, path.parent / f.name)
        return None

    monkeypatch.setattr(export, "torch_onnx_export", traced_once)


def _trace_key(module, inputs, output: str, opset: int) -> str:
    import torch

    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n{output}\n{opset}".encode())
    h.update(str(module.training).encode())
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if hasattr(config, "to_json_string"):
            h.update(config.to_json_string(use_diff=False).encode())
            h.update(str(getattr(config, "_attn_implementation", None)).encode())
        forwards = [type(sub).forward, sub.__dict__.get("forward")]
        for f in forwards:
            code = getattr(getattr(f, "__func__", f), "__code__", None)
            h.update(b"-" if code is None else code.co_code + repr((code.co_consts, code.co_names)).encode())
    for name, t in inputs.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _dataset_hashes_in_tmp(tmp_path):
    """The record of the dataset files read (datarecord.HASHES_DIR) goes to the test's own folder, not
    the user's ~/.cache (patched on its own, so that a test's monkeypatch.undo() leaves it)."""
    from pipeline import datarecord

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datarecord, "user_cache_dir", lambda name: tmp_path / ".user-cache" / name)
        yield


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    if ASSET_CACHE and (Path(ASSET_CACHE) / "tiny-clip" / "config.json").is_file():
        return Path(ASSET_CACHE) / "tiny-clip"
    return assets.save_tiny_clip(
        (Path(ASSET_CACHE) if ASSET_CACHE else tmp_path_factory.mktemp("models")) / "tiny-clip"
    )


@pytest.fixture(scope="session")
def tiny_clip_reference(tiny_clip) -> tuple[np.ndarray, np.ndarray]:
    """The export's verification pictures, preprocessed for the tiny CLIP, and the fp32 torch model's
    features for them."""
    import torch
    from transformers import CLIPModel

    from pipeline import export
    from pipeline.embedders import preprocess_config_for_model
    from pipeline.preprocess import preprocess_batch

    pixels = preprocess_batch(export.verification_images(), preprocess_config_for_model(str(tiny_clip)))
    tower = export.image_tower(CLIPModel.from_pretrained(str(tiny_clip), attn_implementation="eager").eval())
    with torch.inference_mode():
        return pixels, tower(torch.from_numpy(pixels)).numpy()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_clip, tmp_path_factory) -> Path:
    from pipeline.export import INT8_RECIPES, export_onnx

    folder = Path(ASSET_CACHE) / "onnx" if ASSET_CACHE else tmp_path_factory.mktemp("onnx")
    path = folder / "tiny_int8_matmul.onnx"
    if not (ASSET_CACHE and path.is_file() and _int8_recipe(path) == INT8_RECIPES["static"]):
        # a cached file of an earlier recipe is made again; the VNNI profile's graph on every CPU,
        # so that the tests that share this file see the same graph wherever they run
        export_onnx(str(tiny_clip), path, profile="vnni")
    return path


def _int8_recipe(path: Path) -> str | None:
    from pipeline.embedders import file_metadata
    from pipeline.export import META_INT8_RECIPE

    return file_metadata(path).get(META_INT8_RECIPE)


def mixed_cells() -> list[tuple[str, bytes | None]]:
    """(kind, bytes) rows: plain JPEGs plus each awkward kind the issue names."""
    rows: list[tuple[str, bytes | None]] = [
        ("jpeg", assets.jpeg_bytes(90 + 7 * i, 120 + 3 * i, seed=i)) for i in range(24)
    ]
    rows[2] = ("corrupt", assets.corrupt_bytes())
    rows[4] = ("cmyk", assets.cmyk_jpeg())
    rows[5] = ("rgba", assets.rgba_png())
    rows[6] = ("exif", assets.exif_rotated_jpeg())
    rows[7] = ("gray", assets.grayscale_png())
    rows[8] = ("webp", assets.webp_bytes())
    rows[9] = ("empty", None)
    return rows


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory) -> Path:
    return assets.write_parquet_dataset(tmp_path_factory.mktemp("data") / "mixed", [c for _, c in mixed_cells()])


def _browser_paths() -> tuple[str, str] | None:
    import shutil

    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


@pytest.fixture
def browser(_chromium):
    """The session's Chromium for one test: on a blank page, with what earlier tests' pages logged
    read away (a page left open after its test stopped the server it came from logs each request
    that then fails, into the next test's console), and left on a blank page after it."""
    _chromium.get("about:blank")
    _chromium.get_log("browser")
    yield _chromium
    _chromium.get("about:blank")


@pytest.fixture(scope="session")
def _chromium():
    """A real headless Chromium driven by Selenium (Debian's chromium and chromium-driver; .ci/run
    installs them). Without them the browser tests are skipped here, and fail in CI, which sets
    FASHION_REQUIRE_BROWSER=1."""
    paths = _browser_paths()
    if paths is None:
        if os.environ.get("FASHION_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1366,900",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(arg)
    options.binary_location = paths[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def s3():
    """An S3 stand-in (moto's server) on 127.0.0.1 with one bucket, `bucket`; the AWS variables point
    every client of this process, and the processes it starts, at it. Yields (filesystem, env)."""
    server_mod = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    try:
        yield fs, env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()

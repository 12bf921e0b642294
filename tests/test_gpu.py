"""The GPU path on CPU tensors: torchvision decodes JPEGs on the CPU too, so the device decoder, the
tensor preprocessing, the mixed-format gallery loop and the device top-k all run here."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import main as cli
from pipeline.embedders import EmbedderSpec, OnnxEmbedder, make_embedder
from pipeline.gpu import DevicePreprocessor, inspect_jpeg
from pipeline.images import decode_image
from pipeline.preprocess import PreprocessConfig, preprocess
from pipeline.retrieval import topk_neighbours
from pipeline.store import read_manifest
from tests import assets
from tests.helpers import assert_same_up_to_rounding, stop_after_shards

SIZES = [
    (768, 1024),
    (1024, 768),
    (300, 900),
    (640, 480),
    (250, 251),
    (224, 224),
    (96, 128),
    (1200, 400),
    (2000, 150),
    (181, 999),
]


def _photo(i: int, w: int, h: int) -> bytes:
    """A photo-like JPEG (smooth regions, edges, noise) of w x h."""
    rng = np.random.default_rng(i)
    base = np.asarray(assets.rgb_image(w, h, seed=i), np.float64)
    base[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(0, 256, 3)
    noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return assets.encode(Image.fromarray(noisy), "JPEG", quality=90)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [_photo(i, w, h) for i, (w, h) in enumerate(SIZES)]


def test_device_preprocessing_matches_the_cpu_path(photos, tiny_onnx):
    """Against preprocess.py as the gallery runs it (PIL, reduced-size JPEG decode): mean absolute
    difference <= 0.03 per image in normalized units, embedding cosine >= 0.9995."""
    e = OnnxEmbedder(tiny_onnx)
    prep = e.preprocess_cfg
    x, thumbs, kept = DevicePreprocessor(prep, "cpu").process([inspect_jpeg(d) for d in photos])
    assert (
        kept == list(range(len(photos)))
        and x.shape == (len(photos), 3, 224, 224)
        and thumbs.shape == (len(photos), 128, 128, 3)
    )
    cpu = np.stack([preprocess(decode_image(d, min_side=prep.decode_min_side).image, prep) for d in photos])
    diff = np.abs(x.numpy() - cpu).mean(axis=(1, 2, 3))
    assert diff.max() <= 0.03, diff
    full = np.stack([preprocess(decode_image(d).image, prep) for d in photos])  # without the reduced decode
    level = 1 / 255 / min(prep.image_std)  # one 8-bit level in normalized units
    assert np.abs(x.numpy() - full).mean() <= 0.5 * level and np.abs(x.numpy() - full).max() <= 4 * level
    cos = np.sum(e.embed(x.numpy()) * e.embed(cpu), axis=1)
    assert cos.min() >= 0.9995, cos


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_to_the_tensor(orientation):
    data = assets.exif_rotated_jpeg(90, 50, orientation=orientation)
    jpeg = inspect_jpeg(data)
    assert jpeg.orientation == orientation and jpeg.oriented_size == decode_image(data).image.size
    got = DevicePreprocessor(PreprocessConfig(), "cpu").decode([jpeg])[0].permute(1, 2, 0).numpy()
    want = np.asarray(decode_image(data).image)
    assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 2


@pytest.mark.parametrize(
    "data, why",
    [
        (assets.rgba_png(), "png"),
        (assets.cmyk_jpeg(), "cmyk"),
        (assets.encode(assets.rgb_image(40, 30).convert("L"), "JPEG"), "greyscale"),
        (assets.webp_bytes(), "webp"),
        (b"\xff\xd8\xff\xe0 not really", "broken header"),
        (None, "no bytes"),
    ],
)
def test_what_the_device_decoder_does_not_take(data, why):
    assert inspect_jpeg(data) is None, why


def test_over_the_pixel_limit_is_left_to_the_cpu_decoder():
    assert inspect_jpeg(assets.jpeg_bytes(200, 100), max_pixels=10_000) is None
    assert inspect_jpeg(assets.jpeg_bytes(200, 100)) is not None


def test_a_batch_without_jpegs_decodes_nothing():
    x, thumbs, kept = DevicePreprocessor(PreprocessConfig(), "cpu").process([])
    assert kept == [] and x.shape == (0, 3, 224, 224) and thumbs.shape == (0, 128, 128, 3)


def test_a_truncated_jpeg_falls_back_to_the_cpu_decoder_and_its_error():
    truncated = assets.jpeg_bytes(200, 200)[:1500]
    assert inspect_jpeg(truncated) is not None  # the header is fine
    x, _, kept = DevicePreprocessor(PreprocessConfig(), "cpu").process([inspect_jpeg(truncated)])
    assert kept == [] and x.shape[0] == 0


@pytest.fixture(scope="module")
def mixed_formats(tmp_path_factory, photos):
    """JPEGs the device takes, beside everything it does not: PNG, WebP, CMYK and greyscale JPEGs,
    an EXIF-rotated JPEG, a truncated JPEG, text, an empty cell."""
    cells = list(photos[:6]) + [
        assets.rgba_png(),
        assets.webp_bytes(),
        assets.cmyk_jpeg(),
        assets.encode(assets.rgb_image(40, 30).convert("L"), "JPEG"),
        assets.exif_rotated_jpeg(120, 60, orientation=6),
        assets.jpeg_bytes(200, 200)[:1500],
        assets.corrupt_bytes(),
        None,
        assets.gray16_png(),
    ]
    return assets.write_parquet_dataset(tmp_path_factory.mktemp("mixed-formats") / "ds", cells)


def _run(ds, model, out, *extra) -> int:
    return cli.main(
        [
            "--dataset",
            str(ds),
            "--model",
            str(model),
            "--backend",
            "torch",
            "--output-dir",
            str(out),
            "--batch-size",
            "4",
            "--shard-rows",
            "8",
            "-q",
            *extra,
        ]
    )


def test_device_path_gives_the_cpu_path_manifest(mixed_formats, tiny_clip, tmp_path, capsys):
    cpu, dev = tmp_path / "cpu", tmp_path / "dev"
    assert _run(mixed_formats, tiny_clip, cpu) == 3
    assert _run(mixed_formats, tiny_clip, dev, "--decode", "device") == 3
    assert (dev / "embeddings" / "manifest.csv").read_bytes() == (cpu / "embeddings" / "manifest.csv").read_bytes()
    rows = read_manifest(dev / "embeddings" / "manifest.csv")
    assert [r.status for r in rows].count("failed") == 3  # truncated, text, empty
    assert "cannot decode pixels" in rows[11].error  # the truncated JPEG: the CPU decoder's own message
    a, b = np.load(cpu / "embeddings" / "embeddings.npy"), np.load(dev / "embeddings" / "embeddings.npy")
    assert a.shape == b.shape and np.sum(a * b, axis=1).min() >= 0.9995
    assert sorted(p.name for p in (dev / "images").iterdir()) == sorted(p.name for p in (cpu / "images").iterdir())
    thumbs = np.load(dev / "embeddings" / "thumbnails.npy")
    assert thumbs.shape == (len(a), 128, 128, 3) and (thumbs[:, 0, 0] == 255).any()  # white padding around photos
    side = json.loads((dev / "embeddings" / "embeddings.json").read_text())
    assert side["identity"]["pixels"] == "torchvision"
    assert json.loads((cpu / "embeddings" / "embeddings.json").read_text())["identity"]["pixels"] == "pil"
    # a query picture is decoded as each store's photos were: whole for the device's, at a reduced scale for the CPU's
    from pipeline import Catalog

    assert Catalog.open(dev, model=str(tiny_clip)).decode_min_side is None
    from pipeline.preprocess import PreprocessConfig

    assert Catalog.open(cpu, model=str(tiny_clip)).decode_min_side == PreprocessConfig.from_model_dir(
        tiny_clip).decode_min_side
    # a cache is never mixed with the other preprocessing when one is asked for
    capsys.readouterr()
    assert _run(mixed_formats, tiny_clip, dev, "--use-embeddings", "--decode", "cpu") == 1
    assert "pixels: cache has 'torchvision', asked for 'pil'" in capsys.readouterr().err
    assert _run(mixed_formats, tiny_clip, dev, "--use-embeddings") == 3  # not asked: reused as it is


def test_a_resume_never_mixes_cpu_and_device_pixels(mixed_formats, tiny_clip, tmp_path, monkeypatch, capsys):

    out = tmp_path / "o"
    stop_after_shards(monkeypatch, 1)
    assert _run(mixed_formats, tiny_clip, out, "--decode", "device") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert _run(mixed_formats, tiny_clip, out, "--decode", "cpu") == 1
    err = capsys.readouterr().err
    assert "different arguments" in err and "identity.pixels" in err and "torchvision" in err
    assert _run(mixed_formats, tiny_clip, out, "--decode", "device") == 3
    shutil.rmtree(out)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_device_topk_equals_the_numpy_topk(exclude_self, tmp_path):
    rng = np.random.default_rng(3)
    e = rng.normal(size=(300, 16)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    base = e[:1]
    tied = np.concatenate([np.repeat(base, 40, axis=0), -base, e[5:60]])  # 40 identical rows: ties by index
    for g, k in ((e, 7), (tied, 5), (tied, 45), (e[:3], 5)):
        a = topk_neighbours(g, g, k, exclude_self=exclude_self, block=64)
        b = topk_neighbours(g, g, k, exclude_self=exclude_self, block=64, device="cpu")
        assert_same_up_to_rounding(a, b, g, g, tol=1e-6)
    q = e[:20] + 0.01
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    a, b = topk_neighbours(q, e, 9), topk_neighbours(q, e, 9, device="cpu")
    assert_same_up_to_rounding(a, b, q, e, tol=1e-6)
    if exclude_self:  # the matrix too, from the device's distance blocks
        topk_neighbours(e, e, 3, exclude_self=True, matrix_path=tmp_path / "m.npy", device="cpu")
        assert np.allclose(np.load(tmp_path / "m.npy"), np.where(np.eye(len(e), dtype=bool), 0, 1 - e @ e.T), atol=1e-6)


def test_embed_tensor_equals_embed(tiny_onnx, tiny_clip):
    import torch

    x = np.random.default_rng(1).normal(size=(3, 3, 224, 224)).astype(np.float32)
    for e in (
        OnnxEmbedder(tiny_onnx),
        make_embedder(EmbedderSpec(model=str(tiny_clip), backend="torch", device="cpu")),
    ):
        assert np.allclose(e.embed(x), e.embed_tensor(torch.from_numpy(x)), atol=1e-6)


def test_jpeg_header_reads_no_pixels(monkeypatch):
    """inspect_jpeg reads the header only: a JPEG whose scan data is garbage is still taken."""
    data = bytearray(assets.jpeg_bytes(64, 48))
    sos = data.index(b"\xff\xda")
    data[sos + 20 : -2] = bytes(len(data) - sos - 22)
    jpeg = inspect_jpeg(bytes(data))
    assert jpeg is not None and (jpeg.width, jpeg.height) == (64, 48)
    assert Image.open(io.BytesIO(bytes(data))).size == (64, 48)


def test_pictures_of_one_size_are_processed_together_and_returned_in_order(photos):
    pre = DevicePreprocessor(PreprocessConfig(), "cpu")
    batch = [photos[0], photos[3], _photo(50, 768, 1024), photos[3], photos[1]]  # sizes A, B, A, B, C
    x, thumbs, kept = pre.process([inspect_jpeg(d) for d in batch])
    assert kept == [0, 1, 2, 3, 4]
    for k, data in enumerate(batch):
        alone, thumb, _ = pre.process([inspect_jpeg(data)])
        assert np.array_equal(x[k].numpy(), alone[0].numpy()) and np.array_equal(thumbs[k].numpy(), thumb[0].numpy())


def test_device_topk_settles_from_the_whole_row_only_when_ties_need_it(monkeypatch):
    """The device top-k takes k + EXTRA candidates; a row goes back to the exact host top-k only when
    ties at its k-th distance may run past them. Results equal numpy's either way."""
    from pipeline import retrieval

    calls = []
    exact = retrieval.topk_rows

    def counted(d, k):
        calls.append(len(d))
        return exact(d, k)

    monkeypatch.setattr(retrieval, "topk_rows", counted)

    def check(q, g, k, exclude_self=False):
        calls.clear()
        b = topk_neighbours(q, g, k, exclude_self=exclude_self, block=64, device="cpu")
        n_device = len(calls)
        a = topk_neighbours(q, g, k, exclude_self=exclude_self, block=64)
        # copies' products may round apart by an ulp on one path (AVX2 BLAS kernels): ties then differ
        assert_same_up_to_rounding(a, b, q, g, tol=1e-6)
        return n_device

    rng = np.random.default_rng(5)
    e = rng.normal(size=(300, 16)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert check(e, e, 7, exclude_self=True) == 0 and check(e, e, 7) == 0  # no ties: all on the device
    small = np.concatenate([np.repeat(e[:1], 12, axis=0), e[1:9]])  # 20 rows, 12 tied: every candidate is there
    assert check(small, small, 5, exclude_self=True) == 0
    same = np.repeat(e[:1], 20, axis=0)  # all 20 tied, all 20 candidates
    assert check(same, same, 5) == 0
    tied = np.concatenate([np.repeat(e[:1], 40, axis=0), e[1:60]])
    assert check(tied[:1], tied, 5) == 1  # 40 ties at the 5th distance, past the 21 candidates
    # distinct up to the k-th, then 40 ties further out: the candidates settle it, no fallback
    angles = np.concatenate([np.linspace(0.1, 0.6, 6), np.full(40, 1.0)])
    ring = np.zeros((46, 16), np.float32)
    ring[:, 0], ring[:, 1] = np.cos(angles), np.sin(angles)
    assert check(np.eye(16, dtype=np.float32)[:1], ring, 5) == 0

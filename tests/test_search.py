"""Query by image and by text, and evaluation against known answers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.embedders import Embedder, OnnxEmbedder, TorchEmbedder
from pipeline.search import metrics_from_ranks, product_ids, ranks_of_positives
from tests import assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, mixed_dataset, tiny_onnx):
    out = tmp_path_factory.mktemp("gallery")
    assert cli.main(["--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 3
    return out


def read_results(out: Path) -> list[dict]:
    with open(out / "retrieval_results" / "queries" / "query_results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.subprocess
def test_text_tower_onnx_equals_torch_and_needs_no_torch(tiny_clip, tiny_onnx):
    texts = ["a red floral dress", "blue shirt", "zz top 99"]
    t = TorchEmbedder(str(tiny_clip), device="cpu").embed_text(texts)
    o = OnnxEmbedder(tiny_onnx).embed_text(texts)
    assert t.shape == o.shape == (3, 16)
    assert np.min(np.sum(t * o, axis=1)) > 0.9999
    assert not np.allclose(t[0], t[1])  # different texts, different vectors
    code = f"""
import sys
from pipeline.embedders import OnnxEmbedder
v = OnnxEmbedder({str(tiny_onnx)!r}).embed_text(["a red floral dress"])
assert v.shape == (1, 16) and abs((v ** 2).sum() - 1) < 1e-5
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_query_image_finds_itself_first(gallery, tiny_onnx, mixed_dataset, tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    (q / "same.jpg").write_bytes((gallery / "images" / "img_00011.jpg").read_bytes())
    (q / "other.png").write_bytes((gallery / "images" / "img_00012.jpg").read_bytes())
    assert (
        cli.main(
            ["--query-image", str(q), "--onnx", str(tiny_onnx), "--output-dir", str(gallery), "-q", "--top-k", "3"]
        )
        == 0
    )
    rows = read_results(gallery)
    assert len(rows) == 6
    by_query = {r["query"]: [x for x in rows if x["query"] == r["query"]] for r in rows}
    assert (
        by_query["same.jpg"][0]["gallery_file"] == "img_00011.jpg" and float(by_query["same.jpg"][0]["distance"]) < 1e-5
    )
    assert by_query["other.png"][0]["gallery_file"] == "img_00012.jpg"
    for mine in by_query.values():
        assert [int(x["rank"]) for x in mine] == [1, 2, 3]
    assert len(list((gallery / "retrieval_results" / "queries").glob("q*.jpg"))) == 2


def test_query_text_ranks_as_the_model_says(gallery, tiny_onnx, tiny_clip):
    text = "a red floral dress"
    assert (
        cli.main(["--query-text", text, "--onnx", str(tiny_onnx), "--output-dir", str(gallery), "-q", "--top-k", "5"])
        == 0
    )
    rows = read_results(gallery)
    assert [r["kind"] for r in rows] == ["text"] * 5
    emb = np.load(gallery / "embeddings" / "embeddings.npy")
    t = TorchEmbedder(str(tiny_clip), device="cpu").embed_text([text])[0]  # transformers' own text tower
    d = 1 - emb @ t
    for r in rows:
        from pipeline.store import read_manifest

        man = {m.index: m for m in read_manifest(gallery / "embeddings" / "manifest.csv")}
        assert abs(d[man[int(r["row"])].embedding_row] - float(r["distance"])) < 2e-3
    assert [float(r["distance"]) for r in rows] == sorted(float(r["distance"]) for r in rows)
    assert float(rows[0]["distance"]) <= d.min() + 2e-3


def test_query_errors(gallery, tiny_onnx, tmp_path, capsys):
    assert (
        cli.main(
            ["--query-image", str(tmp_path / "nope.jpg"), "--onnx", str(tiny_onnx), "--output-dir", str(gallery), "-q"]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    lonely = tmp_path / "lonely_int8.onnx"
    lonely.write_bytes(tiny_onnx.read_bytes())
    assert cli.main(["--query-text", "red", "--onnx", str(lonely), "--output-dir", str(tmp_path / "x"), "-q"]) == 1
    assert cli.main(["--query-text", "red", "--evaluate"]) == 2


def test_rank_metrics_on_known_answers():
    g = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 0.2, 0.9]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranks = ranks_of_positives(q, g, [np.array([0]), np.array([1]), np.array([2])])
    assert list(ranks) == [1, 2, 2]
    m = metrics_from_ranks(ranks)
    assert (
        m["recall@1"] == pytest.approx(1 / 3)
        and m["recall@5"] == 1.0
        and m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    )
    assert product_ids(["MEN-Denim-id_00000080-01_7_additional", "WOMEN-id_00000080-02_1_front", "plain"]) == [
        "id_00000080",
        "id_00000080",
        "plain",
    ]
    g2 = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    assert list(ranks_of_positives(g2[:2], g2, [np.array([0, 1]), np.array([0])], exclude=np.array([0, 1]))) == [1, 1]
    # the query itself is excluded: without that, row 0 would find itself
    assert list(ranks_of_positives(g2[2:], g2, [np.array([0])], exclude=np.array([2]))) == [2]
    # ties count against the positive
    assert list(ranks_of_positives(g[:1], g, [np.array([1])], exclude=np.array([0]))) == [3]


def _garment(i: int) -> assets.Image.Image:
    return assets.rgb_image(96, 128, seed=100 + i)


def _noisy(image, seed: int, sigma: float = 4.0):
    noise = np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    return assets.Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))


def test_evaluate_person_to_garment_backends_side_by_side(tiny_clip, tiny_onnx, tmp_path):
    n = 12
    garments = [_garment(i) for i in range(n)]
    # the "person photo" is its garment with noise and stronger JPEG loss: close to it, far from the others
    photos = [_noisy(g, seed=i) for i, g in enumerate(garments)]
    ds = assets.write_parquet_dataset(
        tmp_path / "pairs",
        [assets.encode(p, "JPEG", quality=80) for p in photos],
        extra={"cloth": [assets.encode(g, "JPEG", quality=95) for g in garments]},
    )
    out = tmp_path / "out"
    code = cli.main(
        [
            "--evaluate", "--dataset", str(ds), "--model", str(tiny_clip), "--onnx", str(tiny_onnx), "--eval-backends",
            "torch,onnx-fp32,onnx-int8", "--output-dir", str(out), "-q",
        ]
    )
    assert code == 0
    report = json.loads((out / "outputs" / "evaluation.json").read_text())
    res = report["results"]["person->garment"]
    assert set(res) == {"torch", "onnx-fp32", "onnx-int8"}
    for m in res.values():
        assert m["queries"] == n and m["recall@1"] >= 0.75 and m["recall@10"] == 1.0 and 0 < m["mrr"] <= 1
    assert abs(res["torch"]["mrr"] - res["onnx-fp32"]["mrr"]) < 1e-6
    # shuffled garments: the same code must find it much worse
    shuffled = assets.write_parquet_dataset(
        tmp_path / "shuffled",
        [assets.encode(p, "JPEG", quality=80) for p in photos],
        extra={"cloth": [assets.encode(garments[(i + 5) % n], "JPEG", quality=95) for i in range(n)]},
    )
    assert (
        cli.main(["--evaluate", "--dataset", str(shuffled), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"])
        == 0
    )
    bad = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["person->garment"]["onnx-int8"]
    assert bad["recall@1"] <= 0.25
    assert (out / "outputs" / "evaluation.png").stat().st_size > 1000


def test_evaluate_segmented_reads_and_segments_each_row_once_for_all_backends(
    tiny_clip, tiny_onnx, tmp_path, monkeypatch, capsys
):
    from pipeline import catalog
    from pipeline.persons import Person, Segmenter

    n = 6
    garments = [_garment(i) for i in range(n)]
    ds = assets.write_parquet_dataset(
        tmp_path / "pairs",
        [assets.encode(_noisy(g, seed=i), "JPEG", quality=80) for i, g in enumerate(garments)],
        extra={"cloth": [assets.encode(g, "JPEG", quality=95) for g in garments]},
    )
    seen: list[tuple[int, int]] = []

    class CentrePerson(Segmenter):
        """The middle of each picture is the person; the first picture has nobody."""

        def segment(self, images_rgb):
            out = []
            for im in images_rgb:
                h, w = im.shape[:2]
                seen.append((h, w))
                mask = np.zeros((h, w), bool)
                mask[h // 8 : 7 * h // 8, w // 8 : 7 * w // 8] = True
                out.append([] if len(seen) == 1 else [Person(np.array([0, 0, w, h], np.float32), 0.9, mask)])
            return out

    monkeypatch.setattr(catalog, "make_segmenter", lambda spec, device: CentrePerson())
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--evaluate", "--use-segmentation", "--dataset", str(ds), "--model", str(tiny_clip), "--onnx",
                str(tiny_onnx), "--eval-backends", "torch,onnx-fp32,onnx-int8", "--output-dir", str(out), "-q",
            ]
        )
        == 0
    )
    assert seen == [(128, 96)] * n  # each row segmented once, at full size, whatever the number of backends
    assert "evaluate" not in capsys.readouterr().err  # -q: no progress bar
    res = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]
    assert set(res) == {"person->garment", "person->garment (segmented person)"}
    for task, queries in (("person->garment", n), ("person->garment (segmented person)", n - 1)):
        assert set(res[task]) == {"torch", "onnx-fp32", "onnx-int8"}
        assert all(m["queries"] == queries for m in res[task].values())
    seg = res["person->garment (segmented person)"]
    assert abs(seg["torch"]["mrr"] - seg["onnx-fp32"]["mrr"]) < 1e-6


def test_evaluate_same_product(tiny_onnx, tmp_path):
    cells, ids = [], []
    for p in range(6):
        for view in range(2):
            view_img = _noisy(_garment(p), seed=p * 10 + view, sigma=4.0 * view)
            cells.append(assets.encode(view_img, "JPEG", quality=90 - 10 * view))
            ids.append(f"WOMEN-Dresses-id_{p:08d}-0{view}_1_front")
    ds = assets.write_parquet_dataset(tmp_path / "inshop", cells, extra={"item_ID": ids})
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--onnx", str(tiny_onnx),
                "--output-dir", str(out), "-q",
            ]
        )
        == 0
    )
    m = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]["onnx-int8"]
    assert m["queries"] == 12 and m["recall@1"] >= 0.75


def test_evaluate_needs_ground_truth(mixed_dataset, tiny_onnx, tmp_path, capsys):
    assert (
        cli.main(
            [
                "--evaluate", "--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(tmp_path),
                "-q",
            ]
        )
        == 1
    )
    assert "--eval-id-column" in capsys.readouterr().err
    assert cli.main(["--evaluate", "--eval-backends", "tensorrt"]) == 2


class _AngleEmbedder(Embedder):
    """A fake embedder: each picture's red level is an angle in degrees; its vector is (cos, sin)."""

    def __init__(self):
        from pipeline.preprocess import PreprocessConfig

        self.preprocess_cfg, self.dim, self.identity = PreprocessConfig(), 2, {"backend": "fake"}

    def embed(self, pixels):
        cfg = self.preprocess_cfg
        red = (pixels[:, 0].mean(axis=(1, 2)) * cfg.image_std[0] + cfg.image_mean[0]) * 255
        a = np.deg2rad(np.round(red))
        return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_same_product_recall_is_the_known_answer(tmp_path, monkeypatch):
    """Products A (views at 0 and 30 degrees) and B (40 and 90): A0 and B1 find their other view
    first, A1 and B0 find the other product first (ranks 1, 2, 3, 1). A query counted as its own
    positive would make every rank 1."""
    from pipeline import search

    angles, ids = [0, 30, 40, 90], ["id_00000001-1", "id_00000001-2", "id_00000002-1", "id_00000002-2"]
    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in angles]
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ids})
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--backend", "torch", "--output-dir",
                str(out), "-q",
            ]
        )
        == 0
    )
    m = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]["torch"]
    assert m["queries"] == 4 and m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)


def test_query_paths_text_tiles_and_slugs(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.search import _slug, expand_image_paths, text_tile

    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d.jpg").mkdir()  # a folder named like an image is not one
    single = tmp_path / "notes.txt"
    assert expand_image_paths([str(tmp_path), str(single)]) == [
        tmp_path / "a.PNG",
        tmp_path / "b.jpg",
        tmp_path / "sub" / "c.webp",
        single,
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=f"^no query images found in {tmp_path / 'empty'}, {tmp_path / 'empty'}$"):
        expand_image_paths([str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert _slug("red floral / midi?") == "red_floral_midi" and _slug("?!") == "query" and len(_slug("a" * 99)) == 40
    tile = text_tile("a red floral midi dress with long sleeves and a belt", size=128)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    assert (tile[0, :] == 120).all() and (tile[:, 127] == 120).all()  # the grey frame
    assert (tile[64:127, 40:100] == 255).all()  # white below the text
    dark = (tile[:, 1:127].min(axis=2) < 100).any(axis=1)
    assert dark[5:17].any() and dark[17:29].any()  # wrapped onto a second line


def test_unreadable_query_image_is_recorded_and_a_personless_one_is_said(tmp_path):
    from pipeline.persons import Segmenter
    from pipeline.report import RunSummary
    from pipeline.search import _query_crops

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    summary = RunSummary("query")
    assert _query_crops(bad, None, summary) == []
    assert summary.failures == [(str(bad), "not a recognized image format (starts with b'not an i')")]

    class Nobody(Segmenter):
        def segment(self, images_rgb):
            return [[] for _ in images_rgb]

    good = tmp_path / "good.png"
    good.write_bytes(assets.encode(assets.rgb_image(30, 40), "PNG"))
    crops = _query_crops(good, Nobody(), summary)
    assert [label for label, _ in crops] == ["good.png"] and crops[0][1].size == (30, 40)
    assert summary.notes == ["good.png: no person found, the whole image is the query"]

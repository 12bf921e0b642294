"""Query by image and by text, and evaluation against known answers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import main as cli
from pipeline.embedders import Embedder, OnnxEmbedder, TorchEmbedder
from pipeline.identity import VectorIdentity
from pipeline.search import metrics_from_ranks, product_ids, ranks_of_positives
from tests import assets
from tests.helpers import file_of

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
import warnings
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
    (q / "same.jpg").write_bytes((gallery / "images" / file_of(gallery, 11)).read_bytes())
    (q / "other.png").write_bytes((gallery / "images" / file_of(gallery, 12)).read_bytes())
    assert (
        cli.main(
            ["--query-image", str(q), "--onnx", str(tiny_onnx), "--output-dir", str(gallery), "-q", "--top-k", "3"]
        )
        == 0
    )
    rows = read_results(gallery)
    assert len(rows) == 6
    by_query = {r["query"]: [x for x in rows if x["query"] == r["query"]] for r in rows}
    same = by_query["same.jpg"][0]
    assert same["gallery_file"] == file_of(gallery, 11) and float(same["distance"]) < 1e-5
    assert by_query["other.png"][0]["gallery_file"] == file_of(gallery, 12)
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
        == 2  # a usage error, like a bad flag
    )
    assert capsys.readouterr().err.strip() == f"error: query image {tmp_path / 'nope.jpg'} does not exist"
    # said before the gallery is opened or a model loaded: no gallery here, and the typo is what is said
    nowhere = tmp_path / "no-gallery"
    assert cli.main(["--query-image", str(tmp_path / "nope.jpg"), "--onnx", str(tmp_path / "no.onnx"),
                     "--output-dir", str(nowhere), "-q"]) == 2
    assert f"--onnx {tmp_path / 'no.onnx'}: no such file" in capsys.readouterr().err  # the flags' paths come first
    assert not nowhere.exists()
    notes = tmp_path / "notes.txt"  # the only query picture is not one: its reason is said
    notes.write_text("a red dress, size 38\n")
    assert cli.main(["--query-image", str(notes), "--onnx", str(tiny_onnx), "--output-dir", str(gallery), "-q"]) == 1
    err = capsys.readouterr().err
    assert "none of the query images could be read (notes.txt: " in err and "text file" in err, err
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
    # "id_" ending a word is not DeepFashion's product part: each of these is a product of its own
    assert product_ids(["plaid_7", "braid_7", "solid_9", "fluid_9", "x_id_12-3", "id_5"]) == [
        "plaid_7", "braid_7", "solid_9", "fluid_9", "id_12", "id_5"]
    assert product_ids(["id_2023A", "id_2023B", "id_7_front"]) == ["id_2023A", "id_2023B", "id_7"]  # two products
    g2 = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    assert list(ranks_of_positives(g2[:2], g2, [np.array([0, 1]), np.array([0])], exclude=np.array([0, 1]))) == [1, 1]
    # the query itself is excluded: without that, row 0 would find itself
    assert list(ranks_of_positives(g2[2:], g2, [np.array([0])], exclude=np.array([2]))) == [2]
    # ties count against the positive
    assert list(ranks_of_positives(g[:1], g, [np.array([1])], exclude=np.array([0]))) == [3]
    # the same photo twice scores alike only up to rounding (a matrix product's, a ulp or two either way):
    # still a tie, and it counts against the positive whichever way the rounding went
    q = np.array([[0.6, 0.8]], np.float32)
    for nudge in (1 - 2e-7, 1 + 2e-7):
        twin = np.array([[0.6, 0.8], [0.6 * nudge, 0.8 * nudge], [0, 1]], np.float32)
        assert list(ranks_of_positives(q, twin, [np.array([0])])) == [2]


def _garment(i: int) -> assets.Image.Image:
    return assets.rgb_image(96, 128, seed=100 + i)


def _noisy(image, seed: int, sigma: float = 4.0):
    noise = np.random.default_rng(seed).normal(0, sigma, (image.height, image.width, 3))
    return assets.Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))


def _three_backends_argv(ds, model, onnx, out, *extra: str) -> list[str]:
    """--evaluate on ds with the torch, ONNX fp32 and ONNX int8 backends side by side, then extra."""
    return [
        "--evaluate",
        *extra,
        "--dataset",
        str(ds),
        "--model",
        str(model),
        "--onnx",
        str(onnx),
        "--eval-backends",
        "torch,onnx-fp32,onnx-int8",
        "--output-dir",
        str(out),
        "-q",
    ]


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
    code = cli.main(_three_backends_argv(ds, tiny_clip, tiny_onnx, out))
    assert code == 0
    report = json.loads((out / "outputs" / "evaluation.json").read_text())
    res = report["results"]["person->garment"]
    assert set(res) == {"torch", "onnx-fp32", "onnx-int8"}
    for m in res.values():
        assert m["queries"] == n and m["recall@1"] >= 0.75 and m["recall@10"] == 1.0 and 0 < m["mrr"] <= 1
    assert abs(res["torch"]["mrr"] - res["onnx-fp32"]["mrr"]) < 1e-6
    # how the speed was measured is said (the figures varied 5x between runs, with nothing to judge them by)
    from pipeline.machine import cpu_label

    how = report["speed"]
    assert how["cpu"] == cpu_label() and how["threads"] >= 1 and how["batch"] >= 1
    assert how["pictures_timed"] > 0 and all(m["img_per_s"] > 0 for m in res.values())
    batches = -(-n // how["batch"])  # photos and garments each: the first batch of each untimed where others ran
    assert how["first_batch"] == ("not timed (warm-up)" if batches > 1 else "timed (the only one)")
    assert how["pictures_timed"] == (2 * n - 2 * min(n, how["batch"]) if batches > 1 else min(n, how["batch"]) * 2)
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
    from pipeline import galleries
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

    monkeypatch.setattr(galleries, "make_segmenter", lambda spec, device: CentrePerson())
    out = tmp_path / "out"
    assert cli.main(_three_backends_argv(ds, tiny_clip, tiny_onnx, out, "--use-segmentation")) == 0
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
                "--evaluate",
                "--eval-id-column",
                "item_ID",
                "--dataset",
                str(ds),
                "--onnx",
                str(tiny_onnx),
                "--output-dir",
                str(out),
                "-q",
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
                "--evaluate",
                "--dataset",
                str(mixed_dataset),
                "--onnx",
                str(tiny_onnx),
                "--output-dir",
                str(tmp_path),
                "-q",
            ]
        )
        == 1
    )
    assert "--eval-id-column" in capsys.readouterr().err
    assert cli.main(["--evaluate", "--eval-backends", "tensorrt"]) == 2


def test_a_mistyped_evaluation_column_of_a_parquet_is_said_before_any_model_loads(mixed_dataset, tiny_onnx,
                                                                                   tmp_path, capsys, monkeypatch):
    """Its footer names its columns: no model loaded (minutes for a real one) to learn of a typo."""
    from pipeline import search

    def no_model(spec):
        raise AssertionError("a model loaded before the columns were checked")

    monkeypatch.setattr(search, "make_embedder", no_model)
    base = ["--evaluate", "--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(tmp_path),
            "-q"]
    assert cli.main([*base, "--eval-id-column", "item_idd"]) == 1
    err = capsys.readouterr().err
    assert "has no column 'item_idd'; its columns are [" in err and "Choose one with --eval-id-column." in err
    assert cli.main([*base, "--eval-cloth-column", "garment"]) == 1
    err = capsys.readouterr().err
    assert "has no column 'garment'" in err and "--evaluate needs a 'garment' column (person -> garment)" in err


class _AngleEmbedder(Embedder):
    """A fake embedder: each picture's red level is an angle in degrees; its vector is (cos, sin)."""

    def __init__(self):
        from pipeline.preprocess import PreprocessConfig

        self.preprocess_cfg, self.dim, self.identity = PreprocessConfig(), 2, VectorIdentity(backend="fake")

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
                "--evaluate",
                "--eval-id-column",
                "item_ID",
                "--dataset",
                str(ds),
                "--backend",
                "torch",
                "--output-dir",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    m = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]["torch"]
    assert m["queries"] == 4 and m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)


def test_query_paths_and_slugs(tmp_path):
    from pipeline.errors import UsageError
    from pipeline.search import Query, expand_image_paths, picture_name, query_slug

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
    with pytest.raises(UsageError, match=f"^no query images found in {tmp_path / 'empty'}, {tmp_path / 'empty'}$"):
        expand_image_paths([str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert query_slug("red floral / midi?") == "red_floral_midi" and query_slug("?!") == "query"
    assert len(query_slug("a" * 99)) == 40
    assert query_slug("Xmas Red Dress X") == "Xmas_Red_Dress_X"  # capitals kept; only underscores trimmed
    assert query_slug("ünïcode é.jpg") == "ünïcode_é.jpg" and query_slug("robe d'été") == "robe_d_été"  # any script
    assert query_slug("हिन्दी कपड़े") == "हिन्दी_कपड़े"  # its vowel signs (marks) too
    # a file before a folder: both kept, in the order given
    assert expand_image_paths([str(single), str(tmp_path / "sub")]) == [single, tmp_path / "sub" / "c.webp"]
    # a query picture's name: the query's own suffix dropped, not doubled (q000_img_00042.jpg.jpg)
    tile = np.zeros((2, 2, 3), np.uint8)
    assert [picture_name(i, Query(label, kind, tile)) for i, (label, kind) in enumerate([
        ("img_00042.jpg", "image"), ("look.PNG#p1", "image"), ("shot.webp", "image"), ("red dress.jpg", "text"),
        ("front.jpg “red dress”", "image+text"),  # a picture plus a text: not q004_front.jpg_red_dress.jpg
    ])] == ["q000_img_00042.jpg", "q001_look_p1.jpg", "q002_shot.jpg", "q003_red_dress.jpg", "q004_front_red_dress.jpg"]


def test_unreadable_query_image_is_recorded_and_a_personless_one_is_said(tmp_path):
    from pipeline.config import QuerySpec, RunConfig
    from pipeline.persons import Segmenter
    from pipeline.report import RunSummary
    from pipeline.search import embed_queries
    from pipeline.searcher import query_crops

    class Nobody(Segmenter):
        def segment(self, images_rgb):
            return [[] for _ in images_rgb]

    class PictureOnly:
        """The two Catalog methods a picture query uses, with the real query_crops."""

        def query_crops(self, picture, segment=False, name=None):
            from pipeline.images import decode_image

            return query_crops(decode_image(Path(picture).read_bytes()).image, name or Path(picture).name, Nobody())

        def embed_crops(self, crops):
            return np.ones((len(crops), 4), np.float32) / 2

    bad, good = tmp_path / "bad.jpg", tmp_path / "good.png"
    bad.write_bytes(b"not an image")
    good.write_bytes(assets.encode(assets.rgb_image(30, 40), "PNG"))
    summary = RunSummary("query")
    cfg = RunConfig(query=QuerySpec(images=(str(bad), str(good))), use_segmentation=True)
    queries, vectors = embed_queries(cfg, PictureOnly(), summary, [bad, good])
    assert summary.failures == [(str(bad), "not a recognized image format (it starts like a text file)")]
    assert [q.label for q in queries] == ["good.png"] and len(vectors) == 1 and vectors[0].shape == (1, 4)
    assert summary.notes == [
        "good.png: no person cut from it (none found, or none with a mask): the whole image is the query"]
    crops, found = query_crops(assets.rgb_image(30, 40), "good.png", Nobody())
    assert not found and [c.label for c in crops] == ["good.png"] and crops[0].image.size == (30, 40)


class _CountingEmbedder(_AngleEmbedder):
    """_AngleEmbedder that remembers the size of every batch it was given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def embed(self, pixels):
        self.batches.append(len(pixels))
        return super().embed(pixels)


def test_batcher_batches_rows_times_and_empty_results(monkeypatch):
    from pipeline import search

    clock = iter(range(100))
    # each call: one second on (the module's own `time`: the real one stays for everyone else)
    monkeypatch.setattr(search, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    e = _CountingEmbedder()
    b = search.EvalBatcher({"fake": e}, batch_size=2)
    empty, rows = b.result("fake")  # nothing added
    assert empty.shape == (0, 2) and empty.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (0,)
    for row, angle in ((7, 0), (3, 90), (9, 180), (4, 270), (8, 30)):
        image = assets.rgb_image(32, 32, color=(angle, 0, 0))
        b.add(row, {e.preprocess_cfg.decode_min_side: image})
    assert e.batches == [2, 2]  # a batch goes as soon as it is full
    emb, rows = b.result("fake")
    assert e.batches == [2, 2, 1] and rows.tolist() == [7, 3, 9, 4, 8] and rows.dtype == np.int64
    assert (
        emb.dtype == np.float32 and np.allclose(emb[1], [0, 1], atol=1e-6) and np.allclose(emb[2], [-1, 0], atol=1e-6)
    )
    # three batches of one fake second each: the first (a warm-up) apart, the two after it added up
    assert b.speed_parts("fake") == (2.0, 3, 1.0, 2)


def test_rank_metrics_of_no_queries_and_blocks():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mean of an empty array
        m = metrics_from_ranks(np.array([], np.int64))
    assert m["queries"] == 0 and all(m[k] is None for k in ("recall@1", "recall@5", "recall@10", "mrr"))
    rng = np.random.default_rng(0)
    g = rng.normal(size=(30, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    positives = [np.array([(i + 1) % 30, (i + 7) % 30]) for i in range(30)]
    exclude = np.arange(30)
    whole = ranks_of_positives(g, g, positives, exclude=exclude)
    blocked = ranks_of_positives(g, g, positives, exclude=exclude, block=4)  # 30 queries in blocks of 4
    assert whole.dtype == np.int64 and np.array_equal(whole, blocked) and whole.min() >= 1


def test_evaluation_records_unreadable_rows_and_goes_on(tmp_path, capsys):
    from pipeline.dataset import DatasetSpec
    from pipeline.report import RunSummary
    from pipeline.search import embed_pass

    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in (0, 30, 40, 90)]
    cells[1], cells[2] = None, b"not a picture"
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ["id_1", "id_1", "id_2", "id_2"]})
    summary = RunSummary(mode="evaluate")
    out = embed_pass(
        DatasetSpec(name=str(ds), limit=None, extra_columns=("item_ID",)),
        {"fake": _AngleEmbedder()},
        2,
        summary,
        None,
        "item_ID",
        None,
        progress=True,
    )
    _, rows = out["fake"]["photos"]
    assert rows.tolist() == [0, 3]  # the rows after the bad ones are evaluated
    err = capsys.readouterr().err
    assert "evaluate: " in err and "/4 [" in err and "row/s" in err  # the progress bar: label, total, unit
    assert err.endswith("\r") and not err.endswith("\n")  # and it leaves no line behind when done
    assert [item for item, _ in summary.failures] == [f"{ds}[1]", f"{ds}[2]"]
    reasons = [reason for _, reason in summary.failures]
    assert reasons[0] == "row has no image (empty cell)" and "not a recognized image format" in reasons[1]


def test_short_error_messages():
    from pipeline.images import short_reason

    assert short_reason(ValueError("  bad header \n")) == "bad header"
    assert short_reason(KeyError()) == "KeyError"  # no message: the exception's type
    assert short_reason(ValueError("x" * 200)) == "x" * 200
    long = short_reason(ValueError("y" * 201))
    assert len(long) == 200 and long == "y" * 197 + "..."


def test_evaluation_table_format():
    from pipeline.search import format_table

    m = {"queries": 4, "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.70833, "img_per_s": 61.25}
    assert format_table({"same-product": {"onnx": m, "torch": {**m, "img_per_s": None}}}).splitlines() == [
        "| task | model / backend | queries | R@1 | R@5 | R@10 | MRR | img/s |",
        "|---|---|---|---|---|---|---|---|",
        "| same-product | onnx | 4 | 0.500 | 1.000 | 1.000 | 0.708 | 61.2 |",
        "| same-product | torch | 4 | 0.500 | 1.000 | 1.000 | 0.708 | — |",
    ]


def test_evaluation_chart_shows_the_numbers(monkeypatch, tmp_path):
    from pipeline import search

    saved = []
    monkeypatch.setattr(search, "save_figure", lambda fig, path: saved.append((fig, path)))
    a = {"queries": 4, "recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75, "mrr": 0.4}
    b = {"queries": 4, "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "mrr": 0.7}
    search.plot_evaluation({"person-garment": {"torch": a, "onnx": b}}, tmp_path / "e.png")
    ((fig, path),) = saved
    ax = fig.axes[0]
    assert path == tmp_path / "e.png" and fig.dpi == 110 and tuple(fig.get_size_inches()) == (6, 4.2)
    keys = ["recall@1", "recall@5", "recall@10", "mrr"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == keys
    bars = ax.patches
    assert [round(p.get_height(), 6) for p in bars] == [a[k] if i == 0 else b[k] for k in keys for i in (0, 1)]
    width = 0.8 / 4
    assert all(p.get_width() == pytest.approx(width) for p in bars)
    # bar j of backend i is at i + j * width (centred), and each tick under the middle of its group
    assert [p.get_x() + p.get_width() / 2 for p in bars] == pytest.approx(
        [i + j * width for j in range(4) for i in (0, 1)]
    )
    assert list(ax.get_xticks()) == pytest.approx([0.3, 1.3])
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == ["torch", "onnx"]  # the task is the panel's title
    assert all(t.get_fontsize() == 8 for t in labels)
    assert ax.get_ylim() == (0, 1) and ax.get_title() == "person-garment"
    assert fig._suptitle.get_text() == "Retrieval quality against ground truth"
    fig.canvas.draw()  # the legend sits beside the bars, where it hides none of them
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    saved.clear()
    search.plot_evaluation({"t": {f"b{i}": a for i in range(5)}}, tmp_path / "e.png")
    assert saved[0][0].get_size_inches()[0] > 6  # wider with more bars
    # Two tasks, long model paths: a panel each, every name shortened and wrapped, no label over another
    saved.clear()
    models = {f"/home/someone/models/{n}": a for n in ("fashion-clip", "marqo-fashionsiglip")}
    models["/home/someone/onnx/fashion_clip_image_int8_matmul.onnx (onnx)"] = b
    search.plot_evaluation({"person->garment": models, "person->garment (segmented person)": models},
                           tmp_path / "e.png")
    fig = saved[0][0]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for ax in fig.axes for t in ax.get_xticklabels()]
    assert len(boxes) == 6 and all("\n" in t.get_text() or len(t.get_text()) <= 22
                                   for ax in fig.axes for t in ax.get_xticklabels())
    assert not any(p.overlaps(q) for i, p in enumerate(boxes) for q in boxes[i + 1:])


def test_an_unreadable_query_image_is_recorded_and_the_rest_answered(gallery, tiny_onnx, tmp_path, capsys):
    bad, good = tmp_path / "bad.jpg", tmp_path / "good.jpg"
    bad.write_bytes(b"not a picture")
    good.write_bytes((gallery / "images" / file_of(gallery, 11)).read_bytes())
    argv = [
        "--query-image",
        str(bad),
        str(good),
        "--onnx",
        str(tiny_onnx),
        "--output-dir",
        str(gallery),
        "--top-k",
        "2",
    ]
    assert cli.main(argv) == 3  # some items failed
    said = capsys.readouterr().out
    assert "failures: 1 item(s)" in said and str(bad) in said and "not a recognized image format" in said
    assert {r["query"] for r in read_results(gallery)} == {"good.jpg"}


def test_evaluate_records_a_row_without_garment_and_scores_the_rest(tiny_onnx, tmp_path, capsys):
    n = 6
    garments = [_garment(i) for i in range(n)]
    ds = assets.write_parquet_dataset(
        tmp_path / "pairs",
        [assets.encode(_noisy(g, seed=i), "JPEG", quality=80) for i, g in enumerate(garments)],
        extra={"cloth": [None if i == 3 else assets.encode(g, "JPEG", quality=95) for i, g in enumerate(garments)]},
    )
    out = tmp_path / "out"
    code = cli.main(["--evaluate", "--dataset", str(ds), "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"])
    assert code == 3  # an item failed, and the run still finished
    captured = capsys.readouterr()
    assert "pairs[3] (cloth): no garment image" in captured.out + captured.err
    res = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["person->garment"]["onnx-int8"]
    assert res["queries"] == n - 1


def test_both_segmentation_flags_make_each_person_a_query(tmp_path):
    """In the search modes --use-segmentation and --use-embedded-segment mean the same: the segmented
    gallery, and each person of a query picture a query."""
    from pipeline.config import QuerySpec, RunConfig
    from pipeline.report import RunSummary
    from pipeline.search import embed_queries
    from pipeline.searcher import QueryCrop

    class Recording:
        asked: list[bool] = []

        def query_crops(self, picture, segment=False, name=None):
            self.asked.append(segment)
            return [QueryCrop("p#p0", assets.rgb_image(8, 8))], True

        def embed_crops(self, crops):
            return np.ones((len(crops), 2), np.float32)

    picture = tmp_path / "p.png"
    picture.write_bytes(assets.encode(assets.rgb_image(8, 8), "PNG"))
    catalog = Recording()
    for flags in ({"use_segmentation": True}, {"use_embedded_segment": True}, {}):
        cfg = RunConfig(query=QuerySpec(images=(str(picture),)), **flags)
        embed_queries(cfg, catalog, RunSummary("query"))
    assert catalog.asked == [True, True, False]


@pytest.mark.parametrize(
    "more, ranks",
    [
        ([], [2, 3, 4, 1]),
        # the bag at 15 degrees is out of the gallery: A0 and A1 move up a place, B0 two
        (["--filter", "category = 'dress'"], [1, 2, 3, 1]),
        # products, not photos: the bag and B's views are one collection (Z), scored by its best photo
        (["--group-by", "collection"], [2, 2, 2, 1]),
    ],
)
def test_evaluation_honours_filter_and_group_by_with_known_ranks(tmp_path, monkeypatch, more, ranks):
    """Photos at 0, 30 (product A), 40, 90 (product B) and a bag at 15 degrees (C). The queries are
    A0, A1, B0, B1 (the bag's product has no other photo); their ranks are worked out by hand."""
    from pipeline import search

    angles, ids = [0, 30, 40, 90, 15], ["id_00000001-1", "id_00000001-2", "id_00000002-1", "id_00000002-2",
                                        "id_00000003-1"]
    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in angles]
    extra = {"item_ID": ids, "category": ["dress"] * 4 + ["bag"], "collection": ["X", "Y", "Z", "Z", "Z"]}
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra=extra)
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    out = tmp_path / "out"
    code = cli.main(["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--backend", "torch",
                     "--output-dir", str(out), "-q", *more])
    assert code == 0
    report = json.loads((out / "outputs" / "evaluation.json").read_text())
    m = report["results"]["same-product"]["torch"]
    assert m["queries"] == 4 and m["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert m["recall@1"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
    assert report["filter"] == (more[1] if more[:1] == ["--filter"] else None)


def test_evaluation_refuses_an_unknown_filter_or_group_column_before_embedding(tmp_path, monkeypatch, capsys):
    from pipeline import search

    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in (0, 10)]
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ["a", "a"]})
    monkeypatch.setattr(search, "make_embedder", lambda spec: pytest.fail("embedded before the check"))
    base = ["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--output-dir", str(tmp_path / "o")]
    assert cli.main([*base, "--filter", "size = 'M'"]) == 2
    assert "--filter: unknown column 'size'" in capsys.readouterr().err
    assert cli.main([*base, "--group-by", "size"]) == 2
    assert "--group-by: unknown column 'size'; the dataset's columns are: item_ID" in capsys.readouterr().err


class _BlindEmbedder(_AngleEmbedder):
    """Every picture at the same place: nothing can be told apart (ties count against the query)."""

    def embed(self, pixels):
        return np.tile(np.array([[1.0, 0.0]], np.float32), (len(pixels), 1))


def test_eval_models_compares_models_side_by_side_in_one_pass(tmp_path, monkeypatch):
    """Two models, one pass: each row is decoded once, each model ranks with its own vectors. The
    angle model finds ranks 1, 2, 3, 1 (as above); the blind one ranks every photo's twin behind
    the two others (rank 3)."""
    from pipeline import search

    angles, ids = [0, 30, 40, 90], ["id_00000001-1", "id_00000001-2", "id_00000002-1", "id_00000002-2"]
    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in angles]
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ids})
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder() if spec.model == "angles"
                        else _BlindEmbedder())
    decoded = []
    real_decode = search.decode_image
    monkeypatch.setattr(search, "decode_image", lambda data, **kw: decoded.append(1) or real_decode(data, **kw))
    out = tmp_path / "out"
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--eval-models", "angles,blind", "--dataset", str(ds),
                     "--output-dir", str(out), "-q"]) == 0
    res = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]
    assert list(res) == ["angles", "blind"] and len(decoded) == 4  # four rows, decoded once for both
    assert res["angles"]["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    assert res["blind"]["mrr"] == pytest.approx(1 / 3) and res["blind"]["recall@1"] == 0.0
    assert all(m["img_per_s"] is None or m["img_per_s"] > 0 for m in res.values())
    assert cli.main(["--evaluate", "--eval-models", "a,b", "--eval-backends", "torch"]) == 2


def test_eval_models_with_real_models_of_three_families(tiny_onnx, tiny_clip, tmp_path):
    """A CLIP folder, its int8 ONNX export, a SigLIP folder and an open_clip folder, each with its
    own preprocessing (224 crop, 64 squash), in one table with their speeds."""
    pytest.importorskip("open_clip")
    siglip = assets.save_tiny_siglip(tmp_path / "siglip")
    _, open_clip_dir = assets.save_tiny_open_clip(tmp_path / "open_clip")
    cells, ids = [], []
    for p in range(4):
        for view in range(2):
            cells.append(assets.encode(_noisy(_garment(p), seed=p * 10 + view, sigma=4.0 * view), "JPEG", quality=90))
            ids.append(f"id_{p:08d}-{view}")
    ds = assets.write_parquet_dataset(tmp_path / "inshop", cells, extra={"item_ID": ids})
    out = tmp_path / "out"
    models = f"{tiny_clip},{tiny_onnx},{siglip},{open_clip_dir}"
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--eval-models", models, "--dataset", str(ds),
                     "--output-dir", str(out), "-q"]) == 0
    res = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]
    assert list(res) == [str(tiny_clip), f"{tiny_onnx.name} (onnx)", str(siglip), str(open_clip_dir)]
    assert all(m["queries"] == 8 and m["img_per_s"] > 0 for m in res.values())
    assert res[str(tiny_clip)]["mrr"] == pytest.approx(res[f"{tiny_onnx.name} (onnx)"]["mrr"], abs=0.15)
    # each model's inference one level under the embedding, in the order given: a path's "/" nested it deeper
    from pipeline.webreport import read_section

    stages = read_section(out / "outputs", "evaluation")["summary"]["stages"]
    inference = [st for st in stages if st["label"].startswith("inference ")]
    assert [st["label"] for st in inference] == [f"inference {name}" for name in list(res)]
    assert {st["depth"] for st in inference} == {1}


class _FailingEmbedder(_AngleEmbedder):
    """Fails on its second batch, as a model out of memory would."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def embed(self, pixels):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA out of memory")
        return super().embed(pixels)


def test_evaluation_says_what_it_cannot_score_and_scores_the_rest(tmp_path, monkeypatch, capsys):
    """Rows without a product id are no product together (they inflated recall as one product); a
    model that fails midway is left out and said, the others scored; a filter that keeps nothing is
    refused before embedding; no query at all is null in the JSON and a dash in the table."""
    from pipeline import search

    angles = [0, 30, 80, 85, 200]
    ids = ["id_00000001-1", "id_00000001-2", None, "", "id_00000009-1"]
    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in angles]
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ids, "category": ["dress"] * 5})
    made = {"angles": _AngleEmbedder, "failing": _FailingEmbedder}
    monkeypatch.setattr(search, "make_embedder", lambda spec: made[spec.model]())
    out = tmp_path / "out"
    base = ["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--output-dir", str(out),
            "--batch-size", "2"]
    assert cli.main([*base, "--eval-models", "angles,failing"]) == 3  # a model left out is a failure of the run
    said = capsys.readouterr()
    written = json.loads((out / "outputs" / "evaluation.json").read_text())
    res = written["results"]["same-product"]
    assert list(res) == ["angles"]  # the failing model left out, the other scored on every row
    assert res["angles"]["queries"] == 2 and res["angles"]["recall@1"] == 1.0  # A0 and A1; nulls are no product
    assert written["failed"] == {"failing": "RuntimeError: CUDA out of memory"}
    assert list(written["made_by"]) == ["angles"]
    assert written["photos"] == 5 and "2 photo(s) without a product id" in " ".join(written["notes"])
    assert ("model failing: failed while embedding and left out of the comparison: RuntimeError: CUDA out of memory"
            in said.out)
    assert "2 photo(s) without a product id: not queries, and no query's right answer" in said.out
    assert "1 queries skipped: their product has no other image among the photos evaluated" in said.out
    monkeypatch.setattr(search, "make_embedder", lambda spec: pytest.fail("embedded before the check"))
    assert cli.main([*base, "--eval-models", "angles", "--filter", "category = 'Dress'"]) == 2
    assert "keeps none of the 5 rows: nothing to evaluate" in capsys.readouterr().err
    # Every product with one photo: no query; null in the JSON, a dash in the table
    single = assets.write_parquet_dataset(tmp_path / "single", cells[:2], extra={"item_ID": ["a", "b"]})
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(single), "--backend", "torch",
                     "--output-dir", str(tmp_path / "o2")]) == 0
    text = (tmp_path / "o2" / "outputs" / "evaluation.json").read_text()
    assert json.loads(text)["results"]["same-product"]["torch"]["mrr"] is None and "NaN" not in text
    assert "| same-product | torch | 0 | — | — | — | — |" in capsys.readouterr().out


def test_non_finite_vectors_rank_their_answers_last_and_identical_garments_are_one_answer():
    from pipeline.search import _person_to_garment, ranks_of_positives

    g = np.array([[1, 0], [0, 1], [np.nan, np.nan]], np.float32)
    # a NaN query: its positive last, not first
    assert ranks_of_positives(np.array([[np.nan, np.nan]], np.float32), g, [np.array([0])]).tolist() == [3]
    # a NaN item in the gallery is never ranked below a real positive either
    assert ranks_of_positives(np.array([[1, 0]], np.float32), g, [np.array([0])]).tolist() == [2]
    # a NaN positive does not hide a good one; a NaN query excluded from its gallery is last, not past it
    assert ranks_of_positives(np.array([[1, 0]], np.float32), g, [np.array([0, 2])]).tolist() == [1]
    four = np.array([[1, 0], [0, 1], [0.6, 0.8], [np.nan, np.nan]], np.float32)
    assert ranks_of_positives(four[3:], four, [np.array([0])], exclude=np.array([3])).tolist() == [3]
    # Rows 0 and 1 wear the same garment picture (the same bytes): either garment is row 0's answer
    photos, garments = np.array([[0, 1]], np.float32), np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    rows = np.array([0, 1, 2])
    alone = _person_to_garment(photos, np.array([0]), garments, rows)
    same = _person_to_garment(photos, np.array([0]), garments, rows, garment_sha={0: "x", 1: "x", 2: "y"})
    assert alone["mrr"] == pytest.approx(1 / 3) and same["recall@1"] == 1.0



def test_eval_backends_compare_one_model_and_name_an_fp32_file_as_such(tiny_onnx, tiny_clip, tmp_path, capsys):
    """--eval-backends compares one model on several backends: an ONNX file exported from another
    model is refused (its row would show that model's accuracy and speed as the backend's); a
    --onnx that names the fp32 file is the onnx-fp32 row, not onnx-int8."""
    import main as cli_main
    from pipeline.config import config_from_flags
    from pipeline.export import fp32_path_for
    from pipeline.search import evaluation_specs

    other = assets.save_tiny_clip(tmp_path / "other", seed=3)
    argv = ["--evaluate", "--model", str(other), "--onnx", str(tiny_onnx), "--eval-backends", "torch,onnx-int8",
            "--output-dir", str(tmp_path / "o")]
    assert cli_main.main(argv) == 2
    assert f"was exported from {tiny_clip.resolve()}, not from --model {other}" in capsys.readouterr().err
    fp32 = fp32_path_for(tiny_onnx)
    cfg = config_from_flags({"evaluate": True, "onnx": str(fp32)}, explicit=frozenset({"onnx"}))
    specs = evaluation_specs(cfg)
    assert list(specs) == ["onnx-fp32"] and specs["onnx-fp32"].onnx == str(fp32)


def test_eval_backends_refuse_an_fp32_twin_that_is_missing_not_fp32_or_of_another_model(tiny_onnx, tiny_clip,
                                                                                         tmp_path):
    """The onnx-fp32 row is the fp32 file exported with the int8 one: one not there says which export
    makes it (not an --export-onnx to the fp32 name, which would write an int8 file there); an int8
    file under the fp32 name, or an fp32 file a later export of another model left there, is refused
    rather than scored as this model's fp32."""
    import shutil

    import onnx
    from pipeline.config import config_from_flags
    from pipeline.embedders import META_SOURCE_MODEL
    from pipeline.errors import UsageError
    from pipeline.export import fp32_path_for
    from pipeline.search import evaluation_specs

    int8 = tmp_path / "m_int8.onnx"
    shutil.copy(tiny_onnx, int8)
    cfg = config_from_flags({"evaluate": True, "onnx": str(int8), "eval_backends": "onnx-int8,onnx-fp32"},
                            explicit=frozenset({"onnx", "eval_backends"}))
    twin = tmp_path / "m_fp32.onnx"
    # with the int8 file there; then with neither file there yet (no export at all): the export named is the int8
    # file's, which writes both, and an int8 file written under the fp32 name by the old advice is refused as such
    fresh = config_from_flags({"evaluate": True, "onnx": str(int8), "model": str(tiny_clip),
                               "eval_backends": "torch,onnx-fp32"},
                              explicit=frozenset({"onnx", "eval_backends", "model"}))
    for asked in (cfg, fresh):
        if asked is fresh:
            int8.unlink()
            twin.unlink()
        with pytest.raises(UsageError, match=f"{twin} not found; it is the fp32 file that python main.py --export-onnx "
                                             f"--model {tiny_clip} --onnx {int8} writes beside the int8 file"):
            evaluation_specs(asked)
        shutil.copy(tiny_onnx, twin)
        with pytest.raises(UsageError, match="is an int8-static.* export, not an fp32 one"):
            evaluation_specs(asked)
    shutil.copy(tiny_onnx, int8)
    model = onnx.load(str(fp32_path_for(tiny_onnx)))
    for prop in model.metadata_props:
        if prop.key == META_SOURCE_MODEL:
            prop.value = "someone/another-model"
    onnx.save(model, str(twin))
    with pytest.raises(UsageError, match="the files were exported from different models"):
        evaluation_specs(cfg)
    shutil.copy(fp32_path_for(tiny_onnx), twin)
    assert [s.onnx for s in evaluation_specs(cfg).values()] == [str(int8), str(twin)]


def test_a_non_finite_photo_spoils_no_product_when_ranks_count_products():
    """--group-by: a product is scored by its best photo; one NaN vector among its photos (a model's
    non-finite output) must not make the whole product NaN, ranked last with its good photos."""
    angle = np.deg2rad([0, 5, 0, 40, 70, 100])
    g = np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32)
    g[2] = np.nan  # product A: photos 0, 1 and a broken one
    groups = np.array([0, 0, 0, 1, 2, 3])
    q = g[:1]
    assert list(ranks_of_positives(q, g, [np.array([1])], exclude=np.array([0]), groups=groups)) == [1]
    broken = np.full((1, 2), np.nan, np.float32)  # a product NaN throughout still ranks its answer last
    g2 = np.concatenate([g[3:], broken])
    assert list(ranks_of_positives(q, g2, [np.array([3])], groups=np.array([0, 1, 2, 3]))) == [4]


def test_query_pictures_that_share_a_name_are_labelled_by_their_path():
    from pipeline.search import query_labels

    paths = [Path("q/x/a.jpg"), Path("q/y/a.jpg"), Path("q/b.jpg")]
    assert query_labels(paths) == {paths[0]: "x/a.jpg", paths[1]: "y/a.jpg", paths[2]: "b.jpg"}
    # as many folders as tell them apart, not the whole path typed (/home/me/shop/... in every row)
    deep = [Path("/home/me/shop/women/SKU1/front.jpg"), Path("/home/me/shop/men/SKU1/front.jpg"),
            Path("/home/me/shop/men/SKU2/front.jpg"), Path("/home/me/shop/men/SKU2/side.jpg")]
    assert list(query_labels(deep).values()) == ["women/SKU1/front.jpg", "men/SKU1/front.jpg", "SKU2/front.jpg",
                                                 "side.jpg"]
    # a picture given twice is one picture (the other was left labelled like it); a root is written once
    twice = [Path("a/x/f.jpg"), Path("a/x/f.jpg"), Path("b/x/f.jpg")]
    assert query_labels(twice) == {twice[0]: "a/x/f.jpg", twice[2]: "b/x/f.jpg"}
    assert list(query_labels([Path("f.jpg"), Path("/f.jpg")]).values()) == ["f.jpg", "/f.jpg"]


def test_a_torch_store_follows_its_model_folder_by_its_weights(tiny_clip, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_clip, tmp_path / "clip_a")
    data = assets.write_parquet_dataset(tmp_path / "data", [assets.jpeg_bytes(64, 80, seed=s) for s in range(6)])
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(data), "--model", str(folder), "--backend", "torch", "--output-dir", str(out),
                     "--limit", "0", "-q"]) == 0
    moved = folder.rename(tmp_path / "clip_b")
    capsys.readouterr()
    # with no model flag, the folder the store names is gone: said, with what to pass
    assert cli.main(["--output-dir", str(out), "--query-text", "red", "-q"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"made by the model folder {folder}, which is not there any more: pass --model FOLDER" in err
    # the same weights in the folder it moved to are the same model
    assert cli.main(["--output-dir", str(out), "--query-text", "red", "--model", str(moved)]) == 0
    assert len(read_results(out)) == 5
    said = " ".join(capsys.readouterr().out.split())  # the folder loaded named beside the one the store records
    assert f"model: {folder} (torch, fp32), loaded from {moved} (the same weights;" in said, said
    # other weights are not
    other = assets.save_tiny_clip(tmp_path / "clip_c", seed=1)
    capsys.readouterr()
    assert cli.main(["--output-dir", str(out), "--query-text", "red", "--model", str(other), "-q"]) == 1
    assert "model_sha256: cache has" in capsys.readouterr().err


def test_evaluation_counts_the_rows_without_a_product_among_those_the_filter_keeps(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.dataset import DatasetSpec
    from pipeline.report import RunSummary
    from pipeline.search import evaluation_scope

    cells = [assets.encode(assets.rgb_image(8, 8, seed=s), "PNG") for s in range(4)]
    extra = {"category": ["dress", "dress", "bag", "bag"], "collection": ["X", None, None, None]}
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra=extra)

    def notes(**flags) -> str:
        summary = RunSummary("evaluate")
        evaluation_scope(RunConfig(dataset=DatasetSpec(str(ds)), group_by="collection", **flags), summary)
        return " ".join(summary.notes)

    assert "3 row(s) without a value stand alone" in notes()
    said = notes(filter="category = 'dress'")  # the bags are not evaluated: one dress lacks a collection
    assert "2 of 4 rows kept" in said and "1 row(s) without a value stand alone" in said
    assert "without a value" not in notes(filter="collection = 'X'")


def test_a_model_typed_beside_an_onnx_file_of_another_model_is_said_unused(tiny_onnx, tiny_clip, tmp_path, capsys,
                                                                           monkeypatch):
    other = assets.save_tiny_clip(tmp_path / "other", seed=1)
    data = assets.write_parquet_dataset(tmp_path / "data", [assets.jpeg_bytes(64, 80, seed=s) for s in range(4)])
    common = ["--dataset", str(data), "--onnx", str(tiny_onnx), "--limit", "0", "--max-result-images", "0"]
    capsys.readouterr()
    assert cli.main([*common, "--model", str(other), "--output-dir", str(tmp_path / "a")]) == 0
    said = capsys.readouterr()
    warning = f"--model {other} is not the model --onnx {tiny_onnx} was exported from ({tiny_clip})"
    assert warning in " ".join(said.err.split())  # said as it starts, and in the summary
    assert warning in " ".join(said.out.split())
    made = json.loads((tmp_path / "a" / "embeddings" / "embeddings.json").read_text())["identity"]
    assert made["model"] == str(tiny_clip)  # the file's model: what made the vectors
    assert cli.main([*common, "--model", str(tiny_clip), "--output-dir", str(tmp_path / "b")]) == 0
    assert "is not the model" not in " ".join(capsys.readouterr().err.split())
    # --backend onnx with the default file, exported from another model: said too (it ran without a word)
    import shutil

    from pipeline.embedders import EmbedderSpec

    here = tmp_path / "here"
    (here / EmbedderSpec().onnx).parent.mkdir(parents=True)
    shutil.copy(tiny_onnx, here / EmbedderSpec().onnx)
    monkeypatch.chdir(here)
    assert cli.main(["--dataset", str(data), "--backend", "onnx", "--model", str(other), "--limit", "0",
                     "--max-result-images", "0", "--output-dir", str(tmp_path / "c")]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert (f"--model {other} is not the model the default --onnx {EmbedderSpec().onnx} was exported from "
            f"({tiny_clip}): with --backend onnx the file makes the vectors") in said


def test_same_product_counts_a_photos_byte_identical_copy_as_that_photo(tmp_path, monkeypatch, capsys):
    """Product A's first photo listed twice (a colourway sharing its picture) was its own right answer,
    found at distance 0: recall rose with copied files. A at 0 and 45 degrees (0 twice), B at 30 and 100:
    A0 and its copy rank A45 second (B30 is nearer), A45 ranks A0 second, B30 ranks B100 fourth, B100
    ranks B30 second."""
    from pipeline import search

    angles, ids = [0, 0, 45, 30, 100], ["id_1", "id_1", "id_1", "id_2", "id_2"]
    cells = [assets.encode(assets.rgb_image(32, 32, color=(a, 0, 0)), "PNG") for a in angles]
    cells[1] = cells[0]  # the same bytes
    ds = assets.write_parquet_dataset(tmp_path / "ds", cells, extra={"item_ID": ids})
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    out = tmp_path / "out"
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(ds), "--backend", "torch",
                     "--output-dir", str(out)]) == 0
    m = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]["torch"]
    assert m["queries"] == 5 and m["recall@1"] == 0.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2 + 1 / 4 + 1 / 2) / 5)
    assert "1 photo(s) byte-identical to another: one picture, so neither is the other's right answer" in " ".join(
        capsys.readouterr().out.split())


def test_same_product_reads_an_image_folders_ids(tmp_path, monkeypatch, capsys):
    """An image folder's ids are in its metadata.csv or its subfolders (one per product): they were read
    from nowhere, and every photo was scored as having no id (0 queries, exit 0); a column the folder
    does not have is refused, and a dataset with no id at all is said to have nothing to score."""
    from pipeline import search

    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    shop, skus = tmp_path / "shop", tmp_path / "skus"
    shop.mkdir()
    lines = ["file_name,item_ID"]
    for k, (angle, product) in enumerate([(0, "a"), (30, "a"), (40, "b"), (90, "b")]):
        picture = assets.encode(assets.rgb_image(32, 32, color=(angle, 0, 0)), "PNG")
        (shop / f"p{k}.png").write_bytes(picture)
        lines.append(f"p{k}.png,{product}")
        (skus / product).mkdir(parents=True, exist_ok=True)
        (skus / product / f"p{k}.png").write_bytes(picture)
    (shop / "metadata.csv").write_text("\n".join(lines) + "\n")
    for folder, column in ((shop, "item_ID"), (skus, "folder")):
        out = tmp_path / f"out_{column}"
        assert cli.main(["--evaluate", "--eval-id-column", column, "--dataset", str(folder), "--limit", "0",
                         "--backend", "torch", "--output-dir", str(out), "-q"]) == 0
        m = json.loads((out / "outputs" / "evaluation.json").read_text())["results"]["same-product"]["torch"]
        assert m["queries"] == 4 and m["recall@1"] == 0.5, column  # as test_same_product_recall_is_the_known_answer
    capsys.readouterr()
    assert cli.main(["--evaluate", "--eval-id-column", "sku", "--dataset", str(shop), "--limit", "0", "--backend",
                     "torch", "--output-dir", str(tmp_path / "x"), "-q"]) == 1
    assert f"the image folder {shop} has no column 'sku' with values (its columns with values: item_ID)" in " ".join(
        capsys.readouterr().err.split())
    # without an id column a folder is refused before any model loads: it has no garment pictures to score against
    monkeypatch.setattr(search, "make_embedder", lambda spec: pytest.fail("a model loaded before the refusal"))
    assert cli.main(["--evaluate", "--dataset", str(shop), "--limit", "0", "--backend", "torch", "--output-dir",
                     str(tmp_path / "w"), "-q"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "person -> garment needs a 'cloth' column of garment pictures beside each photo" in said
    assert "--eval-id-column COLUMN (a column of its metadata.csv) or --eval-id-column folder" in said
    assert cli.main(["--evaluate", "--eval-id-column", "folder", "--dataset", str(shop), "--limit", "0", "--backend",
                     "torch", "--output-dir", str(tmp_path / "v"), "-q"]) == 1
    assert "'folder' is each picture's subfolder, and its pictures are in none" in " ".join(
        capsys.readouterr().err.split())
    monkeypatch.setattr(search, "make_embedder", lambda spec: _AngleEmbedder())
    empty = tmp_path / "noids"
    empty.mkdir()
    (empty / "metadata.csv").write_text("file_name,item_ID\np0.png,\np1.png,\n")
    for k in range(2):
        (empty / f"p{k}.png").write_bytes(assets.encode(assets.rgb_image(32, 32, color=(k, 0, 0)), "PNG"))
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(empty), "--limit", "0",
                     "--backend", "torch", "--output-dir", str(tmp_path / "y"), "-q"]) == 1
    assert "has no column 'item_ID' with values (its metadata files hold no values)" in capsys.readouterr().err
    blank = assets.write_parquet_dataset(tmp_path / "blank", [assets.encode(assets.rgb_image(32, 32), "PNG")] * 2,
                                         extra={"item_ID": [None, None]})
    assert cli.main(["--evaluate", "--eval-id-column", "item_ID", "--dataset", str(blank), "--backend", "torch",
                     "--output-dir", str(tmp_path / "z"), "-q"]) == 1
    assert "no photo has a product id in the --eval-id-column column: nothing to score" in capsys.readouterr().err


def test_the_charts_labels_tell_apart_models_whose_folders_share_a_last_name(tmp_path):
    """…/a/model and …/b/model were both labelled "model" under their bars (hub cache snapshots alike)."""
    from pipeline.search import _chart_labels

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for folder in (a, b):
        folder.mkdir(parents=True)
    labels = _chart_labels([str(a), str(b), "org/hub-model"])
    assert labels == ["a/model", "b/model", "org/hub-model"]
    assert _chart_labels([str(a), "org/x"]) == ["model", "org/x"]  # no clash: the last part alone


def test_a_model_whose_weights_are_damaged_is_named_not_an_unexpected_error(tmp_path, tiny_clip):
    """A truncated model.safetensors among --eval-models ended as "unexpected SafetensorError", no model named."""
    import shutil

    from pipeline.embedders import EmbedderSpec, make_embedder
    from pipeline.errors import PipelineError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PipelineError) as said:
        make_embedder(EmbedderSpec(model=str(broken), backend="torch", device="cpu")).embed_text(["red"])
    assert str(said.value).startswith(f"cannot load model {str(broken)!r}: its weights cannot be read (")
    assert "download or save it again" in str(said.value)

"""Picture plus text (issue 27, point 4): "this dress, but in red" as one query. A known answer on a
catalogue whose vectors are laid out by hand: the combined query ranks first the item that neither
the picture nor the text alone ranks first, by the weighted sum and by reciprocal-rank fusion; a
negative text pushes its item down; the CLI makes one query per picture."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline import Catalog
from pipeline.errors import UsageError
from pipeline.preprocess import PreprocessConfig
from pipeline.searcher import Searcher, combine
from pipeline.store import load_cache
from tests import assets
from tests.helpers import run

D = 8
E = np.eye(D, dtype=np.float32)


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


# Items: 0 = the picture's dress (e0), 1 = what the text says (e1), 2 = both (e0 + e1), 3.. others.
ITEMS = np.stack([E[0], E[1], unit(E[0] + E[1]), E[2], E[3], unit(E[2] + E[3])])
PICTURE = unit(E[0] - 0.2 * E[1])  # nearest: item 0, then 2; item 1 last
TEXTS = {"in red": unit(E[1] - 0.2 * E[0]), "with a belt": unit(E[3]), "buttons": unit(E[0])}


class Stub:
    """An embedder whose vectors are the layout above (the store's own model is not needed)."""

    preprocess_cfg = PreprocessConfig()

    def embed(self, batch) -> np.ndarray:
        return np.repeat(PICTURE[None, :], len(batch), axis=0)

    def embed_text(self, texts) -> np.ndarray:
        return np.stack([TEXTS[t] for t in texts])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, tiny_onnx) -> Catalog:
    root = tmp_path_factory.mktemp("fusion")
    data = assets.write_parquet_dataset(root / "ds", [assets.jpeg_bytes(40, 56, seed=900 + i) for i in range(6)])
    assert run("--dataset", data, "--onnx", tiny_onnx, "--output-dir", root / "out", "--max-result-images", "0") == 0
    cache = load_cache(root / "out" / "embeddings", root / "out" / "images", identity=None)
    return Catalog(cache, Searcher(ITEMS, cache.embedded_rows), lambda: Stub())


def first(hits) -> int:
    return hits[0].row


def test_the_combined_query_finds_what_neither_part_ranks_first(catalog):
    picture = assets.jpeg_bytes(40, 56, seed=1)
    assert first(catalog.search_image(picture, k=3)[0].hits) == 0
    assert first(catalog.search_text("in red", k=3)) == 1
    for fusion, weight in (("sum", 1.0), ("rrf", None)):
        hits = catalog.search_combined(picture, ["in red"], k=3, fusion=fusion, text_weight=weight)[0].hits
        assert first(hits) == 2, fusion
        assert [h.rank for h in hits] == [1, 2, 3]
    # a weight given to a rank fusion was taken and changed nothing: refused, as the command line's
    with pytest.raises(UsageError, match=r"^text_weight is fusion='sum''s: a rank fusion weighs the picture's"):
        catalog.search_combined(picture, ["in red"], k=3, fusion="rrf", text_weight=-3)
    # the weight matters: with the text at 0.5 the picture still wins the sum
    assert first(catalog.search_combined(picture, ["in red"], k=3, text_weight=0.5)[0].hits) == 0


def test_a_negative_text_pushes_its_item_down(catalog):
    picture = assets.jpeg_bytes(40, 56, seed=1)
    plain = catalog.search_combined(picture, ["with a belt"], k=6, text_weight=0.8)[0].hits
    minus = catalog.search_combined(picture, ["with a belt"], ["buttons"], k=6, text_weight=0.8)[0].hits
    assert first(plain) == 0 and first(minus) == 4  # the belt item, once the buttons are taken away
    assert [h.row for h in minus].index(0) > [h.row for h in plain].index(0)
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=r"negative texts need fusion=.sum. \(--fusion sum\)"):
        catalog.search_combined(picture, ["in red"], ["buttons"], fusion="rrf")


def test_combine_is_the_normalized_weighted_sum():
    v = combine(PICTURE, np.stack([TEXTS["in red"]]), np.stack([TEXTS["buttons"]]), 0.5)
    want = PICTURE + 0.5 * TEXTS["in red"] - 0.5 * TEXTS["buttons"]
    assert np.allclose(v, want / np.linalg.norm(want)) and abs(np.linalg.norm(v) - 1) < 1e-6
    with pytest.raises(Exception, match="cancel out"):
        combine(E[0], np.stack([E[0]]), np.stack([E[0], E[0]]), 1.0)


@pytest.mark.parametrize("weight", ["nan", "inf", "-0.5"])
def test_a_weight_that_is_not_a_finite_number_at_least_0_is_refused(weight, capsys):
    """A NaN weight made a NaN query, which found nothing, and the run said nothing (exit 0)."""
    import main as cli

    assert cli.main(["--query-image", "a.jpg", "--query-text", "in red", "--text-weight", weight]) == 2
    assert "--text-weight: must be a finite number >= 0" in capsys.readouterr().err
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="text weight must be a finite number"):
        combine(np.eye(1, 4, dtype=np.float32)[0], np.eye(1, 4, dtype=np.float32), text_weight=float(weight))


def test_the_cli_makes_one_query_per_picture(tiny_onnx, tmp_path):
    data = assets.write_parquet_dataset(tmp_path / "ds", [assets.jpeg_bytes(40, 56, seed=950 + i) for i in range(8)])
    out = tmp_path / "out"
    assert run("--dataset", data, "--onnx", tiny_onnx, "--output-dir", out, "--max-result-images", "0") == 0
    pictures = [tmp_path / f"q{i}.jpg" for i in range(2)]
    for i, p in enumerate(pictures):
        p.write_bytes(assets.jpeg_bytes(40, 56, seed=950 + i))
    for fusion in ("sum", "rrf"):
        assert run("--dataset", data, "--onnx", tiny_onnx, "--output-dir", out, "--query-image", *pictures,
                   "--query-text", "red", "--top-k", "3", "--fusion", fusion) == 0
        with open(out / "retrieval_results" / "queries" / "query_results.csv", newline="") as f:
            lines = list(csv.DictReader(f))
        assert [(r["query"], r["kind"]) for r in lines if r["rank"] == "1"] == [
            ("q0.jpg “red”", "image+text"), ("q1.jpg “red”", "image+text")]
        assert len(lines) == 6
        if fusion == "rrf":  # the score that ranks the matches is written: their distances need not ascend
            for query in ("q0.jpg “red”", "q1.jpg “red”"):
                scores = [float(r["rrf_score"]) for r in lines if r["query"] == query]
                assert scores == sorted(scores, reverse=True) and 1 / 61 < scores[0] <= 2 / 61 + 1e-6  # in both lists
            assert list(lines[0])[-1] == "rrf_score"  # last: every other column keeps its place
        else:
            assert "rrf_score" not in lines[0]
    assert run("--dataset", data, "--onnx", tiny_onnx, "--output-dir", out, "--query-text", "red",
               "--negative-text", "blue") == 2


def test_rank_fusion_scores_a_product_over_the_lists_whichever_photo_each_shows():
    """Product A's two photos each lead one list (a1 for the first query, a2 for the second), B is
    second in both. Fused per photo, A would score once (1/61) and lose to B (2/62); per product it
    scores 2/61 and leads, shown by its photo nearest to a query."""
    import pyarrow as pa

    from pipeline.metadata import Metadata
    from pipeline.searcher import Searcher
    from pipeline.store import ManifestRow

    def at(deg: float) -> np.ndarray:
        return np.array([np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))], np.float32)

    photos = np.stack([at(0), at(90), at(45)])  # a1, a2, b1
    searcher = Searcher(photos, [None] * 3)
    searcher.metadata = Metadata(pa.table({"item": ["A", "A", "B"]}))
    queries = np.stack([at(-10), at(100)])
    # lists two deep: the first query's is a1, b1; the second's a2, b1
    assert searcher.fused(queries, 2, depth=2).indices[0].tolist() == [2, 0]  # each photo: B first
    searcher.group_by("item")
    fused = searcher.fused(queries, 2, depth=2)
    assert fused.indices[0].tolist() == [0, 2]  # A (a1: 10 degrees from a query, as a2 is; lower row) then B
    assert fused.distances[0][0] == pytest.approx(1 - np.cos(np.deg2rad(10)), abs=1e-6)
    assert fused.scores is not None and fused.scores[0].tolist() == pytest.approx([2 / 61, 2 / 62])
    searcher.rows = [ManifestRow(index=i, file=f"{i}.jpg", source_row=i, embedding_row=i) for i in range(3)]
    hits = searcher.hits(fused, 0)
    assert [h.score for h in hits] == pytest.approx([2 / 61, 2 / 62]) and hits[0].to_dict()["score"] == hits[0].score
    assert searcher.hits(searcher.neighbours(queries, 2), 0)[0].score is None  # no fusion: no score
    assert "score" not in searcher.hits(searcher.neighbours(queries, 2), 0)[0].to_dict()


@pytest.mark.parametrize("flags", [["--query-text", ""], ["--query-text", "red", "  "],
                                   ["--query-image", "a.jpg", "--query-text", "red", "--negative-text", ""]])
def test_an_empty_text_query_is_refused(flags, capsys):
    """An empty text was embedded and searched like any other, and its results meant nothing."""
    import main as cli

    assert cli.main(flags) == 2
    assert "a text query must say something; got an empty text" in capsys.readouterr().err

"""The Searcher's one-per-group answers (--dedup, --group-by) and its filtered search through an
approximate index, on synthetic vectors: a group larger than the first fetch fills every row
without asking the whole gallery again; rank fusion keeps one photo per group; the index's filtered
search keeps only the allowed rows, k whenever k match, near the exact answer."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import searcher as searcher_module
from pipeline.duplicates import DuplicateGroup
from pipeline.index import build_index
from pipeline.retrieval import masked_topk
from pipeline.searcher import Searcher
from pipeline.store import ManifestRow
from tests.helpers import assert_same_up_to_rounding

N, D = 3000, 32


def vectors(seed: int = 0, copies: int = 600) -> np.ndarray:
    """N unit vectors; the first `copies` are near copies of one picture (a placeholder image)."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((N, D)).astype(np.float32)
    e[:copies] = e[0] + 0.001 * rng.standard_normal((copies, D)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def rows(n: int = N) -> list[ManifestRow]:
    return [ManifestRow(index=i, file=f"f{i}", source_row=i, embedding_row=i) for i in range(n)]


def counting(searcher: Searcher) -> list[tuple[int, int]]:
    """(fetch, rows asked) of every raw search the searcher makes from here on."""
    asked: list[tuple[int, int]] = []
    plain, items = searcher._all_neighbours, searcher._item_rows
    searcher._all_neighbours = lambda m, p: (asked.append((m, N)), plain(m, p))[1]
    searcher._item_rows = lambda r, m, a: (asked.append((m, len(r))), items(r, m, a))[1]
    return asked


@pytest.mark.parametrize("kind", ["none", "hnsw"])
def test_a_large_group_fills_every_row_without_asking_everything_again(kind):
    e = vectors()
    index = None if kind == "none" else build_index(e, kind, "test")
    s = Searcher(e, rows(), index)
    s.dedup([DuplicateGroup(list(range(600)), ["near"] * 600, [0.0] * 600)])
    asked = counting(s)
    nb = s.all_neighbours(5)
    assert (nb.indices >= 0).all()  # every row filled with 5 others
    for r in range(N):
        groups = [0 if j < 600 else j for j in nb.indices[r]]
        assert len(set(groups)) == 5 and (r >= 600 or 0 not in groups)  # a copy never meets its group
    if kind == "none":  # exact search: one grouped pass, whatever the group's size (no deeper asks)
        assert asked == []
        return
    assert asked[0] == (5 + 20 + 1, N)  # one full pass...
    assert all(rows_asked <= 700 for _, rows_asked in asked[1:])  # ...then only the rows it left short
    assert max(m for m, _ in asked) <= 5 + 599 + 1  # never beyond k + the hidden photos + 1


def test_the_grouped_exact_pass_answers_as_the_deeper_asks_do(monkeypatch):
    """Large groups (a --group-by category, a placeholder photo's 600 copies) are searched exactly in
    one grouped pass; it gives the answers the deeper asks gave (which grow with N x the largest
    group), for every item, for queries, with a filter, copies (ties) included."""
    e = vectors(copies=600)
    e[700] = e[701]  # an exact tie between two groups
    rng = np.random.default_rng(2)
    labels = np.where(np.arange(N) < 600, 0, 1 + rng.integers(0, 40, N))  # 41 groups, one of 600
    s = Searcher(e, rows(), None)
    s._product = labels
    s._regroup()
    queries = e[rng.integers(0, N, 20)] + 0.1 * rng.standard_normal((20, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    allowed = rng.random(N) < 0.5
    grouped = (s.all_neighbours(5), s.neighbours(queries, 5), s.neighbours(queries, 5, allowed),
               s.item_neighbours(np.arange(0, N, 7), 5, allowed))
    monkeypatch.setattr(searcher_module, "GROUPED_EXACT_FROM", 10**9)  # the deeper asks, as before
    deeper = (s.all_neighbours(5), s.neighbours(queries, 5), s.neighbours(queries, 5, allowed),
              s.item_neighbours(np.arange(0, N, 7), 5, allowed))
    for a, b in zip(grouped, deeper):
        assert np.array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-5)
    own = grouped[0].indices
    assert all(labels[j] != labels[r] for r in range(N) for j in own[r] if j >= 0)


def test_rank_fusion_keeps_one_photo_per_group():
    e = vectors(copies=50)
    s = Searcher(e, rows(), None)
    s.dedup([DuplicateGroup(list(range(50)), ["near"] * 50, [0.0] * 50)])
    queries = np.stack([e[0], e[1]])
    nb = s.fused(queries, 10)
    shown = [0 if j < 50 else j for j in nb.indices[0] if j >= 0]
    assert len(shown) == 10 and len(set(shown)) == 10


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_a_filtered_search_through_the_index(kind, monkeypatch):
    """The filter inside the index (a FAISS ID selector), for IVF and HNSW: k whenever k match,
    only matching rows, recall against the exact search over them; and the index really answers
    (the exact redo of rows it leaves short stays the exception)."""
    e = vectors(seed=3, copies=1)
    index = build_index(e, kind, "test")
    s = Searcher(e, rows(), index)
    monkeypatch.setattr(searcher_module, "FILTER_EXACT_MAX", 0)  # the index path even at this size
    redone = []
    exact_among = s._exact_among
    monkeypatch.setattr(s, "_exact_among", lambda q, k, a: redone.append(len(q)) or exact_among(q, k, a))
    rng = np.random.default_rng(4)
    queries = e[rng.integers(0, N, 30)] + 0.05 * rng.standard_normal((30, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for share in (0.01, 0.1, 0.5):
        allowed = rng.random(N) < share
        nb = s.neighbours(queries, 10, allowed)
        truth = masked_topk(queries, e, allowed, 10)
        m = int(allowed.sum())
        assert ((nb.indices >= 0).sum(axis=1) == min(10, m)).all()
        assert allowed[nb.indices[nb.indices >= 0]].all()
        pairs = zip(nb.indices.tolist(), truth.indices.tolist())
        recall = np.mean([len(set(a) & set(b)) / min(10, m) for a, b in pairs])
        assert recall >= 0.9, (share, recall)
    assert sum(redone) <= 0.1 * 3 * 30, redone  # at most a tenth of the rows fell back to exact search


@pytest.mark.parametrize("change", ["added", "removed", "both", "nothing"])
def test_lists_carried_through_an_update_are_a_full_pass_s(change):
    """An update's neighbours from the lists before it (searcher.carried_neighbours): kept items keep
    their lists, merged with the new items; those that lost a neighbour and the new ones are asked
    again. Exact search: the very lists a full pass gives, planted copies (ties) included."""
    from pipeline.retrieval import topk_neighbours

    rng = np.random.default_rng(7)
    old = rng.normal(size=(400, 16)).astype(np.float32)
    old[50] = old[49]  # copies: equal distances, settled by index
    old[300] = old[49]
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    k = 6
    before = topk_neighbours(old, old, k, exclude_self=True)
    gone = set(rng.choice(400, size=25, replace=False).tolist()) if change in ("removed", "both") else set()
    take = np.array([i for i in range(400) if i not in gone])
    new = rng.normal(size=(30 if change in ("added", "both") else 0, 16)).astype(np.float32)
    if len(new):
        new[3] = old[49]  # a new copy of a kept photo
    new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
    now = np.concatenate([old[take], new]).astype(np.float32)
    searcher = Searcher(now, [None] * len(now))
    carried = searcher.carried_neighbours(before, take, k)
    assert carried is not None
    got, asked = carried
    assert asked == len(new) + sum(1 for i in take if any(j in gone for j in before.indices[i]))
    want = topk_neighbours(now, now, k, exclude_self=True)
    # the copies' ties come in index order where their products round alike (not always on AVX2 kernels)
    assert_same_up_to_rounding(got, want, now, now, tol=1e-6)


def test_carried_lists_are_refused_when_they_would_not_save_work():
    from pipeline.retrieval import topk_neighbours

    rng = np.random.default_rng(8)
    old = rng.normal(size=(40, 8)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    before = topk_neighbours(old, old, 5, exclude_self=True)
    now = np.concatenate([old, old[:30] + 0.01]).astype(np.float32)  # the gallery nearly doubles
    assert Searcher(now, [None] * 70).carried_neighbours(before, np.arange(40), 5) is None
    assert Searcher(old, [None] * 40).carried_neighbours(before, np.arange(40), 4) is None  # another k


def test_carried_lists_at_the_model_s_width_match_a_full_pass_up_to_rounding():
    """At 512 dimensions a distance computed in another block shape can differ by a float32 rounding
    step, so copies (equal distances) may trade places; every carried neighbour must still be as near
    as the full pass's at its rank."""
    from pipeline.retrieval import cosine_distances, topk_neighbours

    rng = np.random.default_rng(9)
    old = rng.normal(size=(1500, 512)).astype(np.float32)
    old[700:705] = old[699]  # copies
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    before = topk_neighbours(old, old, 8, exclude_self=True)
    take = np.array([i for i in range(1500) if i % 97 != 5])
    new = np.concatenate([old[699:700], rng.normal(size=(20, 512)).astype(np.float32)])
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    now = np.concatenate([old[take], new]).astype(np.float32)
    got, _ = Searcher(now, [None] * len(now)).carried_neighbours(before, take, 8)
    want = topk_neighbours(now, now, 8, exclude_self=True)
    full = cosine_distances(now, now)
    exact_at_rank = np.take_along_axis(full, got.indices, axis=1)
    assert np.allclose(exact_at_rank, want.distances, atol=1e-6)  # as near as the full pass's, rank by rank
    assert np.allclose(got.distances, want.distances, atol=1e-6)
    assert (got.indices != np.arange(len(now))[:, None]).all()
    assert (got.indices == want.indices).mean() > 0.99


def test_an_empty_gallery_grouped_answers_nothing_for_each_query():
    import pyarrow as pa

    from pipeline.metadata import Metadata

    s = Searcher(np.zeros((0, D), np.float32), [])
    s.metadata = Metadata(pa.table({"pid": pa.array([], pa.string())}))
    s.group_by("pid")
    assert s.search(np.ones((2, D), np.float32), 5) == [[], []]


def test_the_summary_says_how_a_filter_is_searched(monkeypatch):
    e = vectors(seed=3, copies=1)
    s = Searcher(e, rows(), build_index(e, "hnsw", "test"))
    assert s.filtered_how(10) == "searched exactly among them"
    monkeypatch.setattr(searcher_module, "FILTER_EXACT_MAX", 5)
    assert s.filtered_how(10).startswith("searched through the index with the filter inside it")
    assert Searcher(e, rows(), None).filtered_how(10) == "searched exactly among them"

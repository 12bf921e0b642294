"""Blockwise top-k and the distance matrix against brute force."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.retrieval import cosine_distances, topk_neighbours


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("block", [1, 7, 1024])
def test_topk_matches_brute_force_excluding_self(block):
    e = unit(57, 8)
    nb = topk_neighbours(e, e, 5, exclude_self=True, block=block)
    d = 1 - e @ e.T
    np.fill_diagonal(d, np.inf)
    for i in range(len(e)):
        want = np.lexsort((np.arange(len(e)), d[i]))[:5]
        assert list(nb.indices[i]) == list(want)
        assert np.allclose(nb.distances[i], d[i, want], atol=1e-6)
        assert i not in nb.indices[i]
    assert nb.distances.dtype == np.float32 and nb.indices.dtype == np.int64


def test_ties_broken_by_index():
    base = unit(1, 4)[0]
    e = np.stack([base] * 6 + [-base])
    nb = topk_neighbours(e, e, 3, exclude_self=True)
    assert list(nb.indices[0]) == [1, 2, 3]
    assert list(nb.indices[4]) == [0, 1, 2]
    assert list(nb.indices[6]) == [0, 1, 2]


def test_k_larger_than_gallery_pads():
    e = unit(3, 4)
    nb = topk_neighbours(e, e, 5, exclude_self=True)
    assert (nb.indices[:, 2:] == -1).all() and np.isinf(nb.distances[:, 2:]).all()
    assert set(nb.indices[0, :2]) == {1, 2}


def test_queries_against_gallery_and_errors():
    g, q = unit(20, 6, 1), unit(4, 6, 2)
    nb = topk_neighbours(q, g, 3)
    assert nb.indices.shape == (4, 3)
    with pytest.raises(ValueError, match="dimension"):
        cosine_distances(unit(2, 5), g)
    with pytest.raises(ValueError, match=r"2D array \(N, D\)"):
        topk_neighbours(q[0], g, 3)
    with pytest.raises(ValueError, match="same rows"):
        topk_neighbours(q, g, 3, exclude_self=True)


def test_distance_matrix_file(tmp_path):
    e = unit(45, 8, 3)
    path = tmp_path / "d.npy"
    topk_neighbours(e, e, 1, exclude_self=True, block=16, matrix_path=path)
    m = np.load(path)
    assert m.shape == (45, 45) and m.dtype == np.float32
    want = 1 - e @ e.T
    np.fill_diagonal(want, 0)
    assert np.allclose(m, want, atol=1e-6)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left


def test_a_disk_without_room_for_the_matrix_is_a_message_not_a_bus_error(tmp_path, monkeypatch):
    """The matrix is written through memory maps: on a full disk a mapped write would end the process
    with SIGBUS. Its blocks are reserved first, so the missing room is said and nothing is left."""
    import errno

    from pipeline import fileio
    from pipeline.errors import PipelineError

    asked: list[int] = []

    def full(fd, size):
        asked.append(size)
        return errno.ENOSPC

    monkeypatch.setattr(fileio, "_fallocate", full)
    e = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with pytest.raises(PipelineError, match=r"no room for matrix\.npy \(0\.00 GB\) in .*No space left on device"):
        topk_neighbours(e, e, 3, exclude_self=True, matrix_path=tmp_path / "matrix.npy")
    assert asked and asked[0] >= 300 * 300 * 4 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free", [10**12, 1000])
def test_where_disk_cannot_be_reserved_the_free_space_decides(tmp_path, monkeypatch, free):
    """A file system without fallocate (NFSv3, older ZFS): the matrix is written when the free
    space holds it, and refused with the message when it does not."""
    import errno
    import os
    from types import SimpleNamespace

    from pipeline import fileio
    from pipeline.errors import PipelineError

    monkeypatch.setattr(fileio, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: SimpleNamespace(f_bavail=free, f_frsize=1))
    e = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    if free < 40 * 40 * 4:
        with pytest.raises(PipelineError, match="no room for matrix.npy"):
            topk_neighbours(e, e, 3, exclude_self=True, matrix_path=tmp_path / "matrix.npy")
        assert list(tmp_path.iterdir()) == []
        return
    topk_neighbours(e, e, 3, exclude_self=True, matrix_path=tmp_path / "matrix.npy")
    np.testing.assert_allclose(np.load(tmp_path / "matrix.npy"), cosine_distances(e, e) * (1 - np.eye(40)), atol=1e-6)


def test_the_matrix_file_is_reserved_on_disk_when_made(tmp_path):
    """On this file system (tmpfs, ext4, overlayfs: each can reserve) the temp file's blocks are
    allocated before a row is written: no mapped write can meet a full disk."""
    import os

    from pipeline.fileio import AtomicNpyMemmap, _fallocate

    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        if _fallocate(fd, 4096) != 0:
            pytest.skip("this file system cannot reserve blocks (the free space decides there: tested above)")
    finally:
        os.close(fd)
        os.unlink(tmp_path / "probe")
    with AtomicNpyMemmap(tmp_path / "m.npy", (512, 512), np.float32) as m:
        st = os.stat(m.tmp)
        assert st.st_blocks * 512 >= 512 * 512 * 4
        m.write_rows(0, np.ones((512, 512), np.float32))
    assert np.load(tmp_path / "m.npy").sum() == 512 * 512


@pytest.mark.parametrize("take", [list(range(30)), [0, 2, 3, 7, *range(9, 28), 29]], ids=["prefix", "gaps"])
def test_carried_matrix_is_the_new_stores_matrix(tmp_path, take):
    """Kept rows' pairs copied from the old matrix (rows and columns renumbered), a new item's computed."""
    from pipeline.retrieval import carried_matrix

    old_e = unit(30, 8, 4)
    old_path, path = tmp_path / "old.npy", tmp_path / "new.npy"
    topk_neighbours(old_e, old_e, 1, exclude_self=True, block=16, matrix_path=old_path)
    np.save(old_path, np.load(old_path) + np.float32(1e-3) * (1 - np.eye(30, dtype=np.float32)))  # marks copies
    new_e = np.concatenate([old_e[take], unit(7, 8, 5)])
    carried_matrix(np.load(old_path, mmap_mode="r"), np.asarray(take), new_e, path, block=8)
    m = np.load(path)
    want = 1 - new_e @ new_e.T
    np.fill_diagonal(want, 0)
    kept = len(take)
    copied = np.zeros_like(want, bool)
    copied[:kept, :kept] = ~np.eye(kept, dtype=bool)
    assert m.shape == want.shape and np.all(np.diag(m) == 0)
    assert np.allclose(m[copied], want[copied] + 1e-3, atol=1e-6)  # from the old file
    assert np.allclose(m[~copied], want[~copied], atol=1e-6)  # computed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npy", "old.npy"]  # no temp file left
    with pytest.raises(ValueError, match="kept rows"):
        carried_matrix(np.load(old_path, mmap_mode="r"), np.arange(31), unit(40, 8, 6), path)


@pytest.mark.subprocess
def test_retrieval_does_not_import_torch():
    import subprocess

    code = (
        "import sys, numpy as np; import pipeline.retrieval as r; e=np.eye(4, dtype=np.float32); "
        "r.topk_neighbours(e,e,2,exclude_self=True); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__import__("pathlib").Path(__file__).parents[1])


def test_error_messages_name_the_argument_and_the_rule():
    g = unit(5, 4)
    for bad, name in ((g[0], "queries"), (None, "gallery")):
        q, gg = (bad, g) if name == "queries" else (g, g[0])
        with pytest.raises(ValueError, match=rf"^{name} must be a 2D array \(N, D\), but got shape \(4,\)$"):
            cosine_distances(q, gg)
        with pytest.raises(ValueError, match=rf"^{name} must be a 2D array"):
            topk_neighbours(q, gg, 2)
    with pytest.raises(ValueError, match="^queries have dimension 3 but the gallery has 4$"):
        cosine_distances(unit(2, 3), g)
    with pytest.raises(ValueError, match="^exclude_self needs queries and gallery to be the same rows$"):
        topk_neighbours(g[:2], g, 2, exclude_self=True)
    with pytest.raises(ValueError, match="^matrix_path writes the gallery's own N x N matrix: it needs exclude_self$"):
        topk_neighbours(g, g, 2, matrix_path="x.npy")
    with pytest.raises(ValueError, match="^k must be >= 1, got 0$"):
        topk_neighbours(g, g, 0)


def test_float64_input_gives_float32_distances_and_int64_indices():
    e = unit(6, 4).astype(np.float64)
    d = cosine_distances(e, e)
    assert d.dtype == np.float32
    nb = topk_neighbours(e, e, 10)  # k > n: padded slots too
    assert nb.indices.dtype == np.int64 and nb.distances.dtype == np.float32
    assert nb.indices.shape == (6, 10) and (nb.indices[:, 6:] == -1).all() and np.isinf(nb.distances[:, 6:]).all()
    assert list(nb.indices[:, 0]) == list(range(6))  # each row's nearest is itself (no exclusion)


def test_k_equal_to_gallery_excluding_self_never_returns_self():
    e = unit(4, 4)
    nb = topk_neighbours(e, e, 4, exclude_self=True)
    for i in range(4):
        assert sorted(nb.indices[i, :3]) == sorted(set(range(4)) - {i})
        assert nb.indices[i, 3] == -1 and np.isinf(nb.distances[i, 3])


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_galleries(n):
    g = unit(max(n, 1), 4)[:n]
    nb = topk_neighbours(unit(2, 4, 9), g, 2)
    assert nb.indices.shape == (2, 2)
    assert (nb.indices[:, n:] == -1).all() and np.isinf(nb.distances[:, n:]).all()
    if n:
        assert (nb.indices[:, 0] == 0).all() and np.isfinite(nb.distances[:, 0]).all()


def test_neighbour_csv_format(tmp_path):
    from pipeline.retrieval import iter_neighbour_rows, write_neighbours_csv

    e = unit(4, 4)
    nb = topk_neighbours(e, e, 5, exclude_self=True)
    path = tmp_path / "n.csv"
    sources = ["looks/a.jpg", "looks/b.jpg", "shop[2]", "shop[3]"]  # the user's names of the photos
    n = write_neighbours_csv(
        path, iter_neighbour_rows(nb, [10, 11, 12, 13], list("abcd"), [10, 11, 12, 13], list("abcd"), sources, sources)
    )
    assert n == 12  # 3 real neighbours each; padded slots are not written
    data = path.read_bytes()
    assert b"\r" not in data and data.endswith(b"\n")
    lines = data.decode().splitlines()
    assert lines[0] == "query,query_file,rank,neighbour,neighbour_file,distance,query_source,neighbour_source"
    assert len(lines) == 13
    first = lines[1].split(",")
    assert first[:3] == ["10", "a", "1"] and len(first[5].split(".")[1]) == 6
    assert float(first[5]) == pytest.approx(float(nb.distances[0, 0]), abs=1e-6)
    for line in lines[1:]:  # each file beside its source
        q, qf, _, nbr, nf, _, qs, ns = line.split(",")
        assert qs == sources["abcd".index(qf)] and ns == sources["abcd".index(nf)] and int(nbr) == 10 + "abcd".index(nf)


def test_masked_topk_keeps_the_lowest_rows_of_a_tie_on_the_edge():
    """Scores tied at the k-th place beyond k: the lowest-numbered rows are kept, whatever order
    argpartition leaves them in (three better rows, then 60 equal ones)."""
    from pipeline.retrieval import masked_topk

    g = np.zeros((200, 4), np.float32)
    g[:, 1] = 1.0
    g[[150, 20, 90]] = [1.0, 0, 0, 0]
    g[40:100, :] = [0.6, 0.8, 0, 0]  # the tie: 60 rows at the same score (90 among them, overwritten)
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    allowed = np.ones(200, bool)
    allowed[41] = False
    nb = masked_topk(q, g, allowed, 6)
    assert nb.indices[0].tolist() == [20, 150, 40, 42, 43, 44]


@pytest.mark.parametrize("seed", range(4))
def test_topk_rows_on_wide_rows_with_ties_and_gaps_is_exact(seed):
    """Wide rows take their bound from a sample of the columns: it must never lose a neighbour,
    whatever the ties (few distinct values) and the inf gaps (excluded items)."""
    from pipeline.retrieval import SAMPLE_STRIDE, topk_rows

    rng = np.random.default_rng(seed)
    k = 11
    n = 64 * k * SAMPLE_STRIDE + int(rng.integers(0, 50))  # wide enough for the sampled bound
    d = (rng.integers(0, [3, 40, 1000, 10**6][seed], size=(40, n)) / 7).astype(np.float32)
    d[rng.random(d.shape) < 0.3] = np.inf
    d[5, : n - 3] = np.inf  # a row with fewer finite values than k
    d[6, ::SAMPLE_STRIDE] = 0.0  # the sampled columns all tie at the smallest value
    d[7] = 0.25  # one value throughout (copies of one photo): settled on its own, not as n candidates
    d[8] = np.inf  # every item excluded
    idx, dist = topk_rows(d, k)
    for r in range(len(d)):
        want = np.lexsort((np.arange(n), d[r]))[:k]
        assert list(idx[r]) == list(want)
        assert np.array_equal(dist[r], d[r, want])

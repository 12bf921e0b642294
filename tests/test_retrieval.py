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


def test_retrieval_does_not_import_torch():
    import subprocess

    code = "import sys, numpy as np; import pipeline.retrieval as r; e=np.eye(4, dtype=np.float32); r.topk_neighbours(e,e,2,exclude_self=True); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__import__("pathlib").Path(__file__).parents[1])

"""FAISS index: recall of the approximate kinds against exact search, the exact kind equal to exact
search, the automatic choice, stale indexes refused, and the index in gallery runs and queries."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import main as cli
from pipeline import index as index_module
from pipeline.errors import PipelineError
from pipeline.index import INDEX_META, build_index, choose_kind, ensure_index, load_index, recall_at_10, save_index
from pipeline.retrieval import topk_neighbours
from tests.helpers import assert_same_up_to_rounding


def clustered(n: int, dim: int = 64, clusters: int = 200, noise: float = 1.2, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: neighbours are mostly, not all, in one cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    return clustered(20_000)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_index_recall_against_exact_on_20k_clustered_vectors(kind, vectors):
    gi = build_index(vectors, kind, store_sha256="s")
    assert (
        gi.info.kind == kind and not gi.info.exact and gi.info.recall_at_10 >= 0.95 and gi.info.recall_queries == 1000
    )
    # measured again on queries the build never saw: near-duplicates of gallery items
    rng = np.random.default_rng(7)
    q = vectors[rng.choice(len(vectors), 300, replace=False)] + 0.05 * rng.normal(size=(300, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = topk_neighbours(q, vectors, 10).indices
    assert recall_at_10(gi.search(q, 10).indices, truth) >= 0.95
    nb = gi.all_neighbours(10)
    assert nb.indices.shape == (20_000, 10) and not np.any(nb.indices == np.arange(20_000)[:, None])
    sample = rng.choice(20_000, 300, replace=False)
    exact = topk_neighbours(vectors[sample], vectors, 11).indices
    exact_others = [[j for j in row if j != i][:10] for i, row in zip(sample, exact)]
    assert recall_at_10(nb.indices[sample], np.array(exact_others)) >= 0.95


def test_the_recorded_recall_is_the_one_a_gallery_run_gets(vectors, monkeypatch):
    # search effort held low, so that recall is far from 1 and an item finding itself would show
    monkeypatch.setitem(index_module.KNOBS, "ivfpq", ("nprobe", (1,)))
    gi = build_index(vectors, "ivfpq", store_sha256="s")
    sample = np.random.default_rng(3).choice(20_000, 1000, replace=False)
    exact = topk_neighbours(vectors[sample], vectors, 11).indices
    truth = np.array([[j for j in row if j != i][:10] for i, row in zip(sample, exact)])
    measured = recall_at_10(gi.search(vectors[sample], 10, self_ids=sample).indices, truth)
    assert measured < 0.9 and abs(gi.info.recall_at_10 - measured) < 0.03


def test_galleries_of_one_and_two():
    for n in (1, 2):
        v = np.eye(n, 4, dtype=np.float32)
        gi = build_index(v, "flat", store_sha256="s")
        assert gi.info.recall_at_10 == 1.0 and gi.info.recall_queries == n
        assert gi.all_neighbours(2).indices.tolist() == {1: [[-1, -1]], 2: [[1, -1], [0, -1]]}[n]


def test_flat_index_answers_exactly_as_exact_search(vectors):
    x = vectors[:3000]
    tied = np.concatenate([np.repeat(x[:1], 30, axis=0), x[1:500]])  # 30 identical vectors: ties by index
    for g in (x, tied):
        gi = build_index(g, "flat", store_sha256="s")
        # 1.0 where copies of a vector score alike; OpenBLAS on AVX2-only EPYCs rounds the 30 copies' products
        # two ways, so there the "ties by index" order of exact search itself differs within rounding.
        assert gi.info.exact and gi.info.recall_at_10 >= (1.0 if g is x else 0.95)
        q = g[:200] + 0.01
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        for k in (1, 10, 40):
            a, b = gi.search(q, k), topk_neighbours(q, g, k)
            assert_same_up_to_rounding(a, b, q, g)
        a, b = gi.all_neighbours(5), topk_neighbours(g, g, 5, exclude_self=True)
        assert_same_up_to_rounding(a, b, g, g)


def test_the_automatic_choice():
    assert choose_kind(50_000, 512) == "flat"
    assert choose_kind(50_001, 512) == "ivfpq"


def test_a_stale_index_is_refused_when_loaded_and_rebuilt_for_a_gallery(vectors, tmp_path):
    x = vectors[:2000]
    gi = build_index(x, "hnsw", store_sha256="a" * 64)
    save_index(tmp_path, gi)
    assert load_index(tmp_path, x, "a" * 64).info.kind == "hnsw"
    with pytest.raises(PipelineError, match="was built for other embeddings .*run the gallery again to rebuild it"):
        load_index(tmp_path, x, "b" * 64)
    rebuilt = ensure_index(tmp_path, x, "b" * 64, "hnsw")
    assert rebuilt.info.store_sha256 == "b" * 64
    assert json.loads((tmp_path / INDEX_META).read_text())["store_sha256"] == "b" * 64
    assert ensure_index(tmp_path, x, "b" * 64, "none") is None


def test_gallery_runs_and_queries_use_the_index(mixed_dataset, tiny_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--dataset", str(mixed_dataset), "--onnx", str(tiny_onnx), "--output-dir", str(out)]
    assert cli.main([*base, "-q"]) == 3
    info = json.loads((out / "embeddings" / INDEX_META).read_text())
    assert info["kind"] == "flat" and info["exact"] and info["count"] == 22
    assert (out / "outputs" / "distance_matrix.npy").is_file()
    capsys.readouterr()
    assert cli.main([*base, "--use-embeddings", "--index", "hnsw", "--top-k", "3"]) == 3
    said = capsys.readouterr().out
    assert "neighbours: approximate (hnsw" in said and "recall@10" in said
    assert json.loads((out / "embeddings" / INDEX_META).read_text())["kind"] == "hnsw"
    with open(out / "retrieval_results" / "neighbours.csv") as f:
        assert len(list(csv.DictReader(f))) == 22 * 3
    assert cli.main(["--query-text", "red dress", "--onnx", str(tiny_onnx), "--output-dir", str(out)]) == 0
    assert "search: approximate (hnsw" in capsys.readouterr().out
    # an index that does not belong to the store is never used
    meta = out / "embeddings" / INDEX_META
    meta.write_text(meta.read_text().replace(info["store_sha256"], "0" * 64))
    assert cli.main(["--query-text", "red dress", "--onnx", str(tiny_onnx), "--output-dir", str(out), "-q"]) == 1
    assert "was built for other embeddings" in capsys.readouterr().err
    assert (
        cli.main(
            ["--query-text", "red dress", "--onnx", str(tiny_onnx), "--output-dir", str(out), "--index", "none", "-q"]
        )
        == 0
    )
    shutil.rmtree(out)


class _StandInGpuFaiss:
    """faiss-gpu's API on a machine without it: 'moving' an index clones it on the CPU, as faiss-gpu
    refuses the kinds it has no GPU version of (HNSW, fast-scan codes)."""

    def __init__(self, monkeypatch):
        import faiss

        self.moved: list[str] = []

        def index_cpu_to_gpu(resources, device, index):
            name = type(faiss.downcast_index(index)).__name__
            if "HNSW" in name or "FastScan" in name:
                raise RuntimeError(f"{name} not supported on the GPU")
            self.moved.append(name)
            return faiss.clone_index(index)

        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)


def test_on_a_gpu_run_the_index_is_built_for_and_searched_on_faiss_gpu(vectors, monkeypatch, tmp_path):
    cpu = build_index(vectors, "ivfpq", store_sha256="s", gpu=True)  # no faiss-gpu: fast-scan codes, on the CPU
    assert cpu.info.params["bits"] == 4 and not cpu.on_gpu
    gpu_api = _StandInGpuFaiss(monkeypatch)
    gi = build_index(vectors, "ivfpq", store_sha256="s", gpu=True)
    # 8-bit codes faiss-gpu takes (D/8 bytes), tuned to the same recall, and searched on the "GPU" copy
    assert gi.info.params["bits"] == 8 and gi.info.params["m"] == 8 and gi.info.recall_at_10 >= 0.95
    assert gi.on_gpu and gpu_api.moved == ["IndexIVFPQ"] and gi.searcher is not gi.index
    assert gi.searcher.nprobe == gi.info.params["nprobe"]
    assert "searched on the GPU" in gi.describe()
    q = vectors[:50]
    cpu_copy = load_index_from(gi, tmp_path)  # the saved file is the CPU index; loaded without a GPU
    assert not cpu_copy.on_gpu
    np.testing.assert_array_equal(gi.search(q, 10).indices, cpu_copy.search(q, 10).indices)
    assert load_index(tmp_path, vectors, "s", gpu=True).on_gpu
    # kinds with no GPU version stay on the CPU and still answer
    hnsw = build_index(vectors[:2000], "hnsw", store_sha256="h", gpu=True)
    assert not hnsw.on_gpu and "GPU" not in hnsw.describe() and hnsw.search(q[:5], 3).indices.shape == (5, 3)


def load_index_from(gi, folder):
    save_index(folder, gi)
    return load_index(folder, gi.embeddings, gi.info.store_sha256)


@pytest.mark.subprocess
def test_verbose_says_which_faiss_runs_without_the_loaders_alarming_lines():
    """faiss's loader logs 'Could not load library with AVX2 support' when a wheel has no per-SIMD
    libraries; -v shows instead one line of ours naming the build."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import main; main.configure_logging(True, False); from pipeline import index; index._faiss()"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Could not load library" not in done.stderr and "faiss.loader" not in done.stderr
    assert "DEBUG pipeline.index: faiss " in done.stderr and "compile options:" in done.stderr

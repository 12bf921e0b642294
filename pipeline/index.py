"""Nearest-neighbour index of a gallery store (FAISS): exact search below a size, an approximate index
above it, built once beside the store and checked against it before use.

    embeddings/index.faiss   the FAISS index (inner product on the L2-normalized vectors)
    embeddings/index.json    kind, parameters, build time, memory, the store's embeddings hash, and
                             recall@10 against exact search on sampled queries, measured at build

How `auto` chooses (sized from benchmarks/scale.py on 2 cores): exact search by blocked matrix
products up to EXACT_MAX vectors (all-pairs top-k costs N^2 D); above it IVF-PQ (4-bit codes scanned with
SIMD, D/4 bytes a vector, in memory; its candidates, RERANK x k of them, are re-ranked exactly against the
store's vectors read from embeddings.npy). autofaiss prefers HNSW when its full vectors fit in
memory; measured here, IVF-PQ with the exact re-rank beat HNSW32 at 100k and at 1M on recall@10,
single-query latency, all-neighbours time and memory (HNSW needed efSearch 1024 for recall 0.97 at
1M, and 35 minutes for all neighbours), so HNSW is kept for `--index hnsw` only. The search
parameter (efSearch or nprobe) is raised step by step until recall@10 on the sample reaches
TARGET_RECALL + TUNING_MARGIN.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PipelineError
from .fileio import atomic_write_bytes, atomic_write_text, unlink_quietly
from .retrieval import Neighbours, topk_neighbours

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq", "none")
EXACT_MAX = 50_000
TARGET_RECALL = 0.95
TUNING_MARGIN = 0.02  # tuned on the build's sample to TARGET_RECALL + this, so other queries clear TARGET_RECALL too
RECALL_QUERIES = 1000
RERANK = 10  # IVF-PQ: candidates re-ranked exactly, per neighbour asked for


@dataclass
class IndexInfo:
    """index.json: what was built, for which store, and how good it is."""

    kind: str  # flat | hnsw | ivfpq
    params: dict[str, Any]
    count: int
    dim: int
    store_sha256: str
    build_seconds: float
    memory_bytes: int
    recall_at_10: float
    recall_queries: int
    exact: bool
    format: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.exact:
            return f"exact ({self.kind} index, {self.count:,} vectors)"
        knob = ", ".join(f"{k} {v}" for k, v in self.params.items())
        return (
            f"approximate ({self.kind}, {knob}): recall@10 {self.recall_at_10:.3f} against exact search "
            f"on {self.recall_queries:,} sampled queries"
        )


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise PipelineError(
            "a FAISS index needs faiss: pip install faiss-cpu (or --index none for exact search)"
        ) from e
    _describe_faiss(faiss)
    return faiss


@lru_cache(maxsize=1)
def _describe_faiss(faiss) -> None:
    """Say once (with -v) which faiss build runs. faiss's own loader tries the per-SIMD libraries of
    older wheels first and logs 'Could not load library with AVX2 support' when a wheel has none:
    recent faiss-cpu wheels (1.15.1 here) are one library that picks AVX2 or AVX-512 at run time
    ('DD', dynamic dispatch, in its compile options), so that line is silenced (main.py) and this
    one says what was loaded."""
    options = faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else "unknown"
    dispatch = "; SIMD chosen at run time" if "DD" in options.split() else ""
    log.debug("faiss %s loaded (compile options: %s%s)", getattr(faiss, "__version__", "?"), options.strip(), dispatch)


def choose_kind(n: int, dim: int) -> str:
    """auto: flat up to EXACT_MAX vectors, then IVF-PQ with the exact re-rank."""
    return "flat" if n <= EXACT_MAX else "ivfpq"


def gpu_faiss(faiss) -> bool:
    """faiss-gpu is installed and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _ivfpq_params(n: int, dim: int, gpu: bool = False) -> dict[str, Any]:
    """nlist about 4 sqrt(N); D/2 sub-quantizers of 4 bits (D/4 bytes a vector), scanned with SIMD
    ("fast scan"): at the same bytes a vector it found as many neighbours as 8-bit codes and ran
    twice as fast on 2 cores (benchmarks/scale.py). faiss-gpu has no fast scan and takes at most 96
    bytes a code: there, 8-bit codes of D/8 bytes."""
    nlist = int(min(65536, max(16, 2 ** round(np.log2(4 * np.sqrt(n))))))
    if gpu:
        m = next((m for m in (dim // 8, dim // 16, dim // 32) if 1 <= m <= 96 and dim % m == 0), 1)
        return {"nlist": nlist, "m": m, "bits": 8}
    m = next(m for m in (dim // 2, dim // 4, dim) if m >= 1 and dim % m == 0)
    return {"nlist": nlist, "m": m, "bits": 4}


def _new_index(faiss, kind: str, dim: int, n: int, gpu: bool = False):
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, metric)
        index.hnsw.efConstruction = 40
        return index, {"M": 32, "efConstruction": 40}
    if kind == "ivfpq":
        p = _ivfpq_params(n, dim, gpu)
        fast_scan = "fs" if p["bits"] == 4 else ""
        return faiss.index_factory(dim, f"IVF{p['nlist']},PQ{p['m']}x{p['bits']}{fast_scan}", metric), p
    raise PipelineError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")


def _set_knob(index, kind: str, value: int) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = value
    elif kind == "ivfpq":
        index.nprobe = value


KNOBS = {
    # steps of about 1.5x: each step costs about that much more search time
    "hnsw": ("efSearch", (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)),
    "ivfpq": ("nprobe", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)),
}


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-10 found in the returned top-10, averaged over queries."""
    k = min(10, truth.shape[1])
    if k == 0:  # nothing to find (a gallery of one)
        return 1.0
    hits = [len(set(a[:k]) & set(t[:k]) - {-1}) / max(1, len(set(t[:k]) - {-1})) for a, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def _inner_products_by_idx(q: np.ndarray, emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """sims[i, j] = q[i] . emb[ids[i, j]] (-inf where ids is -1), in FAISS's threaded kernel: the
    re-rank reads 10 k stored vectors a query, which numpy would gather on one core."""
    faiss = _faiss()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    safe = np.ascontiguousarray(np.where(ids >= 0, ids, 0), dtype=np.int64)
    sims = np.empty(ids.shape, np.float32)
    if sims.size:
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(sims), faiss.swig_ptr(q), faiss.swig_ptr(emb), faiss.swig_ptr(safe),
            q.shape[1], q.shape[0], ids.shape[1],
        )  # fmt: skip
    return np.where(ids >= 0, sims, -np.inf)


class GalleryIndex:
    """A FAISS index over a store's embeddings, answering as retrieval.topk_neighbours does
    (cosine distances, ascending; ties by index where the search is exact)."""

    def __init__(self, index, info: IndexInfo, embeddings: np.ndarray, threads: int = 0) -> None:
        self.index, self.info, self.embeddings = index, info, embeddings
        self.searcher, self.on_gpu = index, False  # the index searched: this one, or its copy on the GPU
        if threads:
            _faiss().omp_set_num_threads(threads)

    def use_gpu(self) -> bool:
        """Search a copy on GPU 0 when faiss-gpu is installed and sees one. Flat and 8-bit IVF-PQ
        indexes move; HNSW and fast-scan codes have no GPU version and stay on the CPU (logged)."""
        faiss = _faiss()
        if not gpu_faiss(faiss):
            return False
        try:
            self._gpu_resources = faiss.StandardGpuResources()
            searcher = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
            if self.info.kind in KNOBS:
                _set_knob(searcher, self.info.kind, self.info.params[KNOBS[self.info.kind][0]])
        except (RuntimeError, AttributeError) as e:
            log.info("the %s index is searched on the CPU (faiss-gpu cannot take it: %s)", self.info.kind, e)
            return False
        self.searcher, self.on_gpu = searcher, True
        return True

    def describe(self) -> str:
        return self.info.describe() + (", searched on the GPU" if self.on_gpu else "")

    def search(self, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> Neighbours:
        """Top-k of the gallery for each query (float32 (Q, D), L2-normalized).

        self_ids: the gallery row of each query when the queries are gallery items (never returned).
        An exact (flat) index settles ties by index, as retrieval.topk_neighbours does.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, exact = self.info.count, self.info.exact
        rerank = self.info.kind == "ivfpq"
        want = min(n, k * (RERANK if rerank else 1) + (16 if exact else 0) + (1 if self_ids is not None else 0))
        idx = np.full((len(q), k), -1, np.int64)
        out = np.full((len(q), k), np.inf, np.float32)
        if want == 0 or len(q) == 0:
            return Neighbours(idx, out)
        sims, ids = self.searcher.search(q, want)
        if rerank:  # compressed codes find candidates; the stored vectors rank them
            sims = _inner_products_by_idx(q, self.embeddings, ids)
            order = np.argsort(-sims, axis=1, kind="stable")
            sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        dist = (1.0 - sims).astype(np.float32)
        keep = ids >= 0
        if self_ids is not None:
            keep &= ids != np.asarray(self_ids)[:, None]
        if not exact:  # the index's order stands: drop the misses and the query itself, keep the first k
            first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            m = min(k, ids.shape[1])
            taken = np.take_along_axis(keep, first, 1)
            idx[:, :m] = np.where(taken, np.take_along_axis(ids, first, 1), -1)
            out[:, :m] = np.where(taken, np.take_along_axis(dist, first, 1), np.inf)
            return Neighbours(idx, out)
        for r in range(len(q)):
            c, v = ids[r][keep[r]], dist[r][keep[r]]
            if want < n and len(v) >= k and v[k - 1] >= v[-1]:
                c, v = self._exact_row(q[r], k, None if self_ids is None else int(self_ids[r]))
            else:
                order = np.lexsort((c, v))
                c, v = c[order], v[order]
            m = min(k, len(c))
            idx[r, :m], out[r, :m] = c[:m], v[:m]
        return Neighbours(idx, out)

    def _exact_row(self, q: np.ndarray, k: int, self_id: int | None) -> tuple[np.ndarray, np.ndarray]:
        """One query's top-k by the exact rule, for a row whose ties run past the candidates."""
        nb = topk_neighbours(q[None], self.embeddings, k + (self_id is not None))
        keep = nb.indices[0] != (-2 if self_id is None else self_id)
        return nb.indices[0][keep], nb.distances[0][keep]

    def all_neighbours(self, k: int, block: int = 4096) -> Neighbours:
        """Every gallery item's top-k other items, block by block."""
        n = self.info.count
        parts = [
            self.search(self.embeddings[s : s + block], k, self_ids=np.arange(s, min(n, s + block)))
            for s in range(0, n, block)
        ]
        if not parts:
            return Neighbours(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        return Neighbours(np.concatenate([p.indices for p in parts]), np.concatenate([p.distances for p in parts]))


def build_index(
    embeddings: np.ndarray, kind: str, store_sha256: str, threads: int = 0, seed: int = 0, gpu: bool = False
) -> GalleryIndex:
    """Build, tune and measure an index of `embeddings` (float32 (N, D), L2-normalized).
    gpu: the run's model is on a GPU: with faiss-gpu, an index the GPU can search, searched there."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = emb.shape
    if kind == "auto":
        kind = choose_kind(n, dim)
    t = time.perf_counter()
    index, params = _new_index(faiss, kind, dim, n, gpu=gpu and gpu_faiss(faiss))
    if not index.is_trained:  # k-means on a sample: 64 points a list is plenty
        rng = np.random.default_rng(seed)
        index.train(emb[rng.choice(n, size=min(n, 64 * params.get("nlist", 1)), replace=False)])
    index.add(emb)
    build = time.perf_counter() - t
    rng = np.random.default_rng(seed + 1)
    sample_ids = np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False)) if n else np.zeros(0, np.int64)
    # each sampled item's ten nearest other items, as a gallery run asks for them: an item finding
    # itself would count as a free hit
    k = min(10, n - 1)
    truth = np.zeros((len(sample_ids), 0), np.int64)
    if k > 0:
        nearest = topk_neighbours(emb[sample_ids], emb, k + 1).indices
        truth = np.array([[j for j in row if j != i][:k] for i, row in zip(sample_ids, nearest)], np.int64)
    info = IndexInfo(
        kind=kind,
        params=params,
        count=n,
        dim=dim,
        store_sha256=store_sha256,
        build_seconds=round(build, 2),
        memory_bytes=int(faiss.serialize_index(index).nbytes) if n else 0,
        recall_at_10=1.0,
        recall_queries=len(sample_ids),
        exact=kind == "flat",
    )
    gi = GalleryIndex(index, info, emb, threads)
    if kind == "ivfpq":
        params["rerank"] = RERANK
    name, values = KNOBS.get(kind, ("", (None,)))
    for value in values:  # raise the search effort until the sample's recall reaches the target
        if value is not None:
            _set_knob(index, kind, value)
            params[name] = value
        found = gi.search(emb[sample_ids], k, self_ids=sample_ids).indices if k > 0 else truth
        info.recall_at_10 = round(recall_at_10(found, truth), 4)
        if info.recall_at_10 >= TARGET_RECALL + TUNING_MARGIN:
            break
    if gpu:
        gi.use_gpu()
    return gi


def save_index(folder: Path, gi: GalleryIndex) -> None:
    faiss = _faiss()
    unlink_quietly(folder / INDEX_META)  # the meta goes last: without it an index file is never used
    atomic_write_bytes(folder / INDEX_FILE, faiss.serialize_index(gi.index).tobytes())
    atomic_write_text(folder / INDEX_META, json.dumps(asdict(gi.info), indent=2, sort_keys=True))


def read_info(folder: Path) -> IndexInfo | None:
    path = folder / INDEX_META
    if not path.is_file() or not (folder / INDEX_FILE).is_file():
        return None
    try:
        return IndexInfo(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise PipelineError(
            f"{path}: unreadable index metadata ({e}); delete it or rerun the gallery to rebuild it"
        ) from e


def load_index(
    folder: Path, embeddings: np.ndarray, store_sha256: str, threads: int = 0, gpu: bool = False
) -> GalleryIndex | None:
    """The index beside a store, or None when there is none. Raises PipelineError when it was built
    for other embeddings (a stale index is never used)."""
    info = read_info(folder)
    if info is None:
        return None
    if info.store_sha256 != store_sha256 or info.count != len(embeddings):
        raise PipelineError(
            f"{folder / INDEX_FILE} was built for other embeddings (store {info.store_sha256[:12]}…, "
            f"{info.count} vectors; the store now is {store_sha256[:12]}…, {len(embeddings)}): "
            "run the gallery again to rebuild it, or use --index none"
        )
    faiss = _faiss()
    data = np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8)
    index = faiss.deserialize_index(data)
    if info.kind in KNOBS:
        _set_knob(index, info.kind, info.params[KNOBS[info.kind][0]])
    gi = GalleryIndex(index, info, np.ascontiguousarray(embeddings, dtype=np.float32), threads)
    if gpu:
        gi.use_gpu()
    return gi


def ensure_index(
    folder: Path, embeddings: np.ndarray, store_sha256: str, kind: str, threads: int = 0, gpu: bool = False
) -> GalleryIndex | None:
    """The index a gallery run uses: the one on disk when it is fresh and of the kind asked for,
    else built (a stale one is rebuilt, with a message). None for --index none."""
    if kind == "none":
        return None
    info = read_info(folder)
    wanted = choose_kind(len(embeddings), embeddings.shape[1]) if kind == "auto" else kind
    if info is not None:
        if info.store_sha256 == store_sha256 and info.count == len(embeddings) and info.kind == wanted:
            return load_index(folder, embeddings, store_sha256, threads, gpu)
        why = "the store changed" if info.store_sha256 != store_sha256 else f"{wanted} asked for, {info.kind} found"
        log.info("rebuilding %s (%s)", folder / INDEX_FILE, why)
    gi = build_index(embeddings, wanted, store_sha256, threads, gpu=gpu)
    save_index(folder, gi)
    return gi

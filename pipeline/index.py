"""Nearest-neighbour index of a gallery store (FAISS): exact search below a size, an approximate index
above it, built once beside the store, checked against it before use, and kept current by updates.

    embeddings/index.faiss        the FAISS index (inner product on the L2-normalized vectors); its ids
                                  are the store's embedding rows (lines of embeddings.npy)
    embeddings/index.sample.npz   the recall yardstick: sampled rows and their exact top-10
    embeddings/index.json         kind, parameters, build time, memory, the store's embeddings hash,
                                  recall@10 against exact search on the sample, and one history line
                                  per update

How `auto` chooses (sized from benchmarks/scale.py on 2 cores): exact search by blocked matrix
products up to EXACT_MAX vectors (all-pairs top-k costs N^2 D); above it IVF-PQ (4-bit codes scanned with
SIMD, D/4 bytes a vector, in memory; its candidates, RERANK x k of them, are re-ranked exactly against the
store's vectors read from embeddings.npy). autofaiss prefers HNSW when its full vectors fit in
memory; measured here, IVF-PQ with the exact re-rank beat HNSW32 at 100k and at 1M on recall@10,
single-query latency, all-neighbours time and memory (HNSW needed efSearch 1024 for recall 0.97 at
1M, and 35 minutes for all neighbours), so HNSW is kept for `--index hnsw` only. The search
parameter (efSearch or nprobe) is raised step by step until recall@10 on the sample reaches
TARGET_RECALL + TUNING_MARGIN.

How an index ages (update_index, after a store update): the store keeps its unchanged vectors in their
old order, drops the removed ones and appends the new ones, so every surviving row moves down by the
number of removed rows before it. The index follows without re-encoding what it holds: a flat index
drops the removed vectors (faiss compacts it in order, which is the new numbering) and appends the new
ones; an IVF index removes the dropped ids from its lists, rewrites the ids left in each list to their
new rows, and files the new vectors into its trained lists (add_with_ids); HNSW, which cannot delete,
takes appended vectors into its graph and is rebuilt when an update removes any (no tombstones: HNSW is
opt-in, and tombstones would cost every search a filter and an over-fetch). The sample's exact top-10
is carried forward exactly (renumbered, merged with the new vectors; rows that lost a neighbour or
are new are recomputed), recall@10 is measured on it, and RenewRule decides whether the updated index
stays or is rebuilt from the new store.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PipelineError, first_line
from .fileio import atomic_write_bytes, atomic_write_text, sha256_bytes, unlink_quietly
from .retrieval import Neighbours, topk_neighbours

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
SAMPLE_FILE = "index.sample.npz"
STAGING_DIR = ".index-next"  # in the store folder: a new index is written here, then moved into place
INDEX_FORMAT = 2  # 2: trained size, build's knob and imbalance, sample file, history (1 is read too)
INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq", "none")
EXACT_MAX = 50_000
TARGET_RECALL = 0.95
TUNING_MARGIN = 0.02  # tuned on the build's sample to TARGET_RECALL + this, so other queries clear TARGET_RECALL too
REBUILD_SLACK = 0.02  # an update rebuilds a build that reached under TARGET_RECALL once it falls this far below it
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
    format: int = INDEX_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    trained_count: int = 0  # the vectors it was built for (IVF: lists trained and sized for); 0: not recorded
    built_knob: int = 0  # the search parameter the build tuned to; updates raise it at most RenewRule.max_effort x
    built_imbalance: float = 0.0  # IVF: imbalance factor of its lists when built (1.0: all lists equal)
    built_recall: float = 0.0  # recall@10 the build reached (0.0: not recorded): a rebuild reaches no more
    imbalance: float = 0.0  # IVF: the same now
    sample_sha256: str = ""  # of index.sample.npz; a sample file with another hash is not this index's
    index_sha256: str = ""  # of index.faiss as written (since 2026-12-07; "": not recorded, not checked)
    history: list[dict[str, Any]] = field(default_factory=list)  # one line per update_index

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


# IVF-PQ trains 16 centroids per sub-quantizer (4-bit codes) by k-means: faiss wants 39 points a centroid
IVFPQ_MIN_VECTORS = 16 * 39


def _ivfpq_params(n: int, dim: int, gpu: bool = False) -> dict[str, Any]:
    """nlist about 4 sqrt(N), at most N/39 (k-means' training points a list); D/2 sub-quantizers of 4
    bits (D/4 bytes a vector), scanned with SIMD
    ("fast scan"): at the same bytes a vector it found as many neighbours as 8-bit codes and ran
    twice as fast on 2 cores (benchmarks/scale.py). faiss-gpu has no fast scan and takes at most 96
    bytes a code: there, 8-bit codes of D/8 bytes."""
    nlist = int(min(65536, max(16, 2 ** round(np.log2(4 * np.sqrt(n))))))
    # k-means needs a training point a list at the very least (faiss refuses fewer), 39 to train well
    nlist = max(1, min(nlist, n // 39))
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


TIE = 1e-5  # cosine distances this close to the true 10th count as ties with it


def recall_at_10(found: np.ndarray, truth: np.ndarray, found_dist: np.ndarray | None = None,
                 truth_dist: np.ndarray | None = None) -> float:
    """Share of the true top-10 found in the returned top-10, averaged over queries. Given the
    distances, a returned item at most the true 10th's distance away counts (as ann-benchmarks
    counts): among exact copies any one is as right as another, and the exact top-10's choice
    among them (by row) is no better than the index's."""
    k = min(10, truth.shape[1])
    if k == 0:  # nothing to find (a gallery of one)
        return 1.0
    if found_dist is not None and truth_dist is not None:
        hits = []
        for a, d, t, td in zip(found[:, :k], found_dist[:, :k], truth[:, :k], truth_dist[:, :k]):
            real = td[t >= 0]
            if not len(real):
                hits.append(1.0)
                continue
            hits.append(min(1.0, float(np.count_nonzero((a >= 0) & (d <= real[-1] + TIE))) / len(real)))
        return float(np.mean(hits)) if hits else 1.0
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


def _exact_others(emb: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of `rows`' exact top-k other rows of `emb` (k = min(10, N - 1)), as a gallery run asks for
    them (an item finding itself would count as a free hit): ids int64 (S, k), cosine distances (S, k)."""
    k = min(10, len(emb) - 1)
    if k <= 0 or not len(rows):
        return np.zeros((len(rows), max(k, 0)), np.int64), np.zeros((len(rows), max(k, 0)), np.float32)
    nb = topk_neighbours(emb[rows], emb, k + 1, block=256)  # 256 x N distances at a time: 1 GiB at 1M
    drop = nb.indices == rows[:, None]
    drop[~drop.any(axis=1), -1] = True  # the row itself was not among them (ties): the last one goes
    return nb.indices[~drop].reshape(len(rows), k), nb.distances[~drop].reshape(len(rows), k)


@dataclass
class RecallSample:
    """The yardstick an index's recall@10 is measured on: sampled gallery rows and their exact top-k
    other rows (k = min(10, N - 1)), kept in index.sample.npz and carried through updates exactly, so
    an update needs no exact search over the whole gallery (1,000 queries over 1M vectors: ~10 s here).

    rows: int64 (S,). ids: int64 (S, k) exact top-k, ascending distance, ties by row. dist: float32
    (S, k) cosine distances.
    """

    rows: np.ndarray
    ids: np.ndarray
    dist: np.ndarray

    @classmethod
    def draw(cls, emb: np.ndarray, seed: int) -> RecallSample:
        n = len(emb)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False)).astype(np.int64)
        return cls(rows, *_exact_others(emb, rows))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, rows=self.rows, ids=self.ids, dist=self.dist)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RecallSample:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["rows"], z["ids"], z["dist"])

    def recall(self, gi: GalleryIndex) -> float:
        """recall@10 of the index's answers for the sampled rows, as a gallery run asks (itself excluded)."""
        k = self.ids.shape[1]
        if k == 0 or not len(self.rows):
            return 1.0
        found = gi.search(gi.embeddings[self.rows], k, self_ids=self.rows)
        return round(recall_at_10(found.indices, self.ids, found.distances, self.dist), 4)

    def carried(self, lookup: np.ndarray, first_new: int, emb: np.ndarray, seed: int) -> RecallSample:
        """This sample in the updated store: `lookup[old row]` is its new row (-1: removed), rows from
        `first_new` on are new, `emb` the new store's vectors. The sample stays a uniform draw of the
        new store (the new rows get their share); a row's top-k is the old one renumbered and merged
        with its top-k among the new rows, or computed afresh for a row that lost a neighbour or is new."""
        n = len(emb)
        k, size = min(10, n - 1), min(n, RECALL_QUERIES)
        rng = np.random.default_rng(seed)
        rows = lookup[self.rows]
        ids = np.where(self.ids >= 0, lookup[np.maximum(self.ids, 0)], -1)
        lost: np.ndarray = np.any((self.ids >= 0) & (ids < 0), axis=1)
        alive = rows >= 0
        rows, ids, dist, lost = rows[alive], ids[alive], self.dist[alive], lost[alive]
        take_new = min(n - first_new, max(size - first_new, int(rng.binomial(size, (n - first_new) / n))))
        from_kept = size - take_new
        if len(rows) > from_kept:  # fewer of the old rows than before: the new rows take their share
            keep = np.sort(rng.choice(len(rows), from_kept, replace=False))
            rows, ids, dist, lost = rows[keep], ids[keep], dist[keep], lost[keep]
        fresh = [np.sort(rng.choice(np.arange(first_new, n), take_new, replace=False))]
        if len(rows) < from_kept:  # too many sampled rows were removed: more old rows
            spare = np.setdiff1d(np.arange(first_new), rows)
            fresh.append(np.sort(rng.choice(spare, from_kept - len(rows), replace=False)))
        carried = rows[~lost]
        c_ids, c_dist = ids[~lost], dist[~lost]
        if first_new < n and len(carried) and k > 0:
            nb = topk_neighbours(emb[carried], emb[first_new:], min(k, n - first_new), block=256)
            c_ids = np.concatenate([c_ids, nb.indices + first_new], axis=1)
            c_dist = np.concatenate([c_dist, nb.distances], axis=1)
        order = np.lexsort((c_ids, c_dist), axis=1)[:, :k]  # ascending distance, ties by row
        c_ids, c_dist = np.take_along_axis(c_ids, order, 1), np.take_along_axis(c_dist, order, 1)
        redo = np.concatenate([rows[lost], *fresh]).astype(np.int64)
        r_ids, r_dist = _exact_others(emb, redo)
        all_rows = np.concatenate([carried, redo])
        by_row = np.argsort(all_rows, kind="stable")
        return RecallSample(
            all_rows[by_row],
            np.concatenate([c_ids.reshape(-1, k), r_ids])[by_row],
            np.concatenate([c_dist.reshape(-1, k), r_dist])[by_row],
        )


@dataclass(frozen=True)
class RenewRule:
    """When update_index rebuilds an updated index from the new store instead of keeping it.

    Three signals, after DeDrift (Baranchuk, Douze et al., ICCV 2023: content drift fills some IVF
    lists and empties others, so a search scans more for the same recall, and recall at a fixed
    nprobe falls) and autofaiss's score_index (recall against exact search on sampled queries):

    min_recall: recall@10 on the sample, once the search parameter was raised (if needed) up to
        max_effort times the build's, below which the index is rebuilt. Raising nprobe is the cheap
        repair; past max_effort a search costs more than a rebuilt index would.
    max_imbalance: IVF: rebuilt when its lists' imbalance factor (faiss InvertedLists.imbalance_factor:
        nlist * sum(size^2) / N^2, the expected scan per probed list against equal lists) grew past
        this multiple of the build's.
    max_growth: IVF: rebuilt when the catalogue is this many times larger, or smaller, than the one
        its lists were trained and sized for (nlist ~ 4 sqrt(N)): at 4x the list count auto would
        choose is 2x off, and a search costs about (1 + g) / (2 sqrt g) = 1.25x the right count's.
    """

    min_recall: float = TARGET_RECALL
    max_effort: float = 2.0
    max_imbalance: float = 1.5
    max_growth: float = 4.0

    @classmethod
    def never(cls) -> RenewRule:
        """Update in place, never re-tune, never rebuild (what a plain add_with_ids does; benchmarks)."""
        return cls(min_recall=0.0, max_effort=1.0, max_imbalance=math.inf, max_growth=math.inf)

    def structural(self, info: IndexInfo) -> list[str]:
        """Reasons to rebuild that need no search: the size and the lists' balance (IVF only)."""
        if info.kind != "ivfpq":
            return []
        why = []
        growth = info.count / max(1, info.trained_count)
        if growth > self.max_growth or growth < 1 / self.max_growth:
            why.append(f"the catalogue is {growth:.2f}x the {info.trained_count:,} vectors its lists were made for")
        if info.built_imbalance and info.imbalance > self.max_imbalance * info.built_imbalance:
            why.append(
                f"its lists are {info.imbalance / info.built_imbalance:.2f}x as uneven as built "
                f"(imbalance factor {info.imbalance:.2f}, built {info.built_imbalance:.2f})"
            )
        return why


class GalleryIndex:
    """A FAISS index over a store's embeddings, answering as retrieval.topk_neighbours does
    (cosine distances, ascending; ties by index where the search is exact)."""

    def __init__(self, index, info: IndexInfo, embeddings: np.ndarray, threads: int = 0) -> None:
        self.index, self.info, self.embeddings = index, info, embeddings
        self.sample: RecallSample | None = None  # the recall yardstick, when built or updated here
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

    def search(self, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> Neighbours:
        """Top-k of the gallery for each query (float32 (Q, D), L2-normalized).

        self_ids: the gallery row of each query when the queries are gallery items (never returned).
        allowed: bool (N,), a metadata filter applied inside the search (a FAISS IDSelectorBitmap),
            with nprobe / efSearch raised by one over the share of rows allowed, so that as many
            allowed candidates are met as an unfiltered search meets; an approximate kind only.
        An exact (flat) index settles ties by index, as retrieval.topk_neighbours does.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is not None:
            return self._search_allowed(q, k, np.asarray(allowed, bool), self_ids)
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
        if not exact:  # ties by row, as exact search and the filtered path order them (copies come back alike)
            order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=1)
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

    def _search_allowed(self, q: np.ndarray, k: int, allowed: np.ndarray,
                        self_ids: np.ndarray | None = None) -> Neighbours:
        faiss = _faiss()
        share = max(float(allowed.mean()), 1.0 / max(len(allowed), 1))
        bitmap = np.packbits(allowed, bitorder="little")  # alive until the search returns
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        kind = self.info.kind
        if kind == "ivfpq":
            nprobe = min(int(self.index.nlist), int(np.ceil(self.index.nprobe / share)))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif kind == "hnsw":
            ef = min(4096, int(np.ceil(self.index.hnsw.efSearch / share)))
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
        else:
            params = faiss.SearchParameters(sel=sel)
        want = min(int(allowed.sum()), k * (RERANK if kind == "ivfpq" else 1) + (1 if self_ids is not None else 0))
        idx = np.full((len(q), k), -1, np.int64)
        out = np.full((len(q), k), np.inf, np.float32)
        if want == 0 or len(q) == 0:
            return Neighbours(idx, out)
        sims, ids = self.index.search(q, want, params=params)  # the CPU index: GPU indexes take no selector
        if kind == "ivfpq":
            sims = _inner_products_by_idx(q, self.embeddings, ids)
        if self_ids is not None:  # a gallery item is never its own neighbour, allowed or not
            ids = np.where(ids == np.asarray(self_ids)[:, None], -1, ids)
        sims = np.where(ids >= 0, sims, -np.inf)
        order = np.lexsort((ids, -sims), axis=1)[:, :k]
        m = min(k, ids.shape[1])
        chosen_ids = np.take_along_axis(ids, order, 1)[:, :m]
        idx[:, :m] = np.where(chosen_ids >= 0, chosen_ids, -1)
        out[:, :m] = np.where(chosen_ids >= 0, 1.0 - np.take_along_axis(sims, order, 1)[:, :m], np.inf)
        return Neighbours(idx, out.astype(np.float32))

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
    asked, kind = kind, wanted_kind(kind, kind, n, dim)
    if asked == "ivfpq" and kind == "flat":  # faiss cannot train its codes on fewer (it crashed under 16)
        log.info("--index ivfpq: %d vectors are too few to train IVF-PQ (it needs %d): an exact flat index instead",
                 n, IVFPQ_MIN_VECTORS)
    t = time.perf_counter()
    index, params = _new_index(faiss, kind, dim, n, gpu=gpu and gpu_faiss(faiss))
    if not index.is_trained:  # k-means on a sample: 64 points a list is plenty
        rng = np.random.default_rng(seed)
        index.train(emb[rng.choice(n, size=min(n, 64 * params.get("nlist", 1)), replace=False)])
    index.add(emb)
    build = time.perf_counter() - t
    sample = RecallSample.draw(emb, seed + 1)
    info = IndexInfo(
        kind=kind,
        params=params,
        count=n,
        dim=dim,
        store_sha256=store_sha256,
        build_seconds=round(build, 2),
        memory_bytes=int(faiss.serialize_index(index).nbytes) if n else 0,
        recall_at_10=1.0,
        recall_queries=len(sample.rows),
        exact=kind == "flat",
        trained_count=n,
    )
    if kind == "ivfpq":
        params["rerank"] = RERANK
        info.built_imbalance = info.imbalance = _imbalance(faiss, index)
    gi = GalleryIndex(index, info, emb, threads)
    gi.sample = sample
    _tune(gi, KNOBS[kind][1] if kind in KNOBS else (), TARGET_RECALL + TUNING_MARGIN)
    info.built_knob = params.get(KNOBS[kind][0], 0) if kind in KNOBS else 0
    info.built_recall = info.recall_at_10
    if kind in KNOBS and info.recall_at_10 < TARGET_RECALL:  # kept, but not quietly: a note is easily missed
        knob = KNOBS[kind][0]
        log.warning("the %s index reaches recall@10 %.3f at %s %d, the most it is tuned to, under the %.2f it aims "
                    "at: this catalogue's nearest neighbours are hard for it (of each true top 10, about %d are "
                    "missed); --index flat searches exactly (%s vectors)", kind, info.recall_at_10, knob, params[knob],
                    TARGET_RECALL, round((1 - info.recall_at_10) * 10), f"{n:,}")
    if gpu:
        gi.use_gpu()
    return gi


def _tune(gi: GalleryIndex, values: tuple[int, ...] | list[int], target: float) -> None:
    """Raise the search parameter through `values` until recall@10 on the index's sample reaches
    `target` (or the values run out); the recall measured at the last value is recorded."""
    assert gi.sample is not None
    kind, params = gi.info.kind, gi.info.params
    for value in values or (None,):
        if value is not None:
            _set_knob(gi.index, kind, value)
            params[KNOBS[kind][0]] = value
        gi.info.recall_at_10 = gi.sample.recall(gi)
        if gi.info.recall_at_10 >= target:
            break
    gi.info.recall_queries = len(gi.sample.rows)


def _imbalance(faiss, index) -> float:
    """An IVF index's imbalance factor: 1.0 when all lists are equal, the expected scan per probed
    list against that when the queries follow the data."""
    return round(float(faiss.extract_index_ivf(index).invlists.imbalance_factor()), 4)


def save_index(folder: Path, gi: GalleryIndex) -> None:
    """Write the index beside the store: staged in STAGING_DIR, then moved into place, the meta last
    (switch_index): until then the index that was there stays whole and valid for its store."""
    stage = Path(folder) / STAGING_DIR
    write_index(stage, gi)
    switch_index(stage, Path(folder))
    shutil.rmtree(stage, ignore_errors=True)


def write_index(folder: Path, gi: GalleryIndex) -> None:
    """index.faiss, index.sample.npz, then index.json in `folder` (made if needed), each atomically:
    without its meta an index file is never used."""
    faiss = _faiss()
    folder.mkdir(parents=True, exist_ok=True)
    unlink_quietly(folder / INDEX_META)
    data = faiss.serialize_index(gi.index)
    gi.info.memory_bytes = int(data.nbytes) if gi.info.count else 0
    gi.info.index_sha256 = sha256_bytes(data.data)
    atomic_write_bytes(folder / INDEX_FILE, data.tobytes())
    del data
    if gi.sample is not None:
        sample = gi.sample.to_bytes()
        gi.info.sample_sha256 = sha256_bytes(sample)
        atomic_write_bytes(folder / SAMPLE_FILE, sample)
    else:
        gi.info.sample_sha256 = ""
        unlink_quietly(folder / SAMPLE_FILE)
    gi.info.format = INDEX_FORMAT
    atomic_write_text(folder / INDEX_META, json.dumps(asdict(gi.info), indent=2, sort_keys=True))


def switch_index(staged: Path, folder: Path) -> bool:
    """Move an index written by write_index (or update_index's out_dir) from `staged` into `folder`:
    the old meta is removed first (from then on no index is used, never a mix of two), the index and
    sample files are moved, the meta last. Repeatable: a switch killed midway is finished by calling
    it again. False when `staged` holds no complete index (its meta is written last)."""
    staged, folder = Path(staged), Path(folder)
    if not (staged / INDEX_META).is_file():
        return False
    unlink_quietly(folder / INDEX_META)
    for name in (INDEX_FILE, SAMPLE_FILE):
        if (staged / name).is_file():
            os.replace(staged / name, folder / name)
    os.replace(staged / INDEX_META, folder / INDEX_META)
    return True


class DamagedIndexError(PipelineError):
    """The index beside a store cannot be read, or is not the file its metadata records: a gallery
    run builds it again (ensure_index), --update too; a search is refused. `reason`: what is wrong,
    without the remedy."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}. A gallery run over the store builds it again (its gallery command, with "
                         "--use-embeddings or --use-embedded-segment to keep the vectors), or search without it: "
                         "--index none (Catalog.open(..., index='none'))")
        self.reason = reason


def read_info(folder: Path) -> IndexInfo | None:
    path = folder / INDEX_META
    if not path.is_file() or not (folder / INDEX_FILE).is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if meta.get("format", 1) > INDEX_FORMAT:
            raise PipelineError(
                f"{path}: index format {meta['format']} is newer than this program reads ({INDEX_FORMAT}); "
                "delete it or rerun the gallery to rebuild it"
            )
        return IndexInfo(**meta)
    except (json.JSONDecodeError, TypeError) as e:
        raise DamagedIndexError(f"{path}: unreadable index metadata ({e})") from e


def read_sample(folder: Path, info: IndexInfo) -> RecallSample | None:
    """The index's recall sample, or None when its file is missing or is not the one its meta names."""
    if not info.sample_sha256:
        return None
    try:
        data = (folder / SAMPLE_FILE).read_bytes()
    except OSError:
        return None
    return RecallSample.from_bytes(data) if sha256_bytes(data) == info.sample_sha256 else None


def _index_from(faiss: Any, data: np.ndarray, info: IndexInfo, named: Path | str) -> Any:
    """The index in `data` (index.faiss's bytes), checked against the hash its metadata records;
    DamagedIndexError otherwise, its reason naming the file as `named`."""
    if info.index_sha256 and sha256_bytes(data.data) != info.index_sha256:
        raise DamagedIndexError(f"{named} is damaged: its bytes are not those written for its metadata")
    try:
        return faiss.deserialize_index(data)
    except RuntimeError as e:  # an index written before its hash was recorded, cut short
        raise DamagedIndexError(f"{named} cannot be read ({first_line(e)[:120]})") from e


def load_index(
    folder: Path, embeddings: np.ndarray, store_sha256: str, threads: int = 0, gpu: bool = False
) -> GalleryIndex | None:
    """The index beside a store, or None when there is none. Raises PipelineError when it was built
    for other embeddings (a stale index is never used)."""
    info = read_info(folder)
    if info is None:
        return None
    if info.store_sha256 != store_sha256 or info.count != len(embeddings):
        from .fileio import being_written

        if said := being_written(folder.parent):  # a build or update between its store and its index: not stale
            raise PipelineError(f"{folder / INDEX_FILE} is not yet the store's{said}")
        raise PipelineError(
            f"{folder / INDEX_FILE} was built for other embeddings (store {info.store_sha256[:12]}…, "
            f"{info.count} vectors; the store now is {store_sha256[:12]}…, {len(embeddings)}): "
            "run the gallery again to rebuild it, or use --index none"
        )
    faiss = _faiss()
    data = np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8)
    if read_info(folder) != info:  # an update's switch landed between the two reads: the file may be the new one
        raise PipelineError(
            f"{folder / INDEX_FILE} changed while it was read (an update switched in): run again to use the new store"
        )
    index = _index_from(faiss, data, info, folder / INDEX_FILE)
    if index.ntotal != info.count:
        raise PipelineError(
            f"{folder / INDEX_FILE} holds {index.ntotal:,} vectors but its metadata says {info.count:,}: "
            "run the gallery again to rebuild it, or use --index none"
        )
    if info.kind in KNOBS:
        _set_knob(index, info.kind, info.params[KNOBS[info.kind][0]])
    gi = GalleryIndex(index, info, np.ascontiguousarray(embeddings, dtype=np.float32), threads)
    if gpu:
        gi.use_gpu()
    return gi


def wanted_kind(asked: str, current: str, n: int, dim: int) -> str:
    """The kind of index n vectors get: `auto` chooses by size (choose_kind), so an update that takes
    the catalogue across EXACT_MAX changes the kind (the new kind is built; flat to IVF-PQ needs
    training anyway, and the way back costs less than a second); `none` keeps the index's own kind
    (the run does not search it, but it stays current); a named kind is that kind."""
    if asked == "auto":
        return choose_kind(n, dim)
    kind = current if asked == "none" else asked
    return "flat" if kind == "ivfpq" and n < IVFPQ_MIN_VECTORS else kind  # too few to train (build_index)


def ensure_index(
    folder: Path, embeddings: np.ndarray, store_sha256: str, kind: str, threads: int = 0, gpu: bool = False
) -> GalleryIndex | None:
    """The index a gallery run uses: the one on disk when it is fresh and of the kind asked for,
    else built (a stale one is rebuilt, with a message). None for --index none."""
    if kind == "none":
        return None
    if switch_index(folder / STAGING_DIR, folder):  # an index switch that was killed midway
        shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)
    wanted = wanted_kind(kind, "", len(embeddings), embeddings.shape[1])
    try:
        info = read_info(folder)
        if info is not None:
            if info.store_sha256 == store_sha256 and info.count == len(embeddings) and info.kind == wanted:
                return load_index(folder, embeddings, store_sha256, threads, gpu)
            why = "the store changed" if info.store_sha256 != store_sha256 else f"{wanted} asked for, {info.kind} found"
            log.info("rebuilding %s (%s)", folder / INDEX_FILE, why)
    except DamagedIndexError as e:
        log.warning("rebuilding %s: %s", folder / INDEX_FILE, e.reason)
    gi = build_index(embeddings, wanted, store_sha256, threads, gpu=gpu)
    save_index(folder, gi)
    return gi


# ---- keeping an index current through store updates -------------------------------------------


def update_index(
    store_dir: Path | str,
    kept_old_rows: np.ndarray,
    added: np.ndarray,
    embeddings_after: np.ndarray,
    new_store_sha256: str,
    *,
    kind: str = "auto",
    old_store_sha256: str | None = None,
    out_dir: Path | str | None = None,
    rule: RenewRule | None = None,
    threads: int = 0,
    seed: int = 0,
) -> str:
    """Bring the index beside a store from the old store to the updated one; a one-line description.

    The contract with a store update (update.py): the new store lists the old store's surviving
    vectors first, in their old order, then the new ones; the index's ids are embedding rows.

    Args:
        store_dir: the store folder holding index.faiss / index.json for the OLD store.
        kept_old_rows: int (K,), increasing: the old embedding rows that survive; old row
            kept_old_rows[j] is new row j.
        added: float32 (M, D): the new vectors, new rows K .. K+M-1 (they must equal those rows of
            embeddings_after).
        embeddings_after: float32 (K + M, D), L2-normalized: the new store's embeddings (a memmap
            is fine: only sampled rows and candidates are read, unless the index is rebuilt).
        new_store_sha256: the new store's embeddings hash (store.store_sha256), which the updated
            index is tied to, as ensure_index and load_index check.
        kind: the run's --index: `auto` follows choose_kind (crossing EXACT_MAX builds the other kind),
            a named kind is built if the index is another, `none` keeps the index's kind.
        old_store_sha256: the old store's hash, when known: an index that is not the old store's is
            rebuilt rather than renumbered.
        out_dir: write the new index there (index.faiss, index.sample.npz, index.json, meta last)
            instead of switching it into store_dir; the store update moves it with switch_index when
            it switches the store (before the sidecar), so store and index change together.
        rule: when to rebuild instead of updating in place (RenewRule(): the defaults).

    Guarantees: the updated index holds exactly the rows 0..K+M-1 (removed vectors are gone, never
    returned), answers as an index built on the new store does up to its recall bar (a flat index
    exactly: its vectors are the new store's, in order), its recall@10 is measured on the sample
    and recorded in index.json with one history line for this update. The old index stays whole and
    valid for the old store until the new one is in place: it is written to STAGING_DIR (or
    out_dir), and switched in by renames, the meta last; a run killed during the switch leaves no
    index (never a wrong one) and the next update_index or ensure_index finishes the switch. Called
    again once done, it changes nothing ("already current"). No index beside the store: nothing to do.
    """
    t0 = time.perf_counter()
    folder = Path(store_dir)
    rule = rule or RenewRule()
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    if switch_index(folder / STAGING_DIR, folder):
        log.info("finished an interrupted index switch in %s", folder)
    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)  # an unfinished one's files: not an index
    emb = np.ascontiguousarray(embeddings_after, dtype=np.float32)
    kept = np.asarray(kept_old_rows, dtype=np.int64).ravel()
    new = np.ascontiguousarray(added, dtype=np.float32).reshape(-1, emb.shape[1] if emb.ndim == 2 else 0)
    _check_update(kept, new, emb)
    try:
        info = read_info(folder)
    except DamagedIndexError as e:  # nothing to update: gone, so that the gallery run builds it afresh
        for name in (INDEX_FILE, INDEX_META, SAMPLE_FILE):
            unlink_quietly(folder / name)
        return f"{e.reason}: removed, the gallery run builds it again"
    if info is None:
        return "no index beside the store: the next gallery run builds one"
    n, dim = emb.shape
    if info.store_sha256 == new_store_sha256 and info.count == n:
        return f"index already current: {info.describe()}"
    if n < 2:
        return f"no index for a gallery of {n} vector(s): searched exactly"
    removed = np.setdiff1d(np.arange(info.count, dtype=np.int64), kept)
    wanted = wanted_kind(kind, info.kind, n, dim)
    why: list[str] = []
    if (old_store_sha256 is not None and info.store_sha256 != old_store_sha256) or (
        len(kept) and kept[-1] >= info.count
    ):
        why.append(f"it was not the old store's index ({info.count:,} vectors, store {info.store_sha256[:12]}…)")
    elif wanted != info.kind:
        why.append(f"{wanted} is wanted at {n:,} vectors, {info.kind} found")
    elif info.kind == "hnsw" and len(removed):
        why.append(f"HNSW cannot delete ({len(removed):,} removed)")
    gi, before = None, None
    if not why:
        gi, more = _update_in_place(folder, info, kept, removed, new, emb, new_store_sha256, rule, seed)
        why += more
        before = gi.info.recall_at_10 if gi is not None else None
    if why:
        gi = build_index(emb, wanted, new_store_sha256, threads, seed, gpu=info.params.get("bits") == 8)
        gi.searcher, gi.on_gpu = gi.index, False  # the file is what matters here
    assert gi is not None
    line = _history_line(gi.info, len(new), len(removed), why, before, time.perf_counter() - t0)
    gi.info.history = [*info.history, line]
    stage = Path(out_dir) if out_dir is not None else folder / STAGING_DIR
    write_index(stage, gi)
    if out_dir is None:
        switch_index(stage, folder)
        shutil.rmtree(stage, ignore_errors=True)
    return _describe_update(gi.info, line)


def _check_update(kept: np.ndarray, added: np.ndarray, emb: np.ndarray) -> None:
    """The store update's side of the contract, checked before anything is touched."""
    if emb.ndim != 2:
        raise ValueError(f"embeddings_after must be a 2D array (N, D), but got shape {emb.shape}")
    if len(kept) + len(added) != len(emb):
        raise ValueError(
            f"{len(kept):,} kept rows and {len(added):,} added make {len(kept) + len(added):,} rows, but "
            f"embeddings_after has {len(emb):,}"
        )
    if len(kept) and (kept[0] < 0 or np.any(np.diff(kept) <= 0)):
        raise ValueError(
            "kept_old_rows must be increasing old rows: a store update keeps the unchanged vectors in their old order"
        )
    if len(added) and not np.array_equal(emb[len(kept) :], added):
        raise ValueError("added must equal the last rows of embeddings_after: a store update appends its new vectors")


def _update_in_place(
    folder: Path,
    info: IndexInfo,
    kept: np.ndarray,
    removed: np.ndarray,
    added: np.ndarray,
    emb: np.ndarray,
    store_sha256: str,
    rule: RenewRule,
    seed: int,
) -> tuple[GalleryIndex | None, list[str]]:
    """The saved index renumbered and grown in memory, its recall measured and re-tuned; with the
    reasons RenewRule finds to rebuild it instead (none: keep it)."""
    faiss = _faiss()
    try:
        index = _index_from(faiss, np.frombuffer((folder / INDEX_FILE).read_bytes(), dtype=np.uint8), info, "its file")
    except DamagedIndexError as e:
        return None, [e.reason]
    if index.ntotal != info.count:
        return None, [f"its file holds {index.ntotal:,} vectors, its metadata says {info.count:,}"]
    lookup = np.full(info.count, -1, np.int64)
    lookup[kept] = np.arange(len(kept))
    built_imbalance = info.built_imbalance or (_imbalance(faiss, index) if info.kind == "ivfpq" else 0.0)
    if not _renumber_and_add(faiss, index, info.kind, removed, lookup, added, len(kept)) or index.ntotal != len(emb):
        return None, ["its ids were not the old store's rows"]
    knob = KNOBS[info.kind][0] if info.kind in KNOBS else ""
    new_info = replace(
        info,
        params=dict(info.params),
        count=len(emb),
        store_sha256=store_sha256,
        trained_count=info.trained_count or info.count,  # format 1: its size at the first update stands in
        built_knob=info.built_knob or int(info.params.get(knob, 0)),
        built_imbalance=built_imbalance,
        imbalance=_imbalance(faiss, index) if info.kind == "ivfpq" else 0.0,
        history=list(info.history),
    )
    gi = GalleryIndex(index, new_info, emb)
    if knob:
        _set_knob(index, info.kind, new_info.params[knob])
    sample = read_sample(folder, info)
    gi.sample = (
        sample.carried(lookup, len(kept), emb, seed + 2 + len(info.history))
        if sample is not None and len(sample.rows) and sample.rows.max() < info.count
        else RecallSample.draw(emb, seed + 1)
    )
    why = rule.structural(new_info)
    values: list[int] = []
    cap = 0.0
    if knob:  # raised, if need be, up to max_effort x the build's: the cheap repair
        current, cap = new_info.params[knob], rule.max_effort * new_info.built_knob
        values = [v for v in KNOBS[info.kind][1] if current <= v <= cap] or [current]
    _tune(gi, values, min(1.0, rule.min_recall + TUNING_MARGIN))
    # a build that missed its own target (hard neighbours) is rebuilt only when the updated index falls below
    # what that build reached, less REBUILD_SLACK: rebuilt at each update, it reached no more
    missed = 0.0 < new_info.built_recall < TARGET_RECALL
    bar = min(rule.min_recall, new_info.built_recall - REBUILD_SLACK) if missed else rule.min_recall
    if new_info.recall_at_10 < bar:
        most = max(KNOBS[info.kind][1]) if knob else 0
        raised = ("the most it is raised to" if cap >= most else
                  f"{rule.max_effort:g}x the build's {new_info.built_knob}")
        effort = f" at {knob} {new_info.params[knob]} ({raised})" if knob else ""
        under = (f"{bar:g} (the build's {new_info.built_recall:g} less {REBUILD_SLACK:g})" if bar < rule.min_recall
                 else f"{rule.min_recall:g}")
        why.append(f"recall@10 {new_info.recall_at_10:g} is under {under}{effort}")
    return gi, why


def _renumber_and_add(
    faiss, index, kind: str, removed: np.ndarray, lookup: np.ndarray, added: np.ndarray, first_new: int
) -> bool:
    """Drop the removed rows, give the survivors their new rows, append the new vectors as rows
    first_new.. . False when the index's ids were not the old store's rows."""
    if kind == "flat":  # faiss compacts a flat index in order: the survivors' positions are their new rows
        if len(removed):
            index.remove_ids(faiss.IDSelectorBatch(removed))
        if len(added):
            index.add(added)
        return True
    if kind == "hnsw":  # only appended to (update_index rebuilds an HNSW index that loses vectors)
        if len(added):
            index.add(added)
        return True
    ivf = faiss.extract_index_ivf(index)
    if len(removed):
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        sizes = [lists.list_size(i) for i in range(ivf.nlist)]
        ivf.remove_ids(faiss.IDSelectorBatch(removed))
        if isinstance(lists, faiss.BlockInvertedLists):
            _clear_freed_slots(faiss, lists, sizes)
        if not _relabel(faiss, lists, lookup):
            return False
    if len(added):
        ivf.add_with_ids(added, np.arange(first_new, first_new + len(added), dtype=np.int64))
    return True


def _clear_freed_slots(faiss, lists, sizes_before: list[int]) -> None:
    """Zero the slots a removal freed in each list's last block of 4-bit fast-scan codes.

    faiss 1.15's BlockInvertedLists.remove_ids fills each hole with the list's last code and shrinks
    the list, but leaves the moved code's old slot as it was; the next add packs new codes into that
    block by OR-ing nibbles into slots it assumes are zero (pq4_pack_codes_range), so codes added
    after a removal came out wrong (measured: 21% of the added vectors found themselves first,
    against 100% in a fresh index)."""
    packer = lists.packer
    zero = np.zeros(packer.code_size, np.uint8)
    per_block = packer.nvec
    for i, before in enumerate(sizes_before):
        size = lists.list_size(i)
        end = min(before, -(-size // per_block) * per_block)  # the rest of the last block still in use
        if end > size:
            codes = lists.get_codes(i)
            for slot in range(size, end):
                packer.pack_1_c(faiss.swig_ptr(zero), slot, codes)
            lists.release_codes(i, codes)


def _relabel(faiss, lists, lookup: np.ndarray) -> bool:
    """Rewrite the ids held in every inverted list through lookup (old row -> new row), in place.
    An inverted list's ids are a plain int64 array; faiss has no call that renumbers them
    (update_entries rewrites codes too, and the fast-scan lists do not implement it)."""
    for i in range(lists.nlist):
        size = lists.list_size(i)
        if not size:
            continue
        ptr = lists.get_ids(i)
        ids = faiss.rev_swig_ptr(ptr, size)
        ok = ids.min() >= 0 and ids.max() < len(lookup)
        if ok:
            ids[:] = lookup[ids]
            ok = ids.min() >= 0  # a removed row still listed: not the old store's ids
        lists.release_ids(i, ptr)
        if not ok:
            return False
    return True


def _history_line(
    info: IndexInfo, added: int, removed: int, why: list[str], before: float | None, seconds: float
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store_sha256": info.store_sha256,
        "count": info.count,
        "added": added,
        "removed": removed,
        "action": "rebuilt" if why else "updated",
        "why": why,
        "recall_at_10": info.recall_at_10,
        "seconds": round(seconds, 2),
    }
    if why and before is not None:
        line["recall_before"] = before  # the updated index's, before the rebuild replaced it
    if info.kind in KNOBS:
        line[KNOBS[info.kind][0]] = info.params[KNOBS[info.kind][0]]
    if info.kind == "ivfpq":
        line["imbalance"] = info.imbalance
    return line


def _describe_update(info: IndexInfo, line: dict[str, Any]) -> str:
    knob = next((f", {k} {line[k]}" for k in ("nprobe", "efSearch") if k in line), "")
    text = (
        f"index {line['action']} ({info.kind}{knob}): {line['added']:,} added, {line['removed']:,} removed, "
        f"{info.count:,} vectors, recall@10 {info.recall_at_10:.3f} on {info.recall_queries:,} sampled rows"
    )
    if line["why"]:
        text += "; rebuilt because " + "; ".join(line["why"])
    return text + f" ({line['seconds']:.1f} s)"

"""Search: one type answers every top-k question about a store.

A `Searcher` holds a store's vectors, the manifest lines that own them, and (per --index) the FAISS
index beside the store. Gallery runs, --query-image/--query-text, --serve, video, and the public
`Catalog` API all ask it, so a rule about searching (the index, threads, the GPU) is written once.
Hits come back as typed values that name the embedding row, the manifest line and the file.

`query_crops` turns a query picture into the pictures that are searched: the whole picture, or with
a segmenter each person in it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .duplicates import DuplicateGroup, keep_one_per_group, representatives
from .errors import UsageError
from .filters import FilterError
from .index import GalleryIndex, ensure_index, load_index
from .metadata import Metadata, json_value, product_labels
from .persons import Segmenter, person_crops
from .retrieval import Neighbours, cosine_distances, group_layout, masked_topk, topk_neighbours, topk_rows
from .store import ManifestRow, shown_name

log = logging.getLogger(__name__)

FILTER_EXACT_MAX = 50_000  # matching rows searched exactly (under 5 ms a query at 512 dimensions, 2 cores)
RRF_C = 60  # the constant of reciprocal-rank fusion (Cormack et al.; Qdrant, Elasticsearch use it)


@dataclass(frozen=True)
class Hit:
    """One search result.

    rank: 1-based. row: the embedding row (line of embeddings.npy). line: the manifest line
    (ManifestRow.index). file: the image file, relative to the images folder. source_row: the
    dataset row it came from. person: the person number of a crop (-1 for a whole image). source:
    what the user knows the photo by (manifest.csv's `source`: its path in the dataset folder, or
    `<dataset>[row]`).
    distance: cosine distance (1 - cosine similarity), ascending with rank (in a reciprocal-rank
    fusion the rank follows the fused score, and the distance is the item's nearest to any of the
    fused queries, so it need not ascend). meta: the item's
    metadata values (metadata.py; empty for a store without metadata). score: in a reciprocal-rank
    fusion, the fused score that ranks it (sum of 1 / (60 + rank) over the lists it is in),
    descending with rank; None in any other search.
    """

    rank: int
    row: int
    line: int
    file: str
    source_row: int
    person: int
    distance: float
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str = ""
    score: float | None = None

    @property
    def shown_name(self) -> str:
        """What the user knows the photo by, for a caption (store.shown_name: a relative path's folder and
        name, the last part of any other source)."""
        return shown_name(self.source, self.file, person=self.person)

    def to_dict(self) -> dict[str, Any]:
        """The hit as JSON has it (json.dumps takes it as it is): its fields, `meta`'s values as
        metadata.json_value gives them (NaN as null, a date as its text)."""
        out = {f: getattr(self, f) for f in ("rank", "row", "line", "file", "source", "source_row", "person",
                                             "distance")}
        fused = {"score": self.score} if self.score is not None else {}
        return {**out, "distance": float(self.distance), **fused,
                "meta": {k: json_value(v) for k, v in self.meta.items()}}


@dataclass(frozen=True)
class QueryCrop:
    """A picture to search with: its label (the file name, `name#p0` for a person) and pixels."""

    label: str
    image: Image.Image


# --dedup / --group-by search exactly in one grouped pass when over a tenth of the items are in groups larger
# than 4 (k + 1) photos: the deeper asks would fetch that far for each of them
GROUPED_EXACT_FROM, GROUPED_EXACT_SHARE = 4, 0.1


class Searcher:
    """A store's vectors and the lines that own them, searched exactly or through an index.

    embeddings: float32 (N, D), L2-normalized; rows: the manifest lines of those vectors, in
    embedding-row order (rows[j] owns embeddings[j]). index: a FAISS index over the same vectors
    (None: exact search). device: "cuda" runs the all-pairs pass of a gallery run on the GPU (the
    same results); a few query vectors are searched on the CPU, which costs less than copying the
    gallery to the GPU for them. Safe to search from several threads.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        rows: Sequence[ManifestRow],
        index: GalleryIndex | None = None,
        device: str | None = None,
    ) -> None:
        if len(rows) != len(embeddings):
            raise ValueError(f"{len(rows)} manifest lines for {len(embeddings)} vectors")
        self.embeddings, self.rows, self.index, self.device = embeddings, list(rows), index, device
        self._gpu_lock = threading.Lock()  # a FAISS index on the GPU takes one search at a time
        self.group_of: np.ndarray | None = None  # --dedup: each row's duplicate group (see dedup)
        self.hidden = 0
        self._layout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # _group_layout's
        self.metadata: Metadata | None = None  # each hit's values, and what filters read
        self._subsets: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # filtered rows' vectors, by filter
        self._subsets_lock = threading.Lock()
        self._copies: np.ndarray | None = None  # --dedup: each row's duplicate group's first row
        self._product: np.ndarray | None = None  # --group-by: each row's value of the column, as a number
        self.grouped_by: str | None = None  # the --group-by column
        self._views: dict[str | None, Searcher] = {}  # grouped(): this searcher by other columns

    def allowed(self, filter_text: str | None) -> np.ndarray | None:
        """bool (N,): the rows a metadata filter keeps (None: no filter). FilterError (exit 2) for a
        filter that cannot be used, or a store without metadata."""
        if not filter_text or isinstance(filter_text, str) and not filter_text.strip():
            return None  # "" and "  " alike: every item (a script's --filter "$F" with $F empty or blank)
        if not isinstance(filter_text, str):
            raise UsageError(f"a filter is a text (\"category = 'dress' AND price < 50\"), not a "
                             f"{type(filter_text).__name__}")
        if self.metadata is None:
            raise FilterError(
                "--filter: this store keeps no metadata (a folder of pictures without subfolders or a "
                "metadata.csv has none, and stores built before metadata was kept have none either: build it "
                "again, or --update it)"
            )
        return self.metadata.mask(filter_text)

    def dedup(self, groups: Sequence[DuplicateGroup] | None) -> None:
        """--dedup: from now on every answer shows one photo per duplicate group (the best-ranked,
        with its own distance), and a photo's own copies are not its neighbours. None: all again."""
        self._copies = representatives(groups, len(self.embeddings)) if groups else None
        self._views = {}
        self._regroup()

    def dedup_groups(self) -> tuple[int, int]:
        """(duplicate groups, photos in them) that --dedup folds, each group to one photo; (0, 0) without it."""
        if self._copies is None:
            return 0, 0
        grouped = self._copies != np.arange(len(self._copies))  # the members after each group's first
        firsts = np.unique(self._copies[grouped])
        return len(firsts), int(grouped.sum()) + len(firsts)

    def group_by(self, column: str | None) -> int:
        """--group-by: from now on every answer shows one item per value of a metadata column (one
        result per product, scored by its best photo, filled until k products), and an item's
        neighbours are never other photos of its product. Items without a value stand alone.
        Returns how many items had no value. UsageError for a column the store does not keep."""
        if column is None:
            self._product, self.grouped_by = None, None
            self._regroup()
            return 0
        if self.metadata is None or column not in self.metadata.columns:
            raise unknown_group_column(column, self.metadata.columns if self.metadata is not None else None,
                                       "the store")
        self._product, missing = product_labels(self.metadata.table.column(column))
        self.grouped_by = column
        self._views = {}
        self._regroup()
        return missing

    def grouped(self, column: str | None) -> Searcher:
        """This searcher with another --group-by column (None: each photo), as a copy that shares
        the vectors, index and metadata (a request's own grouping, leaving this one as it is).
        Copies are kept per column. UsageError for a column the store does not keep."""
        if column == self.grouped_by:
            return self
        with self._subsets_lock:
            found = self._views.get(column)
        if found is None:
            found = copy.copy(self)
            found._views = {}  # a view of a view is asked of the original
            found.group_by(column)
            with self._subsets_lock:
                found = self._views.setdefault(column, found)
        return found

    def _regroup(self) -> None:
        """group_of from the duplicate groups and the --group-by column: items joined by either are one."""
        copies, product = self._copies, self._product
        if copies is None and product is None:
            self.group_of, self.hidden, self._layout = None, 0, None
            return
        n = len(self.embeddings)
        if product is None or copies is None:
            labels = copies if product is None else product
        else:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            first = np.full(int(product.max()) + 1, n, np.int64)
            np.minimum.at(first, product, np.arange(n))
            rows = np.concatenate([np.arange(n), np.arange(n)])
            cols = np.concatenate([copies, first[product]])
            graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
            labels = connected_components(graph, directed=False)[1]
        assert labels is not None
        self.group_of = np.asarray(labels, np.int64)
        self.hidden = n - len(np.unique(self.group_of))
        self._layout = None

    def _deduped(self, ask: Callable[[int, np.ndarray], Neighbours], k: int, n_queries: int,
                 own: np.ndarray | None, first: Neighbours | None = None, exact: np.ndarray | None = None,
                 allowed: np.ndarray | None = None) -> Neighbours:
        """One photo per group (--dedup, --group-by): ask(K, which) answers the queries `which` with
        K raw results; the rows that k distinct groups do not fill are asked again with 4x K, only
        they, until they fill, their raw answer runs out (a -1: nothing more to find), or K reaches
        k + the hidden photos + 1 (every group then has a photo in reach). first: a raw answer at K
        = its width that is already there (the gallery run's first pass). exact: the queries' vectors,
        for the grouped exact search that large groups take instead (the deeper asks would grow with
        the largest group: N x its size for every item's neighbours); allowed: the filter asked."""
        assert self.group_of is not None
        if exact is not None and not self.approximate and self._in_large_groups(k) > GROUPED_EXACT_SHARE:
            return self._grouped_exact(exact, k, allowed, own)
        cap = min(len(self.embeddings), k + self.hidden + 1)
        idx = np.full((n_queries, k), -1, np.int64)
        dist = np.full((n_queries, k), np.inf, np.float32)
        todo = np.arange(n_queries) if cap > 0 else np.arange(0)  # an empty gallery: nothing to find
        fetch = first.indices.shape[1] if first is not None else min(cap, k + min(self.hidden, 4 * k) + 1)
        while len(todo):
            nb = first if first is not None else ask(fetch, todo)
            first = None
            got_i, got_d = keep_one_per_group(nb.indices, nb.distances, self.group_of, k,
                                              None if own is None else own[todo])
            idx[todo], dist[todo] = got_i, got_d
            spent = (nb.indices < 0).any(axis=1) | (nb.indices.shape[1] < fetch) | (fetch >= cap)
            todo = todo[~(spent | (got_i[:, -1] >= 0))]
            fetch = min(cap, fetch * 4)
        return Neighbours(idx, dist)

    def _in_large_groups(self, k: int) -> float:
        """The share of the items in groups of more than GROUPED_EXACT_FROM (k + 1) photos: those the
        deeper asks fetch far for (a placeholder photo's copies, a category's items)."""
        if self.group_of is None or not len(self.group_of):
            return 0.0
        sizes = np.diff(self._group_layout()[1])
        return float(sizes[sizes > GROUPED_EXACT_FROM * (k + 1)].sum()) / len(self.group_of)

    def _group_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """retrieval.group_layout of the groups, kept until they change."""
        if self._layout is None:
            assert self.group_of is not None
            self._layout = group_layout(self.group_of)
        return self._layout

    def _grouped_exact(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                       own: np.ndarray | None) -> Neighbours:
        """One photo per group by exact search, in one pass whatever the groups' sizes: each
        query's similarities to every item, each group's best (np.maximum.reduceat over the items
        laid out by group), the top-k groups; a group's photo is its best item, ties by row, and
        groups tie by that row, as keep_one_per_group over an exact list orders them. own: a row
        per query whose group is left out (-1: none)."""
        order, bounds, number = self._group_layout()
        starts = bounds[:-1]
        idx = np.full((len(queries), k), -1, np.int64)
        dist = np.full((len(queries), k), np.inf, np.float32)
        if k <= 0 or not len(order):
            return Neighbours(idx, dist)
        hidden = None if allowed is None else ~np.asarray(allowed, bool)[order]
        laid = np.ascontiguousarray(self.embeddings[order])  # by group, for this call only (not kept)
        block = max(1, min(1024, (1 << 25) // max(1, len(order))))  # about 128 MB of similarities a block
        for s in range(0, len(queries), block):
            sims = np.ascontiguousarray(queries[s : s + block], np.float32) @ laid.T
            if hidden is not None:
                sims[:, hidden] = -np.inf
            best = np.maximum.reduceat(sims, starts, axis=1)
            for b in range(len(sims)):
                scores = best[b]
                if own is not None and own[s + b] >= 0:
                    scores[number[own[s + b]]] = -np.inf
                found = np.flatnonzero(scores > -np.inf)
                if not len(found):
                    continue
                m = min(k, len(found))
                kth = np.partition(scores[found], len(found) - m)[len(found) - m]
                cand = found[scores[found] >= kth]  # the top m, and everything tied with the m-th
                reps = np.array([order[bounds[g] + int(np.argmax(sims[b, bounds[g] : bounds[g + 1]]))] for g in cand])
                pick = np.lexsort((reps, -scores[cand]))[:m]
                idx[s + b, :m] = reps[pick]
                dist[s + b, :m] = np.float32(1.0) - scores[cand][pick]
        return Neighbours(idx, dist)

    @classmethod
    def open(
        cls,
        store_dir: Path,
        embeddings: np.ndarray,
        rows: Sequence[ManifestRow],
        store_sha256: str,
        index: str = "auto",
        threads: int = 0,
        gpu: bool = False,
        build: bool = False,
    ) -> Searcher:
        """The searcher of a store and its index.

        index: "none" searches exactly. Otherwise, with build, the index of that kind ("auto": chosen
            by size) is made first when it is missing, stale or of another kind (index.ensure_index);
            without build, the index file beside the store is used as it is, when there is one (a
            stale one is refused: index.load_index), whatever kind it is.
        """
        found = None
        if index != "none" and len(embeddings) >= 2:
            if build:
                found = ensure_index(store_dir, embeddings, store_sha256, index, threads, gpu=gpu)
            else:
                found = load_index(store_dir, embeddings, store_sha256, threads, gpu=gpu)
        return cls(embeddings, rows, found, device="cuda" if gpu else None)

    def filtered_how(self, matching: int) -> str:
        """How a filter keeping `matching` rows is searched (as _filtered plans it), for the summary."""
        if not self.approximate or matching <= FILTER_EXACT_MAX or (self.index is not None and self.index.on_gpu):
            return "searched exactly among them"
        return "searched through the index with the filter inside it (rows it leaves short exactly)"

    @property
    def approximate(self) -> bool:
        return self.index is not None and not self.index.info.exact

    def describe(self) -> str:
        return self.index.describe() if self.index is not None else "exact"

    def neighbours(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Neighbours:
        """Top-k for each query vector (float32 (Q, D), L2-normalized), as arrays.

        allowed: bool (N,), the rows a metadata filter keeps: searched as _filtered plans it (exactly
        among them up to FILTER_EXACT_MAX), so k come back whenever k match.
        """
        if self.group_of is not None:
            return _at_least_zero(self._deduped(lambda m, w: self._neighbours(queries[w], m, allowed), k,
                                                len(queries), None, exact=queries, allowed=allowed))
        return _at_least_zero(self._neighbours(queries, k, allowed))

    def _neighbours(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Neighbours:
        if allowed is not None:
            return self._filtered(queries, k, allowed)
        if self.index is None:
            return topk_neighbours(queries, self.embeddings, k)
        if not self.index.on_gpu:
            nb = self.index.search(queries, k)
        else:
            with self._gpu_lock:
                nb = self.index.search(queries, k)
        return self._filled(nb, queries, k)

    def _filled(self, nb: Neighbours, queries: np.ndarray, k: int, own: np.ndarray | None = None) -> Neighbours:
        """An approximate answer's rows that came back short (an IVF probe that found fewer than k,
        a -1 where the catalogue has more) are searched exactly, so a -1 always means "nothing
        more to find". own: each query's own row, when it must not be its own neighbour."""
        want = min(k, len(self.embeddings) - (own is not None))
        short = np.nonzero((nb.indices >= 0).sum(axis=1) < want)[0]
        if not len(short) or not self.approximate:
            return nb
        if own is None:
            redo = topk_neighbours(queries[short], self.embeddings, k)
        else:
            redo = topk_neighbours(queries[short], self.embeddings, k + 1)
            keep = redo.indices != own[short][:, None]
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # its own row dropped, the order kept
            redo = Neighbours(np.take_along_axis(redo.indices, order, 1), np.take_along_axis(redo.distances, order, 1))
        nb.indices[short], nb.distances[short] = redo.indices, redo.distances
        return nb

    def all_neighbours(self, k: int, matrix_path: Path | None = None, first: Neighbours | None = None,
                       allowed: np.ndarray | None = None) -> Neighbours:
        """Every item's top-k other items. matrix_path: also write the N x N distance matrix
        (exact search only: an approximate index never computes it; not with allowed). first: with
        --dedup or --group-by, the plain answer already computed (only the rows it leaves short are
        asked again). allowed: bool (N,), a --filter's rows: every item's neighbours among them."""
        n = len(self.embeddings)
        if allowed is not None:
            return _at_least_zero(self.item_neighbours(np.arange(n), k, allowed, first))
        if self.group_of is not None:

            def ask(m: int, which: np.ndarray) -> Neighbours:
                if len(which) == n:
                    return self._all_neighbours(m, matrix_path)
                return self._item_rows(which, m, None)

            return _at_least_zero(self._deduped(ask, k, n, np.arange(n), first, exact=self.embeddings))
        return _at_least_zero(self._all_neighbours(k, matrix_path))

    def carried_neighbours(self, old: Neighbours, take: np.ndarray, k: int) -> tuple[Neighbours, int] | None:
        """Every item's top-k from the lists of the store before (plain lists, by its rows): `take`
        are the old rows this store kept, in its order, and the items after them are new (the
        update's order rule). A kept item whose list lost an item (or was short), and every new
        item, are asked again; every other kept item keeps its list, merged with its nearest new
        items by their distances. Exact search gives the lists a full pass gives (the old lists
        were exact among the items kept, and a new item enters a list only by its distance; ties
        by index, which the kept items' order preserves). None when this would not cost under
        half a full pass, or with --dedup / --group-by (whose lists are made from the plain ones).
        Returns the lists and how many items were asked again."""
        n, kept = len(self.embeddings), len(take)
        if self.group_of is not None or old.indices.shape[1] != k or kept > n:
            return None
        if kept and (take.min() < 0 or take.max() >= len(old.indices) or np.any(np.diff(take) <= 0)):
            return None
        remap = np.full(len(old.indices) + 1, -1, np.int64)  # the extra last entry maps -1 (no item) to -1
        remap[take] = np.arange(kept)
        idx, dist = remap[old.indices[take]], old.distances[take]
        redo = np.flatnonzero((idx < 0).any(axis=1))
        per_query = n if not self.approximate else min(n, 5000)  # an index query ~ a few thousand distances
        cost = (kept - len(redo)) * (n - kept) + (len(redo) + n - kept) * per_query
        if 2 * cost > n * per_query:
            return None
        out_idx, out_dist = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
        ask = np.concatenate([redo, np.arange(kept, n)])
        if len(ask):
            again = self.item_neighbours(ask, k)
            out_idx[ask], out_dist[ask] = again.indices, again.distances
        rest = np.setdiff1d(np.arange(kept), redo)
        out_idx[rest], out_dist[rest] = idx[rest], dist[rest]
        if kept < n and len(rest):
            new = self.embeddings[kept:]
            last = np.iinfo(np.int64).max
            for s in range(0, len(rest), 1024):
                r = rest[s : s + 1024]
                near, near_dist = topk_rows(cosine_distances(self.embeddings[r], new), k)
                cand = np.concatenate([idx[r], np.where(near >= 0, near + kept, -1)], axis=1)
                cand_dist = np.concatenate([dist[r], near_dist], axis=1)
                order = np.lexsort((np.where(cand >= 0, cand, last), cand_dist))[:, :k]  # by distance, then index
                out_idx[r] = np.take_along_axis(cand, order, axis=1)
                out_dist[r] = np.take_along_axis(cand_dist, order, axis=1)
        return Neighbours(out_idx, out_dist), len(ask)

    def _filtered(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> Neighbours:
        """The planner of a filtered search, on exact counts: up to FILTER_EXACT_MAX matching rows
        (or without an approximate index) they are searched exactly, their vectors gathered once per
        filter; more go through the index with the filter inside it (a FAISS ID selector); a row the
        index leaves short of min(k, matches) is searched exactly."""
        allowed = np.asarray(allowed, bool)
        m = int(allowed.sum())
        if not self.approximate or m <= FILTER_EXACT_MAX or (self.index is not None and self.index.on_gpu):
            return self._exact_among(queries, k, allowed)
        assert self.index is not None
        nb = self.index.search(queries, k, allowed=allowed)
        short = np.nonzero((nb.indices >= 0).sum(axis=1) < min(k, m))[0]
        if len(short):
            redo = self._exact_among(queries[short], k, allowed)
            nb.indices[short], nb.distances[short] = redo.indices, redo.distances
        return nb

    def _exact_among(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> Neighbours:
        if not allowed.any() or allowed.sum() * 4 >= len(allowed):
            return masked_topk(queries, self.embeddings, allowed, k)
        key = hashlib.sha1(np.packbits(allowed).tobytes()).hexdigest()
        with self._subsets_lock:
            found = self._subsets.get(key)
            if found is None:
                ids = np.flatnonzero(allowed)
                found = (ids, np.ascontiguousarray(self.embeddings[ids]))
                self._subsets[key] = found
                while len(self._subsets) > 4:  # the last few filters' vectors, for the queries that follow
                    self._subsets.pop(next(iter(self._subsets)))
        ids, sub = found
        nb = masked_topk(queries, sub, np.ones(len(ids), bool), k)
        return Neighbours(np.where(nb.indices >= 0, ids[np.maximum(nb.indices, 0)], -1), nb.distances)

    def item_neighbours(self, rows: np.ndarray, k: int, allowed: np.ndarray | None = None,
                        first: Neighbours | None = None) -> Neighbours:
        """Top-k other items of some of the store's own items (embedding rows): never the item
        itself, and with --dedup / --group-by never one of its group. allowed: as in `neighbours`.
        first: with --dedup / --group-by, their plain answer already computed (with `allowed`)."""
        rows = np.asarray(rows, np.int64)
        if self.group_of is not None:
            return self._deduped(lambda m, w: self._item_rows(rows[w], m, allowed), k, len(rows), rows, first,
                                 exact=self.embeddings[rows], allowed=allowed)
        return self._item_rows(rows, k, allowed)

    def _item_rows(self, rows: np.ndarray, m: int, allowed: np.ndarray | None) -> Neighbours:
        """The raw top-m of items `rows`, each without itself."""
        nb = self._neighbours(self.embeddings[rows], m + 1, allowed)
        idx = np.full((len(rows), m), -1, np.int64)
        dist = np.full((len(rows), m), np.inf, np.float32)
        for q in range(len(rows)):
            keep = np.nonzero(nb.indices[q] != rows[q])[0][:m]
            idx[q, : len(keep)], dist[q, : len(keep)] = nb.indices[q, keep], nb.distances[q, keep]
        return Neighbours(idx, dist)

    def _all_neighbours(self, k: int, matrix_path: Path | None) -> Neighbours:
        if self.approximate:
            assert self.index is not None
            n = len(self.embeddings)
            return self._filled(self.index.all_neighbours(k), self.embeddings, k, own=np.arange(n))
        e = self.embeddings
        return topk_neighbours(e, e, k, exclude_self=True, matrix_path=matrix_path, device=self.device)

    def fused(self, lists: np.ndarray, k: int, allowed: np.ndarray | None = None, depth: int = 100,
              c: int = RRF_C) -> Neighbours:
        """Reciprocal-rank fusion (Cormack et al., 2009): one ranking from several query vectors'
        result lists (float32 (L, D)), each item scored sum(1 / (c + rank)) over the lists it is in
        within `depth`; returned with its smallest distance to any of the queries. Ties: lower row.
        With --dedup / --group-by a group is scored over the lists whichever of its photos each
        list shows, and is shown by its photo nearest to a query."""
        depth = max(depth, k)
        nb = self.neighbours(lists, depth, allowed)
        # with --dedup / --group-by each list holds one photo per group, not always the same photo:
        # a group's score sums over the lists, shown by its photo nearest to any of the queries
        group = self.group_of
        score: dict[int, float] = {}
        near: dict[int, tuple[float, int]] = {}
        for q in range(len(lists)):
            for r, (j, d) in enumerate(zip(nb.indices[q].tolist(), nb.distances[q].tolist())):
                if j >= 0:
                    key = int(group[j]) if group is not None else j
                    score[key] = score.get(key, 0.0) + 1.0 / (c + r + 1)
                    near[key] = min(near.get(key, (np.inf, j)), (d, j))
        order = sorted(score, key=lambda g: (-score[g], near[g][1]))[:k]
        idx = np.full((1, k), -1, np.int64)
        dist = np.full((1, k), np.inf, np.float32)
        idx[0, : len(order)] = [near[g][1] for g in order]
        dist[0, : len(order)] = [near[g][0] for g in order]
        fused = np.zeros((1, k), np.float64)
        fused[0, : len(order)] = [score[g] for g in order]
        return Neighbours(idx, dist, fused)

    def hits(self, nb: Neighbours, q: int) -> list[Hit]:
        """Query q's hits in a Neighbours result (the empty slots of a small gallery left out)."""
        out = []
        for r, (j, d) in enumerate(zip(nb.indices[q], nb.distances[q])):
            if j < 0:
                continue
            line = self.rows[int(j)]
            meta = self.metadata.values(int(j)) if self.metadata is not None else {}
            score = float(nb.scores[q, r]) if nb.scores is not None else None
            out.append(Hit(r + 1, int(j), line.index, line.file, line.source_row, line.person, float(d), meta,
                           line.source, score))
        return out

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k hits for each query vector (allowed: as in `neighbours`)."""
        nb = self.neighbours(queries, k, allowed)
        return [self.hits(nb, q) for q in range(len(queries))]


def unknown_group_column(column: str, kept: Sequence[str] | None, holder: str) -> UsageError:
    """The refusal of a --group-by column that `holder` ("the store", "this dataset") does not keep;
    kept: the columns it keeps (None: it keeps no metadata)."""
    shown = ", ".join(kept) if kept else f"none ({holder} keeps no metadata)"
    return UsageError(f"--group-by: unknown column {column!r}; the catalogue's columns are: {shown}")


def combine(picture: np.ndarray, texts: np.ndarray, negative: np.ndarray | None = None,
            text_weight: float = 0.5) -> np.ndarray:
    """A picture-plus-text query (Marqo's and clip-retrieval's weighted form): the picture's vector
    plus text_weight times each text's, minus text_weight times each negative text's, normalized.
    All inputs L2-normalized float32: (D,), (T, D), (U, D). Returns float32 (D,)."""
    if not (np.isfinite(text_weight) and text_weight >= 0):
        raise UsageError(f"the text weight must be a finite number >= 0 (a text to subtract is a negative text), "
                         f"got {text_weight}")
    v = np.asarray(picture, np.float64) + text_weight * np.asarray(texts, np.float64).sum(axis=0)
    if negative is not None and len(negative):
        v = v - text_weight * np.asarray(negative, np.float64).sum(axis=0)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise UsageError("the picture and texts cancel out: lower --text-weight or drop a negative text")
    return (v / norm).astype(np.float32)


def query_crops(image: Image.Image, label: str, segmenter: Segmenter | None) -> tuple[list[QueryCrop], bool]:
    """A query picture as the pictures to search with, and whether a person was found.

    Without a segmenter: the whole picture. With one: each person in it (labelled `label#pK`), or the
    whole picture when nobody is found.
    """
    if segmenter is None:
        return [QueryCrop(label, image)], False
    arr = np.asarray(image)
    crops = person_crops(arr, segmenter.segment([arr])[0])
    found = [QueryCrop(f"{label}#p{k}", Image.fromarray(c)) for k, c in crops.items()]
    return (found, True) if found else ([QueryCrop(label, image)], False)


def _at_least_zero(nb: Neighbours) -> Neighbours:
    """Distances of an answer clamped at 0, in place: 1 - q·g of two equal unit vectors comes out a few
    ulps under 0 in float32, which a table printed as -0.000000 and a console as -0.000."""
    if not (nb.distances < 0).any():
        return nb
    if not nb.distances.flags.writeable:
        return Neighbours(nb.indices, np.maximum(nb.distances, np.float32(0.0)))
    np.maximum(nb.distances, np.float32(0.0), out=nb.distances)
    return nb

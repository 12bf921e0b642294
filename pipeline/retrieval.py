"""Retrieval: L2-normalized float32 embeddings in; cosine distances, top-k neighbours and the full
distance matrix (blockwise, through a memory map) out. Plain numpy: no torch needed.

Exact search by blocked matrix products is used rather than FAISS because the result must be exact
and deterministic (ties broken by index), and at the gallery sizes this tool targets (10^4-10^5)
a float32 GEMM over blocks is as fast as a flat FAISS index.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import AtomicNpyMemmap, atomic_write_text

DEFAULT_BLOCK = 1024


@dataclass(frozen=True)
class Neighbours:
    """Top-k result: indices int64 (Q, k) into the gallery, distances float32 (Q, k), ascending.

    Where the gallery has fewer than k candidates, the remaining slots hold index -1, distance inf.
    scores: a reciprocal-rank fusion's fused scores (Q, k), descending, which rank it (its distances
    then need not ascend); None otherwise.
    """

    indices: np.ndarray
    distances: np.ndarray
    scores: np.ndarray | None = None


def _check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (N, D), but got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def group_layout(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items laid out by group, for np.maximum.reduceat over each group: (the items in group order,
    stable: by index within a group; each group's first position in that order, with N at the end;
    each item's group number 0 .. G-1)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    new = np.r_[True, labels[order][1:] != labels[order][:-1]] if len(order) else np.zeros(0, bool)
    number = np.empty(len(order), np.int64)
    number[order] = np.cumsum(new) - 1
    return order, np.r_[np.flatnonzero(new), len(order)], number


def cosine_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - q·g for normalized vectors: float32 (Q, N)."""
    q, g = _check_embeddings(queries, "queries"), _check_embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}")
    d = q @ g.T
    np.subtract(np.float32(1.0), d, out=d)
    return d


SAMPLE_STRIDE = 4  # topk_rows: each row's bound from every 4th column


def topk_rows(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-row top-k of a distance block, ascending, ties broken by the smaller index.

    Each row's bound is the k-th smallest value of every SAMPLE_STRIDE-th column (a value
    partition, np.partition: 2.5x faster than argpartition); it is at least the row's true k-th
    smallest, so every entry at or below it is a candidate that holds the whole top-k (with the ties
    at the boundary, settled by index), and all rows' candidates are ordered by one lexsort.
    Exact whatever the data; 0.045 s per 1,000 x 10,000 block against 0.113 s for argpartition
    and a sort per row.
    """
    q, n = dist.shape
    kk = min(k, n)
    idx_out = np.full((q, k), -1, dtype=np.int64)
    dist_out = np.full((q, k), np.inf, dtype=np.float32)
    if kk == 0 or q == 0:
        return idx_out, dist_out
    if kk < n:
        sample = dist[:, ::SAMPLE_STRIDE] if n >= 64 * kk else dist  # a bound from few columns: ~4k candidates
        candidate = dist <= np.partition(sample, kk - 1, axis=1)[:, kk - 1][:, None]
    else:
        candidate = np.isfinite(dist)
    # A row whose bound lets through many entries (ties: copies of one photo, or excluded items) is
    # settled on its own, so that the candidates of a block never grow to q x n.
    heavy = np.flatnonzero(candidate.sum(axis=1) > 64 * kk + 256)
    for r in heavy:
        sel = _row_topk(dist[r], kk)
        idx_out[r, : len(sel)], dist_out[r, : len(sel)] = sel, dist[r, sel]
    candidate[heavy] = False
    rows, cols = np.nonzero(candidate)
    values = dist[rows, cols]
    order = np.lexsort((cols, values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # place within its row (rows are sorted)
    keep = rank < kk
    idx_out[rows[keep], rank[keep]] = cols[keep]
    dist_out[rows[keep], rank[keep]] = values[keep]
    return idx_out, dist_out


def _row_topk(row: np.ndarray, kk: int) -> np.ndarray:
    """One row's kk smallest entries (kk < len(row)), ascending, ties by index: those below the
    kk-th value, then the first of those equal to it."""
    kth = np.partition(row, kk - 1)[kk - 1]
    below = np.flatnonzero(row < kth)
    cand = np.concatenate([below, np.flatnonzero(row == kth)[: kk - len(below)]])
    return cand[np.lexsort((cand, row[cand]))]


def topk_neighbours(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    exclude_self: bool = False,
    block: int = DEFAULT_BLOCK,
    matrix_path: str | Path | None = None,
    device: str | None = None,
) -> Neighbours:
    """Top-k nearest gallery rows for each query, computed block by block (never Q x N at once).

    Args:
        queries: float32 (Q, D), L2-normalized.
        gallery: float32 (N, D), L2-normalized.
        k: neighbours per query.
        exclude_self: the queries are the gallery (same rows); row i never returns i.
        block: queries per block; memory is block x N float32.
        matrix_path: with exclude_self, also write the N x N float32 distance matrix (diagonal 0)
            to this .npy file, atomically, from the same blocks (the distances are computed once).
        device: a torch device ("cuda", "cpu") to compute the distances and the top-k on; None:
            numpy. Same results either way: ties are broken by index on both.
    """
    q, g = _check_embeddings(queries, "queries"), _check_embeddings(gallery, "gallery")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError("exclude_self needs queries and gallery to be the same rows")
    if matrix_path is not None and not exclude_self:
        raise ValueError("matrix_path writes the gallery's own N x N matrix: it needs exclude_self")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    blocks = _TorchBlocks(g, device) if device is not None else None
    with (
        AtomicNpyMemmap(matrix_path, (q.shape[0],) * 2, np.float32)
        if matrix_path is not None
        else nullcontext() as matrix
    ):
        for start in range(0, q.shape[0], block):
            stop = min(start + block, q.shape[0])
            if blocks is not None and matrix is None:
                idx[start:stop], dist[start:stop] = blocks.topk(q[start:stop], start, k, exclude_self)
                continue
            d = cosine_distances(q[start:stop], g) if blocks is None else blocks.distances(q[start:stop])
            diagonal = (np.arange(stop - start), np.arange(start, stop))
            if matrix is not None:
                d[diagonal] = 0.0
                matrix.write_rows(start, d)
            if exclude_self:
                d[diagonal] = np.inf
            i, dd = topk_rows(d, k)
            idx[start:stop], dist[start:stop] = i, dd
    return Neighbours(idx, dist)


def carried_matrix(old: np.ndarray, take: np.ndarray, embeddings: np.ndarray, path: str | Path,
                   block: int = DEFAULT_BLOCK) -> None:
    """The N x N distance matrix of a store made from an earlier store's (`old`, its matrix, read
    through a map): `take` are the old rows kept, strictly increasing, as this store's first rows;
    the rows after them are new. Kept pairs are copied, pairs with a new item computed; written to
    `path` atomically as topk_neighbours writes it (diagonal 0). The copied distances are those the
    earlier run computed, equal to a full pass's up to float32 rounding (the blocks differ)."""
    e = _check_embeddings(embeddings, "embeddings")
    n, kept = len(e), len(take)
    if old.ndim != 2 or old.shape[0] != old.shape[1] or kept > n or (kept and take.max() >= old.shape[0]):
        raise ValueError(f"a {old.shape} matrix cannot give {kept} kept rows of a {n}-item store")
    if kept and (take[0] < 0 or np.any(np.diff(take) <= 0)):
        raise ValueError("the kept rows must be strictly increasing old rows")
    prefix = kept == 0 or int(take[-1]) == kept - 1  # strictly increasing from 0: the first rows, as they were
    with AtomicNpyMemmap(path, (n, n), np.float32) as matrix:
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = np.empty((stop - start, n), np.float32)
            hi = min(stop, kept)
            if start < hi:
                if prefix:
                    rows[: hi - start, :kept] = old[start:hi, :kept]
                else:  # np.take into the block, faster than [:, take] (the indices were validated
                    # above: "clip" never clips, and spares a buffered copy)
                    np.take(old[take[start:hi]], take, axis=1, out=rows[: hi - start, :kept], mode="clip")
                rows[: hi - start, kept:] = cosine_distances(e[start:hi], e[kept:])
            if stop > kept:
                first = max(start, kept)
                rows[first - start :] = cosine_distances(e[first:stop], e)
            rows[np.arange(stop - start), np.arange(start, stop)] = 0.0
            matrix.write_rows(start, rows)


class _TorchBlocks:
    """The gallery on a torch device, for distances and top-k computed there block by block.

    The top-k takes a few more candidates than k on the device and settles ties by index on the
    host, exactly as topk_rows does; a row whose ties run past the candidates is settled from its
    whole distance row.
    """

    EXTRA = 16

    def __init__(self, gallery: np.ndarray, device: str) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.g = torch.from_numpy(gallery).to(self.device)

    def _block(self, q: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            d = torch.from_numpy(q).to(self.device) @ self.g.T
            return torch.sub(1.0, d, out=d)

    def distances(self, q: np.ndarray) -> np.ndarray:
        return self._block(q).cpu().numpy()

    def topk(self, q: np.ndarray, start: int, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        n = self.g.shape[0]
        with torch.inference_mode():
            d = self._block(q)
            if exclude_self:
                rows = torch.arange(d.shape[0], device=self.device)
                d[rows, rows + start] = float("inf")
            m = min(n, k + self.EXTRA)
            vals, cand = torch.topk(d, m, dim=1, largest=False, sorted=True) if m else (d[:, :0], d[:, :0].long())
            vals, cand = vals.cpu().numpy(), cand.cpu().numpy()
        idx = np.full((len(q), k), -1, dtype=np.int64)
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        kk = min(k, n)
        for r in range(len(q)):
            finite = np.isfinite(vals[r])
            if kk and m < n and finite[kk - 1] and vals[r, -1] <= vals[r, kk - 1]:
                # ties at the k-th value may continue past the candidates: settle from the whole row
                i, dd = topk_rows(d[r : r + 1].cpu().numpy(), k)
                idx[r], dist[r] = i[0], dd[0]
                continue
            v, c = vals[r][finite], cand[r][finite]
            order = np.lexsort((c, v))[:kk]
            idx[r, : len(order)], dist[r, : len(order)] = c[order], v[order]
        return idx, dist


def iter_neighbour_rows(
    nb: Neighbours,
    query_ids: Sequence[int],
    query_files: Sequence[str],
    gallery_ids: Sequence[int],
    gallery_files: Sequence[str],
    query_sources: Sequence[str],
    gallery_sources: Sequence[str],
) -> Iterator[tuple]:
    """Flatten a Neighbours result into rows of NEIGHBOUR_COLUMNS: (query, query_file, rank,
    neighbour, neighbour_file, distance, query_source, neighbour_source)."""
    for qi in range(nb.indices.shape[0]):
        for rank in range(nb.indices.shape[1]):
            j = int(nb.indices[qi, rank])
            if j < 0:
                continue
            yield (query_ids[qi], query_files[qi], rank + 1, gallery_ids[j], gallery_files[j],
                   float(nb.distances[qi, rank]), query_sources[qi], gallery_sources[j])


# query_source and neighbour_source: what the user knows each photo by (manifest.csv's `source`: a
# path in the dataset folder, or `<dataset>[row]`), beside the gallery's file names
NEIGHBOUR_COLUMNS = ("query", "query_file", "rank", "neighbour", "neighbour_file", "distance", "query_source",
                     "neighbour_source")


def write_neighbours_csv(path: str | Path, rows: Iterator[tuple], columns: Sequence[str] = NEIGHBOUR_COLUMNS) -> int:
    """Write the neighbour table atomically; returns the number of lines written. The distance is
    written to 6 decimals; another float (a metadata value) as it is (1e-07, not 0.000000), a NaN
    as the missing value it is (empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    distance = list(columns).index("distance") if "distance" in columns else -1
    n = 0
    for row in rows:
        w.writerow([_csv_value(v, k == distance) for k, v in enumerate(row)])
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def _csv_value(value: Any, distance: bool) -> Any:
    if not isinstance(value, float):
        return value
    if distance:
        return f"{value:.6f}"
    return "" if math.isnan(value) else repr(value)


def _lowest_on_the_edge(sims: np.ndarray, part: np.ndarray, top: np.ndarray) -> None:
    """In place: where the k-th best score is tied beyond the k kept, argpartition keeps any of the
    tied columns; keep the lowest-numbered ones instead, so a result never depends on the partition."""
    edge = top.min(axis=1)
    short = np.nonzero((sims == edge[:, None]).sum(axis=1) > (top == edge[:, None]).sum(axis=1))[0]
    for r in short:
        above = part[r][top[r] > edge[r]]
        tied = np.flatnonzero(sims[r] == edge[r])[: part.shape[1] - len(above)]
        part[r] = np.concatenate([above, tied])
        top[r] = sims[r][part[r]]


def masked_topk(queries: np.ndarray, gallery: np.ndarray, allowed: np.ndarray, k: int, block: int = 64) -> Neighbours:
    """Exact top-k among the allowed gallery rows only (a metadata filter, inside the search): k
    results whenever k rows are allowed, all of them when fewer; ties broken by index.

    Few allowed rows (under a quarter) are gathered and searched; otherwise every row is scored and
    the others are masked out, which costs one full exact search.
    """
    q, g = _check_embeddings(queries, "queries"), _check_embeddings(gallery, "gallery")
    allowed = np.asarray(allowed, bool)
    if allowed.shape != (g.shape[0],):
        raise ValueError(f"allowed must be bool ({g.shape[0]},), got {allowed.shape}")
    ids = np.flatnonzero(allowed)
    m = min(k, len(ids))
    idx = np.full((q.shape[0], k), -1, np.int64)
    dist = np.full((q.shape[0], k), np.inf, np.float32)
    if m == 0 or q.shape[0] == 0:
        return Neighbours(idx, dist)
    gathered = len(ids) * 4 < g.shape[0]
    sub = g[ids] if gathered else g
    for start in range(0, q.shape[0], block):
        sims = q[start : start + block] @ sub.T
        if not gathered:
            sims = sims[:, ids]  # the allowed columns, in index order, as gathered ones are
        part = np.argpartition(-sims, m - 1, axis=1)[:, :m]
        top = np.take_along_axis(sims, part, 1)
        _lowest_on_the_edge(sims, part, top)
        chosen = np.take_along_axis(part, np.lexsort((part, -top), axis=1), 1)  # ties: lower index first
        idx[start : start + len(sims), :m] = ids[chosen]
        dist[start : start + len(sims), :m] = 1.0 - np.take_along_axis(sims, chosen, 1)
    return Neighbours(idx, dist)

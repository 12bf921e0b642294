"""Filtered search inside the index (issue 27, point 2): N synthetic vectors (benchmarks.scale's
clustered ones), an IVF-PQ index built by the pipeline (pipeline.index.build_index, tuned to its
recall bar), and filters keeping 1%, 10% and 50% of the rows (a random column). For each: the
planner's path (Searcher: exact among the matching rows up to FILTER_EXACT_MAX of them, else the
index with a FAISS ID selector and nprobe raised by one over the share kept), p50 and p95 of one
query at a time, and recall@10 against an exact search over the matching rows.

    python -m benchmarks.filtered                 # 1,000,000 vectors: ~4 min on 2 cores
    python -m benchmarks.filtered --tiny          # 20,000: checks the script
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import machine_line, make_parser, parse_args
from benchmarks.scale import clustered, unit
from pipeline import searcher as searcher_module
from pipeline.index import build_index
from pipeline.retrieval import masked_topk
from pipeline.searcher import Searcher
from pipeline.store import ManifestRow

SHARES = (0.01, 0.10, 0.50)


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, work=None, model=False)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = parse_args(ap, argv, tiny={"n": 20_000, "queries": 40})
    print(machine_line())
    t = time.perf_counter()
    emb = clustered(args.n, 512, seed=1)
    rng = np.random.default_rng(7)
    queries = unit(emb[rng.integers(0, args.n, args.queries)] + rng.standard_normal((args.queries, 512)).astype(
        np.float32) * 0.02)
    print(f"{args.n:,} vectors of 512 dimensions made in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    index = build_index(emb, "ivfpq", "bench", threads=args.threads)
    print(f"index: {index.describe()} built in {time.perf_counter() - t:.0f} s")
    rows = [ManifestRow(index=i, file="", source_row=i) for i in range(args.n)]
    search = Searcher(emb, rows, index)
    print()
    print("| rows kept | matching | path | p50 | p95 | recall@10 |")
    print("|---|---|---|---|---|---|")
    for share in SHARES:
        allowed = rng.random(args.n) < share
        m = int(allowed.sum())
        path = "exact among them" if m <= searcher_module.FILTER_EXACT_MAX else "index + ID selector"
        search.neighbours(queries[:1], 10, allowed)  # the first query of a filter gathers its rows
        times, hits = [], 0
        truth = masked_topk(queries, emb, allowed, 10)
        for i in range(len(queries)):
            t = time.perf_counter()
            nb = search.neighbours(queries[i : i + 1], 10, allowed)
            times.append((time.perf_counter() - t) * 1000)
            assert (nb.indices[0] >= 0).sum() == min(10, m) and allowed[nb.indices[0][nb.indices[0] >= 0]].all()
            hits += len(set(nb.indices[0].tolist()) & set(truth.indices[i].tolist()))
        p50, p95 = np.percentile(times, [50, 95])
        print(f"| {share:.0%} | {m:,} | {path} | {p50:.1f} ms | {p95:.1f} ms | {hits / (10 * len(queries)):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

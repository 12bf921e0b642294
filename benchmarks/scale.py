"""Neighbour search at catalogue scale: the FAISS indexes of pipeline/index.py on synthetic clustered
512-d unit vectors, at 100k and 1M.

For each size and index kind: build time (training, adding and the recall tuning the product does),
index memory, recall@10 against exact search on 1,000 held-out gallery rows (--held-out) (not the rows the build
tuned on), single-query latency p50/p99 (batch 1), and the all-neighbours top-10 of the whole
gallery (what a gallery run computes), timed in full or, for exact search at 1M, timed on a slice
and scaled (its cost is linear in the rows).

The vectors (see `clustered`): 50 categories, groups of 10 look-alikes in each (the same product
photographed again, its variants), each vector its group's centre plus a small variation: nearest
neighbours are the vector's group (cosine ~0.8), then its category (~0.5), then the rest (~0). Real
catalogues have this kind of structure; a uniform cloud in 512 dimensions (no neighbour nearer
than any other) has none, and no index can search it. Figures depend on the data: measure on your
own embeddings before trusting them.

    python -m benchmarks.scale [--sizes 100000,1000000] [--kinds flat,hnsw,ivfpq]
    python -m benchmarks.scale --tiny                 # 1,000 vectors x 32: checks the script
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.common import machine_line, make_parser, parse_args


def clustered(n: int, dim: int = 512, categories: int = 50, group: int = 10, seed: int = 0) -> np.ndarray:
    """n unit vectors in three levels: categories (unit centres), groups of `group` vectors in a
    category (the group's centre: the category's plus a random direction of the same norm), and the
    vectors of a group (its centre plus a 16-dim variation of norm ~0.5 shared by the group's
    vectors' span, plus isotropic noise of norm ~0.2)."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    cats = unit(rng.standard_normal((categories, dim)).astype(np.float32))
    n_groups = max(1, n // group)
    centres = unit(cats[rng.integers(0, categories, n_groups)] + unit(rng.standard_normal((n_groups, dim))))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 20_000):
        m = min(20_000, n - s)
        g = (np.arange(s, s + m) // group) % n_groups
        first, last = g.min(), g.max()
        basis = rng.standard_normal((last - first + 1, 16, dim)).astype(np.float32) * (0.5 / np.sqrt(16 * dim))
        basis = basis[g - first]  # one basis per group
        z = rng.standard_normal((m, 16)).astype(np.float32)
        x = (
            centres[g]
            + np.einsum("mk,mkd->md", z, basis)
            + rng.standard_normal((m, dim)).astype(np.float32) * (0.2 / np.sqrt(dim))
        )
        out[s : s + m] = unit(x)
    return out


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def one_kind(emb: np.ndarray, kind: str, held_out: np.ndarray, truth: np.ndarray, slice_rows: int) -> dict:
    from pipeline.index import build_index, recall_at_10

    n = len(emb)
    before = rss_mib()
    t = time.perf_counter()
    gi = build_index(emb, kind, "benchmark")
    build = time.perf_counter() - t
    grown = rss_mib() - before
    held = recall_at_10(gi.search(emb[held_out], 10, self_ids=held_out).indices, truth)
    lat = []
    for i in held_out[:1000]:
        t = time.perf_counter()
        gi.search(emb[i : i + 1], 10)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1000
    rows = n if kind != "flat" or n <= slice_rows else slice_rows
    t = time.perf_counter()
    if rows == n:
        gi.all_neighbours(10)
    else:
        gi.search(emb[:rows], 10, self_ids=np.arange(rows))
    all_nb = (time.perf_counter() - t) * n / rows
    return {
        "kind": kind,
        "params": {k: v for k, v in gi.info.params.items()},
        "build_s": build,
        "index_mib": gi.info.memory_bytes / 2**20,
        "rss_growth_mib": grown,
        "recall_build_sample": gi.info.recall_at_10,
        "recall_held_out": held,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "all_neighbours_s": all_nb,
        "all_neighbours_scaled": rows != n,
    }


def held_out_truth(emb: np.ndarray, held: int) -> tuple[np.ndarray, np.ndarray]:
    """`held` gallery rows drawn at random, and their exact top-10 (the row itself left out)."""
    from pipeline.retrieval import topk_neighbours

    n = len(emb)
    held_out = np.sort(np.random.default_rng(99).choice(n, min(held, n), replace=False))
    truth = topk_neighbours(emb[held_out], emb, 11).indices
    return held_out, np.array([[j for j in row if j != i][:10] for i, row in zip(held_out, truth)])


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, work=None, model=False)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=1000, help="gallery rows whose recall and latency are measured")
    ap.add_argument("--slice", type=int, default=20_000, help="rows timed for exact all-neighbours above this size")
    args = parse_args(ap, argv, tiny={"sizes": "1000", "dim": 32, "held_out": 50, "slice": 500})
    print(machine_line(), flush=True)
    import faiss

    from pipeline.index import choose_kind

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        emb = clustered(n, args.dim)
        held_out, truth = held_out_truth(emb, args.held_out)
        print(
            f"\n== {n:,} vectors x {args.dim} ({emb.nbytes / 2**20:,.0f} MiB), made and exact truth for "
            f"{len(held_out):,} rows in {time.perf_counter() - t:.1f} s; auto picks {choose_kind(n, args.dim)}",
            flush=True,
        )
        print(
            f"{'kind':6s} {'build':>8s} {'index':>9s} {'rss +':>9s} {'recall@10':>9s} {'(tuned)':>8s} "
            f"{'p50':>8s} {'p99':>8s} {'all top-10':>11s}  params"
        )
        for kind in args.kinds.split(","):
            r = one_kind(emb, kind, held_out, truth, args.slice)
            print(
                f"{kind:6s} {r['build_s']:7.1f}s {r['index_mib']:7.0f}Mi {r['rss_growth_mib']:7.0f}Mi "
                f"{r['recall_held_out']:9.4f} {r['recall_build_sample']:8.4f} "
                f"{r['p50_ms']:6.2f}ms {r['p99_ms']:6.2f}ms "
                f"{r['all_neighbours_s']:10.1f}s{'*' if r['all_neighbours_scaled'] else ' '}  {r['params']}",
                flush=True,
            )
        del emb
    print("\n* timed on the first --slice rows and scaled to all (exact search costs the same for every row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

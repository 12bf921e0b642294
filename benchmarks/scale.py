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

The index as the catalogue changes (--updates; pipeline/index.py update_index): an IVF-PQ index is
trained on --base vectors, then --added more arrive in --steps updates whose content drifts (each
update's categories have moved a further 1/steps of the way towards new random ones, all new by the
last: the catalogue's content changes, as in DeDrift). Two copies of the index take the same updates:
one never re-tuned or rebuilt (what a plain add_with_ids gives), one under RenewRule (nprobe raised
up to 2x, rebuilt on recall, imbalance or growth). After each update: its wall time (update_index
end to end: read, renumber, add, recall on the carried sample, write), what it did, recall@10 on the
index's own sample and on 500 fresh held-out rows, nprobe, the lists' imbalance factor, and the
search time per query of a 500-query batch (exact re-rank included). Then the speed target: 10,000
new vectors (and 10,000 new with 10,000 removed) into the ruled index at base + added vectors.

    python -m benchmarks.scale [--sizes 100000,1000000] [--kinds flat,hnsw,ivfpq]
    python -m benchmarks.scale --updates              # drift: 500k + 10 x 50k, then 10k into 1M
    python -m benchmarks.scale --carried [--carried-sizes 50000:exact,200000:ivfpq]
    python -m benchmarks.scale --tiny                 # all, 1,000 / 2,000 vectors x 32: checks the script

Neighbours through an update (--carried; Searcher.carried_neighbours): a gallery's all-neighbours
top-10, then --carried-change of it removed and as many added; the new gallery's lists by a full
pass and carried over from the old ones, each timed, with how many lists were asked again, the
share of lists equal to the full pass's and, on 1,000 rows, recall@10 against exact search.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, make_parser, parse_args

FUTURE = 1_000_003  # the seed of the categories a drifting catalogue moves towards


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def drifted_categories(drift: float, dim: int, categories: int = 50) -> np.ndarray:
    """The categories of `clustered` (seed 0) moved `drift` (0..1) of the way towards other random
    ones (seed FUTURE): 0 is the catalogue as trained, 1 all new content."""

    def cats(seed: int) -> np.ndarray:
        return unit(np.random.default_rng(seed).standard_normal((categories, dim)).astype(np.float32))

    return unit((1 - drift) * cats(0) + drift * cats(FUTURE)).astype(np.float32)


def clustered(
    n: int, dim: int = 512, categories: int = 50, group: int = 10, seed: int = 0, cats: np.ndarray | None = None
) -> np.ndarray:
    """n unit vectors in three levels: categories (unit centres), groups of `group` vectors in a
    category (the group's centre: the category's plus a random direction of the same norm), and the
    vectors of a group (its centre plus a 16-dim variation of norm ~0.5 shared by the group's
    vectors' span, plus isotropic noise of norm ~0.2). cats: these category centres instead of
    random ones (drifted_categories)."""
    rng = np.random.default_rng(seed)
    if cats is None:
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


def held_out_truth(emb: np.ndarray, held: int, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """`held` gallery rows drawn at random, and their exact top-10 (the row itself left out)."""
    from pipeline.retrieval import topk_neighbours

    n = len(emb)
    held_out = np.sort(np.random.default_rng(seed).choice(n, min(held, n), replace=False))
    truth = topk_neighbours(emb[held_out], emb, 11, block=256).indices
    return held_out, np.array([[j for j in row if j != i][:10] for i, row in zip(held_out, truth)])


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, work=None, model=False)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=1000, help="gallery rows whose recall and latency are measured")
    ap.add_argument("--slice", type=int, default=20_000, help="rows timed for exact all-neighbours above this size")
    ap.add_argument("--updates", action="store_true", help="measure the index through updates (drift, speed target)")
    ap.add_argument("--base", type=int, default=500_000, help="--updates: vectors the index is trained on")
    ap.add_argument("--added", type=int, default=500_000, help="--updates: vectors added, in --steps updates")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--target-add", type=int, default=10_000, help="--updates: the update timed for the target")
    ap.add_argument("--carried", action="store_true", help="measure neighbours carried through an update")
    ap.add_argument("--carried-sizes", default="50000:exact,200000:ivfpq", help="--carried: N:search, ...")
    ap.add_argument("--carried-change", default="0.001,0.01", help="--carried: shares removed (and as many added)")
    tiny = {"sizes": "1000", "dim": 32, "held_out": 50, "slice": 500, "base": 2000, "added": 2000, "steps": 4,
            "carried_sizes": "1500:exact,3000:ivfpq"}
    args = parse_args(ap, argv, tiny={**tiny, "target_add": 200})
    print(machine_line(), flush=True)
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    if args.carried or args.tiny:
        carried(args)
    if args.updates or args.tiny:
        updates(args)
    if not args.updates and not args.carried:
        sizes(args)
    return 0


def carried(args) -> None:
    """Neighbours through an update: a full pass against the lists carried over (see the module doc)."""
    from pipeline.index import build_index, recall_at_10
    from pipeline.searcher import Searcher

    print("\n== neighbours through an update: full pass against carried over (top-10)")
    print(f"{'N':>9s} {'search':6s} {'change':>8s} {'full pass':>10s} {'carried':>9s} {'asked again':>12s} "
          f"{'same lists':>10s} {'recall full':>11s} {'recall carried':>14s}")
    for spec in args.carried_sizes.split(","):
        n_text, kind = spec.split(":")
        n = int(n_text)
        emb = clustered(n * 11 // 10, args.dim, seed=3)
        old = emb[:n]
        before = searcher_for(old, kind, build_index, Searcher).all_neighbours(10)
        for share in (float(x) for x in args.carried_change.split(",")):
            m = max(1, round(n * share))
            rng = np.random.default_rng(m)
            gone = np.zeros(n, bool)
            gone[rng.choice(n, m, replace=False)] = True
            take = np.flatnonzero(~gone)
            now = np.ascontiguousarray(np.concatenate([old[take], emb[n : n + m]]))
            searcher = searcher_for(now, kind, build_index, Searcher)
            t = time.perf_counter()
            full = searcher.all_neighbours(10)
            full_s = time.perf_counter() - t
            t = time.perf_counter()
            found = searcher.carried_neighbours(before, take, 10)
            carried_s = time.perf_counter() - t
            held_out, truth = held_out_truth(now, args.held_out)
            if found is None:
                print(f"{len(now):9,d} {kind:6s} {m:>8,d} {full_s:9.1f}s   (not carried: no saving)", flush=True)
                continue
            nb, asked = found
            same = float((nb.indices == full.indices).all(axis=1).mean())
            print(f"{len(now):9,d} {kind:6s} {'-' + str(m) + '+' + str(m):>8s} {full_s:9.1f}s {carried_s:8.2f}s "
                  f"{asked:12,d} {same:10.4f} {recall_at_10(full.indices[held_out], truth):11.4f} "
                  f"{recall_at_10(nb.indices[held_out], truth):14.4f}", flush=True)


def searcher_for(emb: np.ndarray, kind: str, build_index, searcher_cls):
    return searcher_cls(emb, [None] * len(emb), None if kind == "exact" else build_index(emb, kind, "benchmark"))


def sizes(args) -> None:
    """The index kinds at each of --sizes: build, memory, recall, latency, all neighbours."""
    from pipeline.index import choose_kind

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


HELD = 500  # held-out rows whose recall and search time are measured after each update


class Arm:
    """One copy of the index, in its own store folder, taking the updates under one rule."""

    def __init__(self, name: str, rule, folder: Path) -> None:
        self.name, self.rule, self.folder = name, rule, folder
        folder.mkdir(parents=True, exist_ok=True)

    def update(self, kept: np.ndarray, added: np.ndarray, emb: np.ndarray, sha: str) -> tuple[float, dict]:
        from pipeline.index import INDEX_META, update_index

        t = time.perf_counter()
        update_index(self.folder, kept, added, emb, sha, kind="ivfpq", rule=self.rule)
        wall = time.perf_counter() - t
        return wall, json.loads((self.folder / INDEX_META).read_text())

    def measure(self, emb: np.ndarray, sha: str, held: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
        """Held-out recall@10 and search time per query (ms) of a batch of the held-out rows."""
        from pipeline.index import load_index, recall_at_10

        gi = load_index(self.folder, emb, sha)
        assert gi is not None
        t = time.perf_counter()
        found = gi.search(emb[held], 10, self_ids=held).indices
        ms = (time.perf_counter() - t) * 1000 / len(held)
        return recall_at_10(found, truth), ms


def updates(args) -> None:
    """The index through --steps drifting updates, without and with RenewRule; then the speed target."""
    from pipeline.index import RenewRule, build_index, save_index

    dim, steps = args.dim, args.steps
    per_step = args.added // steps
    total = args.base + per_step * steps
    emb = np.empty((total + args.target_add, dim), np.float32)  # the catalogue grows in place: views are passed
    t = time.perf_counter()
    emb[: args.base] = clustered(args.base, dim)
    gi = build_index(emb[: args.base], "ivfpq", "step0")
    print(
        f"\n== updates: IVF-PQ trained on {args.base:,} vectors x {dim} in {time.perf_counter() - t:.1f} s "
        f"({gi.info.describe()}; imbalance {gi.info.imbalance:.2f}), then {steps} updates of {per_step:,} "
        "drifting vectors",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="scale-updates-") as tmp:
        arms = [Arm("never", RenewRule.never(), Path(tmp) / "never"), Arm("rule", RenewRule(), Path(tmp) / "rule")]
        for arm in arms:
            save_index(arm.folder, gi)
        del gi
        print(
            f"{'rule':6s} {'step':>4s} {'vectors':>10s} {'update':>8s} {'action':8s} {'recall@10':>9s} "
            f"{'held-out':>8s} {'nprobe':>6s} {'imbalance':>9s} {'ms/query':>8s}  why"
        )
        n = args.base
        for step in range(1, steps + 1):
            drift = step / steps
            emb[n : n + per_step] = clustered(per_step, dim, seed=step, cats=drifted_categories(drift, dim))
            n += per_step
            after, sha = emb[:n], f"step{step}"
            held, truth = held_out_truth(after, HELD, seed=step)
            for arm in arms:
                wall, meta = arm.update(np.arange(n - per_step), emb[n - per_step : n], after, sha)
                print_update(arm.name, str(step), n, wall, meta, *arm.measure(after, sha, held, truth))
        target(args, emb, n, arms[1])


def print_update(name: str, step: str, n: int, wall: float, meta: dict, held: float, ms: float) -> None:
    line = meta["history"][-1]
    print(
        f"{name:6s} {step:>4s} {n:10,d} {wall:7.1f}s {line['action']:8s} {line['recall_at_10']:9.4f} {held:8.4f} "
        f"{line.get('nprobe', 0):6d} {line.get('imbalance', 0.0):9.2f} {ms:8.3f}  {'; '.join(line['why'])}",
        flush=True,
    )


def target(args, emb: np.ndarray, n: int, arm: Arm) -> None:
    """The issue's target: an update of --target-add new vectors into the ruled index, <= 10 s with
    recall@10 >= 0.95; then the same with as many removed (every store row after them renumbered)."""
    m = args.target_add
    print(
        f"\n== speed target: {m:,} new vectors into the {n:,}-vector IVF-PQ index (target <= 10 s, recall@10 >= 0.95)"
    )
    print(f"{'update':28s} {'wall':>7s} {'action':8s} {'recall@10':>9s} {'held-out':>8s} {'nprobe':>6s}")
    emb[n : n + m] = clustered(m, args.dim, seed=10_001, cats=drifted_categories(1.0, args.dim))
    after = emb[: n + m]
    held, truth = held_out_truth(after, HELD, seed=10_001)
    wall, meta = arm.update(np.arange(n), emb[n : n + m], after, "target-added")
    report_target(f"{m:,} added", wall, meta, *arm.measure(after, "target-added", held, truth))
    # then as many removed, spread over the catalogue, and as many new again: every row renumbered
    gone = np.sort(np.random.default_rng(7).choice(n + m, m, replace=False))
    kept = np.setdiff1d(np.arange(n + m), gone)
    fresh = clustered(m, args.dim, seed=10_002, cats=drifted_categories(1.0, args.dim))
    after = np.concatenate([emb[kept], fresh])
    held, truth = held_out_truth(after, HELD, seed=10_002)
    wall, meta = arm.update(kept, fresh, after, "target-removed")
    report_target(f"{m:,} added, {m:,} removed", wall, meta, *arm.measure(after, "target-removed", held, truth))


def report_target(what: str, wall: float, meta: dict, held: float, ms: float) -> None:
    line = meta["history"][-1]
    print(
        f"{what:28s} {wall:6.1f}s {line['action']:8s} {line['recall_at_10']:9.4f} {held:8.4f} "
        f"{line.get('nprobe', 0):6d}  {'; '.join(line['why'])}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

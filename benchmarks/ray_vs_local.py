"""--engine ray against --engine local on one machine: the standard run on N generated 768x1024 JPEGs
(int8 ONNX), each engine run in turn in the same session, wall time and the peak memory of the whole
process tree (the run, and for Ray its raylet, GCS and worker processes), sampled every 0.2 s.

    python -m benchmarks.ray_vs_local [--n 2000] [--repeats 2]
    python -m benchmarks.ray_vs_local --tiny          # 16 small pictures, tiny model: checks the script
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import (
    Assets,
    machine_line,
    make_parser,
    parse_args,
    run_main_py,
    section_stages,
    standard_run_args,
)
from pipeline.machine import tree_rss_bytes


def run(engine: str, ds: Path, onnx: Path, out: Path, n: int) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, peak RSS of the process tree in MiB, stages) of one standard run."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    result = run_main_py([*standard_run_args(ds, onnx, out, n), "--engine", engine], sample=tree_rss_bytes)
    result.check(f"{engine} run")
    return result.wall_s, result.sampled_peak / 2**20, section_stages(out)


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = parse_args(ap, argv, tiny={"n": 16, "repeats": 1})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    ds = assets.dataset(args.n)
    onnx = assets.onnx("static")
    rows = []
    for r in range(args.repeats):
        for engine in ("local", "ray"):
            wall, peak, stages = run(engine, ds, onnx, args.work / f"engine-{engine}", args.n)
            embed = stages.get("embed", float("nan"))
            rows.append((engine, wall, peak, embed))
            print(f"  stages: {', '.join(f'{k} {v:.1f} s' for k, v in stages.items())}")
            print(
                f"{engine:5s} run {r + 1}: wall {wall:6.1f} s ({args.n / wall:5.1f} img/s), embedding stage "
                f"{embed:6.1f} s, peak RSS of the process tree {peak:,.0f} MiB",
                flush=True,
            )
    print("\n| engine | wall | images/s | peak RSS, process tree |\n|---|---|---|---|")
    for engine in ("local", "ray"):
        walls = [w for e, w, _, _ in rows if e == engine]
        peaks = [p for e, _, p, _ in rows if e == engine]
        print(
            f"| {engine} | {', '.join(f'{w:.1f} s' for w in walls)} | {args.n * len(walls) / sum(walls):.0f} "
            f"| {min(peaks):,.0f}-{max(peaks):,.0f} MiB |"
        )
    local = [w for e, w, _, _ in rows if e == "local"]
    ray = [w for e, w, _, _ in rows if e == "ray"]
    overhead = (sum(ray) / len(ray)) / (sum(local) / len(local)) - 1
    print(f"\n== {args.n:,} images: Ray's wall time is {overhead:+.1%} against local (mean of {args.repeats} each)")
    print(f"stores equal: {_same_store(args.work / 'engine-local', args.work / 'engine-ray')}")
    return 0


def _same_store(a: Path, b: Path) -> str:
    import numpy as np

    ma, mb = (p / "embeddings" / "manifest.csv" for p in (a, b))
    ea, eb = (np.load(p / "embeddings" / "embeddings.npy") for p in (a, b))
    manifest = ma.read_bytes() == mb.read_bytes()
    diff = float(np.abs(ea - eb).max()) if ea.shape == eb.shape else float("inf")
    return f"manifest byte-identical: {manifest}; embeddings max difference {diff:.2e}"


if __name__ == "__main__":
    sys.exit(main())

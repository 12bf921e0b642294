"""Standard pipeline at scale: N generated 768x1024 JPEGs, ONNX int8 backend, real FashionCLIP
architecture (random weights). Prints wall time, images/s per stage, and peak RSS.

    python -m benchmarks.standard_run --n 10000
    python -m benchmarks.standard_run --tiny          # 16 small pictures, tiny model: checks the script
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from benchmarks.common import Assets, machine_line, make_parser, parse_args, run_main_py, standard_run_args


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--quantization", choices=["static", "dynamic"], default="static")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for main.py")
    args = parse_args(ap, argv, tiny={"n": 16})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ds = assets.dataset(args.n)
    onnx = assets.onnx(args.quantization)
    print(f"assets ready in {time.perf_counter() - t:.0f} s: {ds}, {onnx}")
    out = args.work / f"run{args.n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*standard_run_args(ds, onnx, out, args.n), *args.extra]
    print("main.py " + " ".join(cmd))
    run = run_main_py(cmd)
    print("\n".join(line for line in run.stdout.splitlines() if line.strip()))
    if not run.ok:
        print(run.stderr[-3000:])
        return run.returncode
    peak = run.peak_rss_mib or float("nan")
    print(
        f"\n== N={args.n}: wall {run.wall_s:.1f} s ({args.n / run.wall_s:.1f} img/s end to end), "
        f"peak RSS {peak:.0f} MiB"
    )
    for name, sec in run.stages.items():
        if sec > 0:
            print(f"  {name:40s} {sec:8.1f} s  {args.n / sec:9.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

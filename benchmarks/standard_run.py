"""Standard pipeline at scale: N generated 768x1024 JPEGs, ONNX int8 backend, real FashionCLIP
architecture (random weights). Prints wall time, images/s per stage, and peak RSS.

    python -m benchmarks.standard_run --n 10000
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_line, make_jpeg_dataset, real_arch_onnx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--quantization", choices=["static", "dynamic"], default="static")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for main.py")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ds = make_jpeg_dataset(args.work, args.n)
    onnx = real_arch_onnx(args.work, args.quantization)
    print(f"assets ready in {time.perf_counter() - t:.0f} s: {ds}, {onnx}")
    out = args.work / f"run{args.n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "main.py"),
        "--dataset",
        str(ds),
        "--onnx",
        str(onnx),
        "--output-dir",
        str(out),
        "--limit",
        str(args.n),
        *args.extra,
    ]
    print(" ".join(cmd))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    # The run reports its own peak RSS (ru_maxrss of that process alone).
    m = re.search(r"peak memory (\d+) MiB", proc.stdout)
    peak = float(m.group(1)) if m else float("nan")
    summary = [line for line in proc.stdout.splitlines() if line.strip()]
    print("\n".join(summary))
    if proc.returncode not in (0, 3):
        print(proc.stderr[-3000:])
        return proc.returncode
    stage_line = next((line for line in summary if line.startswith("stages:")), "")
    stages = dict(re.findall(r"([a-z0-9+() ]+?) ([\d.]+) s", stage_line))
    print(f"\n== N={args.n}: wall {wall:.1f} s ({args.n / wall:.1f} img/s end to end), peak RSS {peak:.0f} MiB")
    for name, sec in stages.items():
        sec = float(sec)
        if sec > 0:
            print(f"  {name.strip():40s} {sec:8.1f} s  {args.n / sec:9.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

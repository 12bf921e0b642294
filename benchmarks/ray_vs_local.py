"""--engine ray against --engine local on one machine: the standard run on N generated 768x1024 JPEGs
(int8 ONNX), each engine run in turn in the same session, wall time and the peak memory of the whole
process tree (the run, and for Ray its raylet, GCS and worker processes), sampled every 0.2 s.

    python -m benchmarks.ray_vs_local [--n 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_line, make_jpeg_dataset, real_arch_onnx


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(engine: str, ds: Path, onnx: Path, out: Path, n: int) -> tuple[float, float, dict[str, float]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "main.py"), "--dataset", str(ds), "--onnx", str(onnx), "--output-dir", str(out)]
    cmd += ["--limit", str(n), "--engine", engine]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{engine} run failed ({proc.returncode}):\n{stderr[-3000:]}")
    line = next((x for x in stdout.splitlines() if x.startswith("stages:")), "")
    stages = {
        k.strip(", "): float(v) for k, v in re.findall(r"([a-z0-9+(), ]+?) ([\d.]+) s", line.removeprefix("stages:"))
    }
    return wall, peak / 2**20, stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    args = ap.parse_args()
    print(machine_line(), flush=True)
    ds = make_jpeg_dataset(args.work, args.n)
    onnx = real_arch_onnx(args.work, "static")
    rows = []
    for r in range(args.repeats):
        for engine in ("local", "ray"):
            wall, peak, stages = run(engine, ds, onnx, args.work / f"engine-{engine}", args.n)
            embed = stages.get("embed stage (wall)", stages.get("embed stage (wall, ray)", float("nan")))
            rows.append((engine, wall, peak, embed))
            print(f"  stages: {', '.join(f'{k} {v:.1f} s' for k, v in stages.items())}")
            print(
                f"{engine:5s} run {r + 1}: wall {wall:6.1f} s ({args.n / wall:5.1f} img/s), embedding stage "
                f"{embed:6.1f} s, peak RSS of the process tree {peak:,.0f} MiB",
                flush=True,
            )
    local = [w for e, w, _, _ in rows if e == "local"]
    ray = [w for e, w, _, _ in rows if e == "ray"]
    overhead = (sum(ray) / len(ray)) / (sum(local) / len(local)) - 1
    print(f"\n== {args.n:,} images: Ray's wall time is {overhead:+.1%} against local (mean of {args.repeats} each)")
    same = _same_store(args.work / "engine-local", args.work / "engine-ray")
    print(f"stores equal: {same}")
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

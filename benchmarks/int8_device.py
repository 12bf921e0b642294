"""Issue 29 on a CPU these sessions do not have, in one prepared command: the device machine a
session may be lent (an H100/H200 host, 16 cores, perhaps an AMX Xeon) runs the int8 benchmarks on
two of its cores, as issue 29 measured its 2-core AMX Xeon, within one device call (<= 9 minutes):

    python -m benchmarks.int8_device                 # writes int8_device_<cpu>.txt to $OUT or benchmarks/results
    python -m benchmarks.int8_device --tiny          # the same steps, tiny, here (checks the script)

Steps, each its own process pinned to the first two cores this process may use:
1. `benchmarks.int8_recipes --recipes qdq-out,conv-too+bias,attn-float+qgemm-gelu`: the export of
   issue 29's day against the VNNI and AMX profiles' graphs, their kernel time by op type and
   conversion share (issue 29's 1.5x and 10% bar);
2. `benchmarks.embed --int8 static --compare none --e2e-images 300`: rates at batch 1/8/32, the int8
   GEMM peak and the ceiling reached, and the end-to-end share.
It needs only what the device machine's image holds (torch, transformers, onnxruntime, onnx,
onnxscript, pyarrow, pillow, scipy; no `datasets`, no ultralytics). A step that fails or runs past
its limit is reported and the next one still runs; the command exits 1 if any failed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_line, make_parser, parse_args

STEPS: list[tuple[str, list[str], int]] = [  # (name, module and flags, seconds allowed)
    ("int8 recipes", ["benchmarks.int8_recipes", "--recipes", "qdq-out,conv-too+bias,attn-float+qgemm-gelu"], 240),
    ("embed", ["benchmarks.embed", "--int8", "static", "--compare", "none", "--e2e-images", "300"], 300),
]


def pin_two_cores() -> list[int]:
    """Pins this process (and so its children) to the first two cores it may use; returns them."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cores)
    return cores


def step_argv(command: list[str], work: Path, tiny: bool) -> list[str]:
    return [sys.executable, "-m", *command, "--work", str(work)] + (["--tiny"] if tiny else [])


def run_step(name: str, argv: list[str], limit_s: float) -> tuple[str, bool]:
    """One benchmark in its own process (its own process group); what it printed and whether it
    ended well (exit 0 within limit_s). Past the limit the whole group is stopped, so that nothing
    it started keeps the pinned cores busy for the next step."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    try:
        text, _ = proc.communicate(timeout=limit_s)
        ok, ending = proc.returncode == 0, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        ok, ending = False, f"stopped after {limit_s:g} s"
    return f"## {name} ({ending}, {time.perf_counter() - start:.0f} s): {' '.join(argv[1:])}\n\n{text}\n", ok


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, work=Path("/tmp/fashion-int8-device"), model=False)
    ap.add_argument("--out", type=Path, default=None,
                    help="the report's folder (default: $OUT, else benchmarks/results)")
    args = parse_args(ap, argv, tiny={})
    cores = pin_two_cores()
    head = f"{machine_line()}; pinned to cores {cores}\n"
    print(head, flush=True)
    parts, failed = [head], []
    for name, command, limit in STEPS:
        text, ok = run_step(name, step_argv(command, args.work, args.tiny), limit)
        print(text, flush=True)
        parts.append(text)
        if not ok:
            failed.append(name)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    label = re.sub(r"[^A-Za-z0-9]+", "-", machine_line().split(": ", 1)[1].split(" [")[0]).strip("-").lower()
    report = out / f"int8_device_{label or 'cpu'}{'_tiny' if args.tiny else ''}.txt"
    report.write_text("".join(parts))
    print(f"report: {report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

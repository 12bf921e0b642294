"""The GPU path at hardware speed, in one prepared command for a lent H100/H200 (<= 5 minutes):

    python -m benchmarks.gpu_check                       # writes benchmarks/results/gpu_check_<gpu>.json
    python -m benchmarks.gpu_check --dry-run-cpu         # the same steps, tiny, on this CPU (checks the script)

Steps, each in a fresh `python main.py` (what a user runs), on generated 768x1024 JPEGs in a local
parquet dataset and the real FashionCLIP architecture with random weights, torch fp16 on CUDA:
1. the fp16 model alone at batch 256 (images/s, vectors copied to the host), in this process;
2. standard runs of 4,096 and 16,384 rows without pictures (--max-result-images 0 --max-matrix 0):
   embedding-stage images/s, wall time after the model is loaded, peak host RSS, peak GPU memory;
3. the 4,096-row run with 10% PNGs mixed in (CPU decoding beside the GPU's);
4. --use-segmentation with yolov8l-seg built from its yaml (skipped without ultralytics);
5. the CPU ONNX int8 lanes on 2,000 rows with --threads 2 and --threads 16 (the ratio).
The machine's CPU (model, instruction sets) and GPU are recorded with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import ROOT, machine_line, photo_like


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    photo_like(i, *size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(i: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    photo_like(10_000 + i, *size).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_dataset(folder: Path, n: int, png_share: float = 0.0, unique: int = 256, size=(768, 1024)) -> Path:
    """n rows: `unique` distinct photo-like JPEGs (made in parallel) repeated, every 1/png_share-th
    row a PNG instead. Decoding costs the same whether or not bytes repeat."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = folder / "data" / "train-00000-of-00001.parquet"
    if target.is_file():
        return folder
    target.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        jpegs = list(pool.map(_jpeg, range(unique), [size] * unique))
        pngs = list(pool.map(_png, range(16), [size] * 16)) if png_share else []
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("image", image)], metadata={b"huggingface": b'{"info": {"features": {"image": {"_type": "Image"}}}}'}
    )
    every = round(1 / png_share) if png_share else 0
    with pq.ParquetWriter(target, schema) as writer:
        for start in range(0, n, 512):
            rows = [
                {"bytes": pngs[i % len(pngs)] if every and i % every == every - 1 else jpegs[i % unique], "path": None}
                for i in range(start, min(n, start + 512))
            ]
            writer.write_table(pa.table({"image": rows}, schema=schema), row_group_size=128)
    return folder


def run_main(args: list[str], gpu_memory: bool) -> dict:
    """main.py in a fresh process; its summary parsed, with peak RSS and (sampled) peak GPU memory."""
    cmd = [sys.executable, str(ROOT / "main.py"), *args]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, text=True, cwd=ROOT)
        peak_gpu = 0
        while proc.poll() is None:
            if gpu_memory:
                peak_gpu = max(peak_gpu, _gpu_used_mib())
            time.sleep(0.2)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    wall = time.perf_counter() - t
    res: dict = {"exit": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode not in (0, 3):
        res["error"] = err[-1500:]
        return res
    stages = dict(
        (k.strip(), float(v)) for k, v in re.findall(r"([a-zA-Z0-9+() ]+?) ([\d.]+) s(?:,|$)", _line(out, "stages:"))
    )
    res["stages_s"] = stages
    peak = re.search(r"peak memory (\d+) MiB", out)
    res["peak_rss_mib"] = int(peak.group(1)) if peak else None
    if gpu_memory:
        res["peak_gpu_mib"] = peak_gpu
    res["after_model_load_s"] = round(wall - stages.get("load model", 0.0), 1)
    return res


def _line(text: str, prefix: str) -> str:
    return next((line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)), "")


def _gpu_used_mib() -> int:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return int(r.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0


def model_only(model: Path, device: str, batch: int, seconds: float) -> float:
    """Images/s of the model alone (inputs already on the device, vectors copied to the host)."""
    import torch

    from pipeline.embedders import TorchEmbedder

    e = TorchEmbedder(str(model), device=device)
    x = torch.randn(batch, 3, 224, 224, device=e.device, dtype=e.input_dtype)
    for _ in range(3):
        e.embed_tensor(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        e.embed_tensor(x)
        n += batch
    return round(n / (time.perf_counter() - t), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: benchmarks/results/gpu_check_<gpu>.json)"
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fashion-gpu-check")
    ap.add_argument("--dry-run-cpu", action="store_true", help="every step, tiny, on the CPU: checks the script itself")
    args = ap.parse_args()
    import torch

    from benchmarks.common import real_arch_clip, real_arch_onnx
    from pipeline.machine import cpu_info

    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run-cpu to check the script on the CPU", file=sys.stderr)
        return 1
    device = "cpu" if dry else "cuda"
    sizes = (48, 96) if dry else (4096, 16384)
    lanes_rows, batch = (24 if dry else 2000), (16 if dry else 256)
    report: dict = {
        "machine": cpu_info(),
        "torch": torch.__version__,
        "gpu": None if dry else torch.cuda.get_device_name(0),
    }
    print(machine_line(), report["gpu"] or "(dry run on the CPU)", flush=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = real_arch_clip(work)
    report["model_only_img_s"] = model_only(model, device, batch, 2 if dry else 6)
    print("model only:", report["model_only_img_s"], "img/s", flush=True)
    base = [
        "--model",
        str(model),
        "--backend",
        "torch",
        "--device",
        device,
        "--batch-size",
        str(batch),
        "--max-result-images",
        "0",
        "--max-matrix",
        "0",
        "--limit",
        "0",
        "--decode",
        "device",
    ]
    if not dry:
        base += ["--precision", "fp16"]
    runs = {}
    for n in sizes:
        ds = make_dataset(work / f"jpeg{n}", n)
        runs[f"jpeg_{n}"] = run_main(
            [*base, "--dataset", str(ds), "--output-dir", str(work / f"out{n}")], gpu_memory=not dry
        )
    mixed = make_dataset(work / f"mixed{sizes[0]}", sizes[0], png_share=0.1)
    runs[f"jpeg_png10_{sizes[0]}"] = run_main(
        [*base, "--dataset", str(mixed), "--output-dir", str(work / "out-mixed")], gpu_memory=not dry
    )
    for name, r in runs.items():
        stage = r.get("stages_s", {}).get("embed stage (wall)")
        rows = int(name.rsplit("_", 1)[1])
        r["embed_stage_img_s"] = round(rows / stage, 1) if stage else None
        print(name, json.dumps(r), flush=True)
    report["standard_runs"] = runs
    try:
        import ultralytics  # noqa: F401

        seg = run_main(
            [
                *base,
                "--use-segmentation",
                "--seg-model",
                "yolov8l-seg.yaml",
                "--dataset",
                str(work / f"jpeg{sizes[0]}"),
                "--limit",
                str(256 if not dry else 8),
                "--output-dir",
                str(work / "out-seg"),
            ],
            gpu_memory=not dry,
        )
        seg_stage = seg.get("stages_s", {}).get("embed stage (wall)")
        seg["segmentation_stage_img_s"] = round((256 if not dry else 8) / seg_stage, 1) if seg_stage else None
        report["segmentation_yolov8l"] = seg
    except ImportError:
        report["segmentation_yolov8l"] = (
            "skipped: ultralytics is not installed (carry it as a wheel, see the device README)"
        )
    print("segmentation:", report["segmentation_yolov8l"], flush=True)
    onnx = real_arch_onnx(work)
    lanes_ds = make_dataset(work / f"jpeg{lanes_rows}", lanes_rows)
    lanes = {}
    for threads in (2, 16):
        lanes[f"threads_{threads}"] = run_main(
            [
                "--dataset", str(lanes_ds), "--onnx", str(onnx), "--backend", "onnx", "--device", "cpu", "--threads",
                str(threads), "--max-result-images", "0", "--max-matrix", "0", "--output-dir",
                str(work / f"out-lanes{threads}"),
            ],
            gpu_memory=False,
        )
    a, b = (lanes[f"threads_{t}"].get("stages_s", {}).get("embed stage (wall)") for t in (2, 16))
    lanes["speedup_16_over_2"] = round(a / b, 2) if a and b else None
    report["cpu_onnx_lanes_2000_rows"] = lanes
    print("lanes:", json.dumps(lanes), flush=True)
    report["check_seconds"] = round(time.perf_counter() - t0, 1)
    big = runs.get(f"jpeg_{sizes[1]}", {})
    report["targets"] = {
        "embedding_stage_img_s_at_least_5000": (runs[f"jpeg_{sizes[1]}"].get("embed_stage_img_s") or 0) >= 5000,
        "whole_16384_run_after_model_load_at_most_15_s": (big.get("after_model_load_s") or 1e9) <= 15,
    }
    text = json.dumps(report, indent=2)
    gpu = re.sub(r"[^a-z0-9]+", "_", (report["gpu"] or "cpu_dry_run").lower()).strip("_")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{gpu}.json"
    if not dry or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if os.environ.get("OUT"):  # the device tool copies $OUT back
            Path(os.environ["OUT"], out.name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU path at hardware speed, in one prepared command for a lent H100/H200 (<= 5 minutes):

    python -m benchmarks.gpu_check                       # writes benchmarks/results/gpu_check_<gpu>.json
    python -m benchmarks.gpu_check --tiny                # the same steps, tiny, on this CPU (checks the script;
                                                         # --dry-run-cpu is the same)

Steps, each in a fresh `python main.py` (what a user runs), on generated 768x1024 JPEGs in a local
parquet dataset and the real FashionCLIP architecture with random weights, torch fp16 on CUDA:
1. the fp16 model alone at batch 256 (images/s, vectors copied to the host), in this process;
2. standard runs of 4,096 and 16,384 rows without pictures (--max-result-images 0 --max-matrix 0):
   embedding-stage images/s, wall time after the model is loaded, peak host RSS, peak GPU memory;
3. the 4,096-row run with 10% PNGs mixed in (CPU decoding beside the GPU's);
4. --use-segmentation with yolov8l-seg built from its yaml and made to see persons (tests.assets.person_yolo;
   the crops it cut are counted; skipped without ultralytics);
5. the CPU ONNX int8 lanes on 2,000 rows with --threads 2 and --threads 16 (the ratio).
The machine's CPU (model, instruction sets) and GPU are recorded with the figures. The command exits
1 if a step failed (its error is in the report).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import (
    ROOT,
    Assets,
    MainRun,
    encode_picture,
    machine_line,
    make_parser,
    parse_args,
    photo_like,
    run_main_py,
    section_stages,
    write_image_parquet,
)


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    return encode_picture(photo_like(i, *size))


def _png(i: int, size: tuple[int, int]) -> bytes:
    return encode_picture(photo_like(10_000 + i, *size), "PNG")


def make_dataset(folder: Path, n: int, png_share: float = 0.0, unique: int = 256, size=(768, 1024)) -> Path:
    """n rows: `unique` distinct photo-like JPEGs (made in parallel when there are many) repeated,
    every 1/png_share-th row a PNG instead. Decoding costs the same whether or not bytes repeat."""
    target = folder / "data" / "train-00000-of-00001.parquet"
    if target.is_file():
        return folder
    n_png = 16 if png_share else 0
    if unique + n_png > 32:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            jpegs = list(pool.map(_jpeg, range(unique), [size] * unique))
            pngs = list(pool.map(_png, range(n_png), [size] * n_png))
    else:
        jpegs, pngs = [_jpeg(i, size) for i in range(unique)], [_png(i, size) for i in range(n_png)]
    every = round(1 / png_share) if png_share else 0
    rows = (pngs[i % n_png] if every and i % every == every - 1 else jpegs[i % unique] for i in range(n))
    write_image_parquet(target, rows, chunk=512, row_group_size=128)
    return folder


def _gpu_used_mib(pid: int = 0) -> int:
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


def run_main(args: list[str], gpu_memory: bool) -> dict:
    """main.py in a fresh process; its summary parsed, with peak RSS and (sampled) peak GPU memory."""
    run = run_main_py(args, sample=_gpu_used_mib if gpu_memory else None)
    section = "gallery_segment" if "--use-segmentation" in args else "gallery"
    return summarize(run, gpu_memory, Path(args[args.index("--output-dir") + 1]), section)


def summarize(run: MainRun, gpu_memory: bool, out: Path, section: str) -> dict:
    """The run's exit, wall time, memory and stage times by name (from its report section)."""
    res: dict = {"exit": run.returncode, "wall_s": round(run.wall_s, 1)}
    if not run.ok:
        res["error"] = run.stderr[-1500:]
        return res
    res["stages_s"] = stages = section_stages(out, section)
    res["peak_rss_mib"] = run.peak_rss_mib
    if gpu_memory:
        res["peak_gpu_mib"] = run.sampled_peak
    res["after_model_load_s"] = round(run.wall_s - stages.get("load model", 0.0), 1)
    return res


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


def parse(argv: list[str] | None):
    ap = make_parser(__doc__, work=Path(tempfile.gettempdir()) / "fashion-gpu-check")
    ap.add_argument("--dry-run-cpu", dest="tiny", action="store_true", help="the same as --tiny")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: benchmarks/results/gpu_check_<gpu>.json)"
    )
    ap.add_argument("--sizes", default="4096,16384", help="rows of the standard runs; the first also gets PNGs")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=6.0, help="timing of the model alone")
    ap.add_argument("--seg-model", default="yolov8l-seg.yaml")
    ap.add_argument("--seg-rows", type=int, default=256)
    ap.add_argument("--lanes-rows", type=int, default=2000)
    tiny = {"sizes": "16", "batch": 8, "seconds": 0.5, "seg_model": "yolov8n-seg.yaml", "seg_rows": 4, "lanes_rows": 16}
    return parse_args(ap, argv, tiny=tiny)


def standard_runs(args, base: list[str], sizes: list[int], size_wh) -> dict[str, dict]:
    """Steps 2 and 3: the standard runs, and the first size again with 10% PNGs."""
    dry, work, runs = args.tiny, args.work, {}
    unique = 8 if dry else 256
    for n in sizes:
        ds = make_dataset(work / f"jpeg{n}", n, unique=unique, size=size_wh)
        out = ["--dataset", str(ds), "--output-dir", str(work / f"out{n}")]
        runs[f"jpeg_{n}"] = run_main([*base, *out], gpu_memory=not dry)
    mixed = make_dataset(work / f"mixed{sizes[0]}", sizes[0], png_share=0.1, unique=unique, size=size_wh)
    out = ["--dataset", str(mixed), "--output-dir", str(work / "out-mixed")]
    runs[f"jpeg_png10_{sizes[0]}"] = run_main([*base, *out], gpu_memory=not dry)
    for name, r in runs.items():
        stage = r.get("stages_s", {}).get("embed")
        rows = int(name.rsplit("_", 1)[1])
        r["embed_stage_img_s"] = round(rows / stage, 1) if stage else None
        print(name, json.dumps(r), flush=True)
    return runs


def segmentation(args, base: list[str], size: int, assets: Assets) -> dict | str:
    """Step 4: --use-segmentation on the first size's dataset, with the YOLO of --seg-model's yaml made
    to see persons (tests.assets.person_yolo, as benchmarks.segment: random weights find nobody, and
    a stage that cuts nothing leaves out masks, crops, their files and their embedding)."""
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        return "skipped: ultralytics is not installed (carry it as a wheel, see the device README)"
    import numpy as np

    from pipeline.store import read_manifest
    from tests.assets import person_yolo

    weights = args.work / f"person-{Path(args.seg_model).stem}.pt"
    calib_wh = assets.size_wh if args.tiny else (480, 640)  # sides multiples of 32
    person_yolo(args.seg_model, calibration=[np.asarray(assets.photo(100 + i).resize(calib_wh))
                                             for i in range(4)]).save(weights)
    dataset = ["--dataset", str(args.work / f"jpeg{size}"), "--limit", str(args.seg_rows)]
    out = args.work / "out-seg"
    seg = run_main([*base, "--use-segmentation", "--seg-model", str(weights), *dataset, "--output-dir", str(out)],
                   gpu_memory=not args.tiny)
    seg_stage = seg.get("stages_s", {}).get("embed")
    seg["segmentation_stage_img_s"] = round(args.seg_rows / seg_stage, 1) if seg_stage else None
    manifest = out / "embeddings_segment" / "manifest.csv"
    if manifest.is_file():  # the rate means something only where persons were cut
        seg["crops"] = sum(r.person >= 0 and r.status == "ok" for r in read_manifest(manifest))
    return seg


def cpu_lanes(assets: Assets, rows: int, size_wh) -> dict:
    """Step 5: the CPU ONNX int8 lanes with 2 and 16 threads."""
    onnx = assets.onnx()
    ds = make_dataset(assets.work / f"jpeg{rows}", rows, unique=8 if assets.tiny else 256, size=size_wh)
    lanes: dict = {}
    for threads in (2, 16):
        lanes[f"threads_{threads}"] = run_main(
            ["--dataset", str(ds), "--onnx", str(onnx), "--backend", "onnx", "--device", "cpu"]
            + ["--threads", str(threads), "--max-result-images", "0", "--max-matrix", "0"]
            + ["--output-dir", str(assets.work / f"out-lanes{threads}")],
            gpu_memory=False,
        )
    a, b = (lanes[f"threads_{t}"].get("stages_s", {}).get("embed") for t in (2, 16))
    lanes["speedup_16_over_2"] = round(a / b, 2) if a and b else None
    print("lanes:", json.dumps(lanes), flush=True)
    return lanes


def main_runs(report: dict) -> dict[str, dict]:
    """Every main.py run of the report, by name."""
    runs = {**report["standard_runs"]}
    runs.update((f"lanes {k}", v) for k, v in report["cpu_onnx_lanes_2000_rows"].items() if isinstance(v, dict))
    if isinstance(report["segmentation_yolov8l"], dict):
        runs["segmentation"] = report["segmentation_yolov8l"]
    return runs


def print_table(runs: dict[str, dict]) -> None:
    print("\n| run | exit | embedding stage img/s | after model load | peak RSS | peak GPU |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        img_s = r.get("embed_stage_img_s") or r.get("segmentation_stage_img_s") or "-"
        print(
            f"| {name} | {r['exit']} | {img_s} | {r.get('after_model_load_s', '-')} s "
            f"| {r.get('peak_rss_mib', '-')} MiB | {r.get('peak_gpu_mib', '-')} MiB |"
        )


def write_report(report: dict, out: Path | None, dry: bool) -> None:
    """Print the report; write it to --out, or (a real run) to benchmarks/results/gpu_check_<gpu>.json."""
    text = json.dumps(report, indent=2)
    if out is None and not dry:
        gpu = re.sub(r"[^a-z0-9]+", "_", report["gpu"].lower()).strip("_")
        out = ROOT / "benchmarks" / "results" / f"gpu_check_{gpu}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if os.environ.get("OUT"):  # the device tool copies $OUT back
            Path(os.environ["OUT"], out.name).write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from pipeline.machine import cpu_info

    dry = args.tiny
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny to check the script on the CPU", file=sys.stderr)
        return 1
    device = "cpu" if dry else "cuda"
    sizes = [int(s) for s in args.sizes.split(",")]
    assets = Assets.from_args(args)
    report: dict = {
        "machine": cpu_info(),
        "torch": torch.__version__,
        "gpu": None if dry else torch.cuda.get_device_name(0),
    }
    print(machine_line(), report["gpu"] or "(dry run on the CPU)", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = assets.clip()
    report["model_only_img_s"] = model_only(model, device, args.batch, args.seconds)
    print("model only:", report["model_only_img_s"], "img/s", flush=True)
    base = ["--model", str(model), "--backend", "torch", "--device", device, "--batch-size", str(args.batch)]
    base += ["--max-result-images", "0", "--max-matrix", "0", "--limit", "0", "--decode", "device"]
    if not dry:
        base += ["--precision", "fp16"]
    report["standard_runs"] = runs = standard_runs(args, base, sizes, assets.size_wh)
    report["segmentation_yolov8l"] = segmentation(args, base, sizes[0], assets)
    print("segmentation:", report["segmentation_yolov8l"], flush=True)
    report["cpu_onnx_lanes_2000_rows"] = cpu_lanes(assets, args.lanes_rows, assets.size_wh)
    report["check_seconds"] = round(time.perf_counter() - t0, 1)
    biggest = runs.get(f"jpeg_{sizes[-1]}", {})
    report["targets"] = {
        "embedding_stage_img_s_at_least_5000": (biggest.get("embed_stage_img_s") or 0) >= 5000,
        "whole_16384_run_after_model_load_at_most_15_s": (biggest.get("after_model_load_s") or 1e9) <= 15,
    }
    write_report(report, args.out, dry)
    print_table(main_runs(report))
    failed = [name for name, r in main_runs(report).items() if r.get("exit") not in (0, 3)]
    if failed:
        print(f"failed steps: {', '.join(failed)} (their errors are in the report)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

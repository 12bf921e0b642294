"""CUDA paths of the torch backend: parity with fp32 and throughput for fp16 and bitsandbytes 8-bit,
plus onnxruntime's providers and one end-to-end run on the GPU. One short script for a lent GPU:

    python -m benchmarks.gpu_check --out results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, photo_like


def parity(model_dir: Path, pixels: np.ndarray, precisions: list[str], device: str = "cuda") -> dict:
    from pipeline.embedders import TorchEmbedder

    ref = TorchEmbedder(str(model_dir), device="cpu").embed(pixels)
    out = {}
    for p in precisions:
        try:
            e = TorchEmbedder(str(model_dir), device=device, precision=p)
            cos = np.sum(e.embed(pixels) * ref, axis=1)
            out[p] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
        except Exception as ex:  # report, do not stop the whole check
            out[p] = {"error": f"{type(ex).__name__}: {ex}"[:300]}
    return out


def throughput(model_dir: Path, precisions: list[str], batches: list[int], seconds: float = 4.0) -> dict:
    import torch

    from pipeline.embedders import TorchEmbedder

    out = {}
    for p in precisions:
        try:
            e = TorchEmbedder(str(model_dir), device="cuda", precision=p)
        except Exception as ex:
            out[p] = {"error": f"{type(ex).__name__}: {ex}"[:300]}
            continue
        out[p] = {}
        for b in batches:
            x = np.random.default_rng(0).normal(size=(b, 3, 224, 224)).astype(np.float32)
            for _ in range(3):
                e.embed(x)
            torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                e.embed(x)  # returns numpy: includes the host copy, as the pipeline does
                n += b
            out[p][f"batch{b}_img_s"] = round(n / (time.perf_counter() - t), 1)
        del e
        torch.cuda.empty_cache()
    return out


def end_to_end(model_dir: Path, work: Path, n: int = 256) -> dict:
    images = work / "imgs"
    images.mkdir(exist_ok=True)
    for i in range(n):
        photo_like(i).save(images / f"img_{i:04d}.jpg", quality=90)
    res = {}
    for prec in ("auto", "fp16"):
        out = work / f"run_{prec}"
        cmd = [
            sys.executable, str(ROOT / "main.py"), "--dataset", str(images), "--model", str(model_dir), "--backend",
            "torch", "--device", "cuda", "--precision", prec, "--output-dir", str(out), "--batch-size", "64",
            "--max-result-images", "8",
        ]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        res[prec] = {
            "exit": r.returncode,
            "wall_s": round(time.perf_counter() - t, 1),
            "summary": r.stdout.strip().splitlines()[:3],
            "stderr_tail": r.stderr[-400:] if r.returncode else "",
        }
        side = out / "embeddings" / "embeddings.json"
        if side.is_file():
            res[prec]["precision"] = json.loads(side.read_text())["identity"]["precision"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--dry-run-cpu", action="store_true", help="exercise the parity code on the CPU (fp32 only)")
    args = ap.parse_args()
    import torch

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if args.dry_run_cpu:
        from pipeline.preprocess import PreprocessConfig, preprocess_batch
        from tests.assets import save_tiny_clip

        tiny = save_tiny_clip(Path(tempfile.mkdtemp()) / "tiny")
        px = preprocess_batch([photo_like(i, 384, 512) for i in range(4)], PreprocessConfig())
        print(json.dumps(parity(tiny, px, ["fp32"], device="cpu")))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps(report))
        return 1
    report["device"] = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes

        report["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        report["bitsandbytes"] = None
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        report["onnxruntime"] = None
    from pipeline.preprocess import PreprocessConfig, preprocess_batch
    from tests.assets import save_real_arch_clip, save_tiny_clip

    work = Path(tempfile.mkdtemp())
    tiny = save_tiny_clip(work / "tiny")
    real = save_real_arch_clip(work / "real")
    pixels = preprocess_batch([photo_like(i, 384, 512) for i in range(16)], PreprocessConfig())
    precisions = ["fp32", "fp16"] + (["int8"] if report["bitsandbytes"] else [])
    t = time.perf_counter()
    report["parity_tiny"] = parity(tiny, pixels, precisions)
    report["parity_real_arch"] = parity(real, pixels, precisions)
    report["throughput_real_arch"] = throughput(real, precisions, [32, 128])
    report["end_to_end_256_images"] = end_to_end(real, work)
    report["check_seconds"] = round(time.perf_counter() - t, 1)
    text = json.dumps(report, indent=2)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

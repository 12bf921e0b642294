"""Embedding speed on the real FashionCLIP architecture (ViT-B/32, 224, projection 512; random weights):
model-only images/s at batch 1, 8 and 32 for torch fp32, onnxruntime fp32 and onnxruntime int8
(static QDQ, the default export, and dynamic), then the pipeline's embedding stage end to end
(decode + preprocess + infer, from generated 768x1024 JPEGs), all in one run.

    python benchmarks/embed.py [--seconds 6] [--e2e-images 1000]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import make_jpeg_dataset, real_arch_clip, real_arch_onnx


def rate(fn, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    fn(x)
    fn(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(x)
        n += batch
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--e2e-images", type=int, default=1000)
    args = ap.parse_args()
    from pipeline.embedders import OnnxEmbedder, TorchEmbedder, available_cores
    from pipeline.export import fp32_path_for

    clip = real_arch_clip(args.work)
    static = real_arch_onnx(args.work, "static")
    dynamic = real_arch_onnx(args.work, "dynamic")
    backends = {
        "torch fp32": TorchEmbedder(str(clip), device="cpu"),
        "onnxruntime fp32": OnnxEmbedder(fp32_path_for(static), device="cpu"),
        "onnxruntime int8 (static QDQ, default)": OnnxEmbedder(static, device="cpu"),
        "onnxruntime int8 (dynamic)": OnnxEmbedder(dynamic, device="cpu"),
    }
    batches = [1, 8, 32]
    table: dict[str, dict[int, float]] = {}
    for name, emb in backends.items():
        table[name] = {b: rate(emb.embed, b, args.seconds) for b in batches}
        print(f"{name:40s} " + "  ".join(f"b{b}: {table[name][b]:6.1f} img/s" for b in batches), flush=True)
    del backends

    # End to end: the gallery stage (decode + preprocess + thumbnail + infer + shards) on JPEGs.
    from pipeline.dataset import DatasetSpec, count_rows, iter_records
    from pipeline.gallery import GalleryTarget, build_gallery, make_standard_items
    from pipeline.report import RunSummary

    ds = make_jpeg_dataset(args.work, 1000)
    n = min(args.e2e_images, 1000)
    spec = DatasetSpec(str(ds), limit=n)
    out = args.work / "embed-e2e"
    shutil.rmtree(out, ignore_errors=True)
    emb = OnnxEmbedder(static, device="cpu")
    summary = RunSummary(mode="embed e2e")
    build_gallery(
        records=lambda start: iter_records(spec, start), total_rows=count_rows(spec),
        make_items=make_standard_items(emb.preprocess_cfg.decode_min_side), embedder=emb,
        target=GalleryTarget(out / "images", out / "embeddings", parallel_items=True), run_params={}, source={}, summary=summary,
        batch_size=32, progress=False,
    )
    e2e = n / summary.stages["embed stage (wall)"]
    int8 = table["onnxruntime int8 (static QDQ, default)"][32]
    print(f"\ncores: {available_cores()}")
    print("\n| backend | batch 1 | batch 8 | batch 32 |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[b]:.1f}" for b in batches) + " |")
    print(f"| embedding stage end to end (int8 static, batch 32, {n} JPEGs 768x1024) | | | {e2e:.1f} |")
    print(f"\nint8 (static) / torch fp32 at batch 32: {int8 / table['torch fp32'][32]:.2f}x")
    print(f"int8 (dynamic) / torch fp32 at batch 32: {table['onnxruntime int8 (dynamic)'][32] / table['torch fp32'][32]:.2f}x")
    print(f"end to end / int8 model-only at batch 32: {e2e / int8:.0%}")
    for k, v in summary.stages.items():
        print(f"  {k.strip():40s} {v:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

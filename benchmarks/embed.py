"""Embedding speed on the real FashionCLIP architecture (ViT-B/32, 224, projection 512; random weights):
model-only images/s at batch 1, 8 and 32 for torch fp32, onnxruntime fp32 and onnxruntime int8
(static QDQ, the default export, and dynamic), then the pipeline's embedding stage end to end
(decode + preprocess + infer, from generated 768x1024 JPEGs), all in one run; last, this machine's
own GEMM peak in onnxruntime and the ceiling it puts on each backend.

    python -m benchmarks.embed [--seconds 6] [--e2e-images 1000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, make_jpeg_dataset, real_arch_clip, real_arch_onnx


def rate(fn, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    fn(x)
    fn(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(x)
        n += batch
    return n / (time.perf_counter() - t)


def vit_macs(config_dir: Path) -> tuple[float, float]:
    """(MACs per image in the ViT's MatMuls, MACs in its patch-embedding conv), from config.json."""
    import json

    config = json.loads((config_dir / "config.json").read_text())
    v = config["vision_config"]
    d, ff, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    t = patches + 1
    per_layer = t * (4 * d * d + 2 * d * ff) + 2 * t * t * d
    projection = d * config.get("projection_dim", 512)
    return layers * per_layer + projection, patches * 3 * v["patch_size"] ** 2 * d


def gemm_peaks(seconds: float) -> dict[str, float]:
    """onnxruntime's own matrix-multiply speed on this machine (GOP/s, all cores) at the model's
    dominant shape (32 images x 50 tokens, 768 -> 3072): fp32 MatMul, and int8 MatMulInteger
    (uint8 activations x int8 weights, the kernel the int8 model runs): what the model cannot beat."""
    import tempfile

    import onnxruntime as ort

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 32 * 50, 768, 3072
    rng = np.random.default_rng(0)
    graphs = {
        "fp32": (
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "fp32",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                [numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "w")],
            ),
            rng.normal(size=(m, k)).astype(np.float32),
        ),
        "int8": (
            helper.make_graph(
                [helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])],
                "int8",
                [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                [
                    numpy_helper.from_array(rng.integers(-127, 128, size=(k, n)).astype(np.int8), "w"),
                    numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                    numpy_helper.from_array(np.array(0, np.int8), "wz"),
                ],
            ),
            rng.integers(0, 256, size=(m, k)).astype(np.uint8),
        ),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (graph, x) in graphs.items():
            path = f"{tmp}/{name}.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": x})
            best, t_end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < t_end:  # the fastest run: the peak, not the noise
                t = time.perf_counter()
                sess.run(None, {"x": x})
                best = min(best, time.perf_counter() - t)
            out[name] = 2 * m * k * n / best / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--e2e-images", type=int, default=1000)
    args = ap.parse_args()
    print(machine_line(), flush=True)
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
    from pipeline.config import RunConfig
    from pipeline.dataset import DatasetSpec, count_rows, iter_records
    from pipeline.gallery import GalleryTarget, build_gallery
    from pipeline.items import make_standard_items
    from pipeline.report import RunSummary

    ds = make_jpeg_dataset(args.work, 1000)
    n = min(args.e2e_images, 1000)
    spec = DatasetSpec(str(ds), limit=n)
    out = args.work / "embed-e2e"
    shutil.rmtree(out, ignore_errors=True)
    emb = OnnxEmbedder(static, device="cpu")
    summary = RunSummary(mode="embed e2e")
    build_gallery(
        records=lambda start: iter_records(spec, start),
        total_rows=count_rows(spec),
        make_items=make_standard_items(emb.preprocess_cfg.decode_min_side),
        embedder=emb,
        target=GalleryTarget(out / "images", out / "embeddings", parallel_items=True),
        run_params={},
        source={},
        summary=summary,
        batch_size=32,
        shard_rows=RunConfig.shard_rows,  # the product's default, written once in pipeline/config.py
        progress=False,
    )
    e2e = n / summary.stages["embed stage (wall)"]
    int8 = table["onnxruntime int8 (static QDQ, default)"][32]
    print(f"\ncores: {available_cores()}")
    print("\n| backend | batch 1 | batch 8 | batch 32 |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[b]:.1f}" for b in batches) + " |")
    print(f"| embedding stage end to end (int8 static, batch 32, {n} JPEGs 768x1024) | | | {e2e:.1f} |")
    print(f"\nint8 (static) / torch fp32 at batch 32: {int8 / table['torch fp32'][32]:.2f}x")
    print(
        f"int8 (dynamic) / torch fp32 at batch 32: "
        f"{table['onnxruntime int8 (dynamic)'][32] / table['torch fp32'][32]:.2f}x"
    )
    print(f"end to end / int8 model-only at batch 32: {e2e / int8:.0%}")
    # The ceiling: every MatMul at this machine's own GEMM peak and everything else free.
    peaks = gemm_peaks(args.seconds / 2)
    matmul, conv = vit_macs(clip)
    fp32_ceiling = peaks["fp32"] * 1e9 / (2 * (matmul + conv))
    int8_ceiling = 1 / (2 * matmul / (peaks["int8"] * 1e9) + 2 * conv / (peaks["fp32"] * 1e9))  # the conv stays fp32
    print(
        f"\nonnxruntime GEMM peak here: fp32 {peaks['fp32']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s "
        f"({peaks['int8'] / peaks['fp32']:.1f}x)"
    )
    print(f"model: {2 * matmul / 1e9:.2f} GOP in MatMuls + {2 * conv / 1e9:.2f} GOP in the patch conv per image")
    print(
        f"ceiling (all MatMuls at peak, nothing else costs): fp32 {fp32_ceiling:.0f} img/s, int8 {int8_ceiling:.0f} "
        f"img/s "
        f"= {int8_ceiling / table['torch fp32'][32]:.1f}x torch fp32 at most"
    )
    print(
        f"measured int8 (static) = {int8 / int8_ceiling:.0%} of its ceiling; ort fp32 = "
        f"{table['onnxruntime fp32'][32] / fp32_ceiling:.0%} of its ceiling"
    )
    for k, v in summary.stages.items():
        print(f"  {k.strip():40s} {v:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

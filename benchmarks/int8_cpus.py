"""Int8 on CPUs with and without VNNI: speed and accuracy of the int8 exports with 7-bit weights (the
default) and 8-bit weights, on the real FashionCLIP architecture (random weights).

Measured on this CPU: images/s at batch 32 and cosine to the fp32 torch model on the 24 export
verification pictures. On an emulated AVX2 / AVX-512-without-VNNI kernel (tests/int8_emulation.py;
slow, numpy): the same cosine on the first --emulate pictures. Speed on an AVX2-only CPU can only be
measured there: run this script on one.

    python -m benchmarks.int8_cpus [--seconds 6] [--emulate 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, real_arch_clip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--emulate", type=int, default=4, help="pictures run through the emulated AVX2 kernel (0: skip)")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    import torch
    from transformers import CLIPModel

    from pipeline import export
    from pipeline.embedders import OnnxEmbedder, preprocess_config_for_model
    from pipeline.preprocess import preprocess_batch
    from tests.int8_emulation import run_emulated

    clip = real_arch_clip(args.work)
    pixels = preprocess_batch(export.verification_images(), preprocess_config_for_model(str(clip)))
    tower = export._image_tower(CLIPModel.from_pretrained(str(clip), attn_implementation="eager").eval())
    with torch.inference_mode():
        ref = tower(torch.from_numpy(pixels)).numpy()
    rows = []
    for quantization in ("static", "dynamic"):
        for bits, reduce in ((7, True), (8, False)):
            path = args.work / "onnx-bits" / f"fashion_clip_image_int8_{quantization}_{bits}bit.onnx"
            if not path.is_file():
                export.REDUCE_RANGE = reduce
                try:
                    export.export_onnx(str(clip), path, quantization=quantization)
                except Exception as e:  # an 8-bit export may fail its own check; say so and go on
                    print(f"{quantization} {bits}-bit: export failed: {str(e).splitlines()[0]}", flush=True)
                    continue
            emb = OnnxEmbedder(path, device="cpu")
            x = pixels[np.arange(32) % len(pixels)]
            emb.embed(x)
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < args.seconds:
                emb.embed(x)
                n += 32
            speed = n / (time.perf_counter() - t)
            native = export._cosines(export._run(__import__("onnxruntime"), path, pixels), ref)
            emulated = (
                export._cosines(run_emulated(path, pixels[: args.emulate], batch=2), ref[: args.emulate])
                if args.emulate
                else None
            )
            rows.append((quantization, bits, speed, native, emulated))
            print(
                f"{quantization} {bits}-bit: {speed:.1f} img/s; cosine here min {native.min():.5f} mean "
                f"{native.mean():.5f}"
                + (
                    f"; emulated AVX2 min {emulated.min():.5f} mean {emulated.mean():.5f}"
                    if emulated is not None
                    else ""
                ),
                flush=True,
            )
    print(
        "\n| int8 export | weights | img/s here (batch 32) | cosine here min / mean "
        "| emulated AVX2 (no VNNI) min / mean |"
        "\n|---|---|---|---|---|"
    )
    for q, bits, speed, native, emulated in rows:
        emu = f"{emulated.min():.4f} / {emulated.mean():.4f} ({args.emulate} pictures)" if emulated is not None else "-"
        print(f"| {q} | {bits}-bit | {speed:.1f} | {native.min():.4f} / {native.mean():.4f} | {emu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

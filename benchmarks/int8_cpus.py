"""Int8 on CPUs with and without VNNI: speed and accuracy of the int8 exports with 7-bit weights (the
default) and 8-bit weights, on the real FashionCLIP architecture (random weights).

Measured on this CPU: images/s at batch 32 and cosine to the fp32 torch model on the 24 export
verification pictures. On an emulated AVX2 / AVX-512-without-VNNI kernel (tests/int8_emulation.py;
slow, numpy): the same cosine on the first --emulate pictures. Speed on an AVX2-only CPU can only be
measured there: run this script on one. Its kernels on this CPU, where CPUID can be masked:
`python -m benchmarks.cpu_kind avx2 -- python -m benchmarks.int8_cpus` (the figures then are that
kernel's on this machine, not an AVX2-only CPU's).

    python -m benchmarks.int8_cpus [--seconds 6] [--emulate 4] [--quantizations static,dynamic]
    python -m benchmarks.int8_cpus --tiny             # tiny model, static exports, one emulated picture
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Assets, machine_line, make_parser, parse_args


def reference(clip: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 24 export verification pictures, preprocessed, and the fp32 torch model's vectors for them."""
    import torch
    from transformers import CLIPModel

    from pipeline import export
    from pipeline.embedders import preprocess_config_for_model
    from pipeline.preprocess import preprocess_batch

    pixels = preprocess_batch(export.verification_images(), preprocess_config_for_model(str(clip)))
    tower = export.image_tower(CLIPModel.from_pretrained(str(clip), attn_implementation="eager").eval())
    with torch.inference_mode():
        return pixels, tower(torch.from_numpy(pixels)).numpy()


def int8_export(assets: Assets, quantization: str, reduce_range: bool) -> Path | None:
    """The int8 export with 7-bit weights (reduce_range) or 8-bit weights: the default setting's is
    the one every benchmark uses; None, said why, if it failed its own check."""
    from pipeline import export
    from pipeline.errors import PipelineError

    if reduce_range == export.REDUCE_RANGE:
        return assets.onnx(quantization)
    bits = 7 if reduce_range else 8
    path = assets.work / "onnx-bits" / f"{assets.model_tag}_image_int8_{quantization}_{bits}bit.onnx"
    if path.is_file():
        return path
    default, export.REDUCE_RANGE = export.REDUCE_RANGE, reduce_range
    try:
        export.export_onnx(str(assets.clip()), path, quantization=quantization)
    except PipelineError as e:  # an 8-bit export may fail its own check; say so and go on
        print(f"{quantization} {bits}-bit: export failed: {str(e).splitlines()[0]}", flush=True)
        return None
    finally:
        export.REDUCE_RANGE = default  # later exports in this process get the default again
    return path


def measure(path: Path, pixels: np.ndarray, ref: np.ndarray, seconds: float, emulate: int):
    """(images/s at batch 32, cosines here, cosines on the emulated AVX2 kernel or None)."""
    import onnxruntime as ort

    from pipeline import export
    from pipeline.embedders import OnnxEmbedder
    from tests.int8_emulation import run_emulated

    emb = OnnxEmbedder(path, device="cpu")
    x = pixels[np.arange(32) % len(pixels)]
    emb.embed(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        emb.embed(x)
        n += 32
    speed = n / (time.perf_counter() - t)
    native = export.feature_cosines(export.run_onnx(ort, path, pixels), ref)
    emulated = export.feature_cosines(run_emulated(path, pixels[:emulate], batch=2), ref[:emulate]) if emulate else None
    return speed, native, emulated


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--emulate", type=int, default=4, help="pictures run through the emulated AVX2 kernel (0: skip)")
    ap.add_argument("--quantizations", default="static,dynamic", help="int8 exports to compare, comma-separated")
    args = parse_args(ap, argv, tiny={"seconds": 0.1, "emulate": 1, "quantizations": "static"})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    pixels, ref = reference(assets.clip())
    rows = []
    for quantization in args.quantizations.split(","):
        for bits, reduce_range in ((7, True), (8, False)):
            path = int8_export(assets, quantization, reduce_range)
            if path is None:
                continue
            speed, native, emulated = measure(path, pixels, ref, args.seconds, args.emulate)
            rows.append((quantization, bits, speed, native, emulated))
            emu = f"; emulated AVX2 min {emulated.min():.5f} mean {emulated.mean():.5f}" if emulated is not None else ""
            print(
                f"{quantization} {bits}-bit: {speed:.1f} img/s; cosine here min {native.min():.5f} mean "
                f"{native.mean():.5f}{emu}",
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
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

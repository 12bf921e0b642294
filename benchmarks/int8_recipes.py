"""Static int8 recipes side by side (issue 29): each made from the same fp32 export of the real
FashionCLIP architecture (random weights) with onnxruntime's quantize_static, the same calibration
pictures and 7-bit weights, then measured in one run: img/s at batch 32 (one session, every core,
the pipeline's session options), kernel time by op type and the share of format conversion
(Quantize/DequantizeLinear) and float Adds, cosine to the fp32 file on the 24 export verification
pictures, and whether one picture alone gives the same vector as in the batch.

    python -m benchmarks.int8_recipes [--seconds 6] [--recipes default,float-out,...]
    python -m benchmarks.int8_recipes --tiny          # tiny model: checks the script
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Assets, machine_line, make_parser, parse_args

# name -> (what it is, quantize_static keyword arguments over the common ones)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qdq-out": ("MatMul, output quantized (the default until 2026-12-03: QLinearMatMul + DequantizeLinear)",
                {"op_types_to_quantize": ["MatMul"]}),
    "float-out": ("MatMul, output left in float (the file the export writes now: MatMulIntegerToFloat)",
                  {"op_types_to_quantize": ["MatMul"],
                   "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "float-out+bias": ("the same as the CPU session runs it: each bias Add fused into MatMulIntegerToFloat "
                       "(pipeline/int8graph.py)",
                       {"op_types_to_quantize": ["MatMul"], "_cpu_graph": True,
                        "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "s8s8+bias": ("float-out+bias with int8 activations (s8s8) instead of uint8 (u8s8): VNNI's int8 dot "
                  "product takes u8 x s8, AMX takes either",
                  {"op_types_to_quantize": ["MatMul"], "_cpu_graph": True, "activation_type": "QInt8",
                   "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "conv-too+bias": ("float-out+bias with the patch convolution quantized too (QLinearConv, its output uint8; "
                      "the file the export writes since 2026-12-04)",
                      {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True,
                       "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "float-out-per-tensor": ("the same with per-tensor weight scales",
                             {"op_types_to_quantize": ["MatMul"], "per_channel": False,
                              "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "add-too": ("MatMul and Add quantized (bias and residual Adds: QLinearAdd)",
                {"op_types_to_quantize": ["MatMul", "Add"]}),
    "all-ops": ("MatMul, Add, Mul, Softmax, Transpose, Reshape quantized (activations int8 throughout)",
                {"op_types_to_quantize": ["MatMul", "Add", "Mul", "Softmax", "Transpose", "Reshape"]}),
}


def make_recipe(fp32: Path, pre: Path, out: Path, calib: np.ndarray, kwargs: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.export import REDUCE_RANGE, calibration_reader

    Reader = calibration_reader(calib)  # as the export calibrates
    if not pre.is_file():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    kwargs = dict(kwargs)
    fuse = kwargs.pop("_cpu_graph", False)
    if isinstance(kwargs.get("activation_type"), str):
        kwargs["activation_type"] = getattr(QuantType, kwargs["activation_type"])
    args: dict[str, Any] = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, per_channel=True,
                                calibrate_method=CalibrationMethod.MinMax, reduce_range=REDUCE_RANGE)
    quantize_static(str(pre), str(out), Reader(), **{**args, **kwargs})
    if fuse:  # the graph a CPU session runs (pipeline/int8graph.py)
        import onnx
        from pipeline.int8graph import fuse_bias, fuse_gelu, shapes_of_quantized

        model = onnx.load(str(out))
        fuse_bias(model)
        fuse_gelu(model)
        shapes_of_quantized(model)
        onnx.save(model, str(out))


def measure(path: Path, fp32_out: np.ndarray, pixels: np.ndarray, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    from benchmarks.embed import CONVERSION, op_profile, rate
    from pipeline.embedders import _session_options, available_cores
    from pipeline.export import feature_cosines

    sess = ort.InferenceSession(str(path), _session_options(ort, available_cores()), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": pixels})[0]
    alone = sess.run(None, {"pixel_values": pixels[:1]})[0]
    cos = feature_cosines(got, fp32_out)
    hw = pixels.shape[2:]
    shares = op_profile(path, 32, 3)
    return {
        "img_s": rate(lambda x: sess.run(None, {"pixel_values": x}), 32, seconds, (int(hw[0]), int(hw[1]))),
        "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
        "alone_equal": bool(np.array_equal(alone[0], got[0])),
        "conversion": sum(shares.get(op, 0.0) for op in CONVERSION), "shares": shares,
    }


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES))
    args = parse_args(ap, argv, tiny={"seconds": 0.1})
    print(machine_line(), flush=True)
    import onnxruntime as ort

    from pipeline import export
    from pipeline.embedders import OnnxEmbedder, _session_options, available_cores

    assets = Assets.from_args(args)
    fp32 = export.fp32_path_for(assets.onnx("static"))
    prep = OnnxEmbedder(assets.onnx("static")).preprocess_cfg
    calib = export.preprocess_batch(export.verification_images(64, seed=1), prep)  # as the export calibrates
    pixels = export.preprocess_batch(export.verification_images(), prep)
    fp32_out = ort.InferenceSession(str(fp32), _session_options(ort, available_cores()),
                                    providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
    folder = assets.work / "int8-recipes" / assets.model_tag
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.recipes.split(","):
        what, kwargs = RECIPES[name]
        path = folder / f"{name}.onnx"
        if not path.is_file():
            make_recipe(fp32, folder / "pre.onnx", path, calib, kwargs)
        rows[name] = m = measure(path, fp32_out, pixels, args.seconds)
        top = ", ".join(f"{op} {s:.1%}" for op, s in list(m["shares"].items())[:7])
        print(f"{name}: {what}\n  {m['img_s']:.1f} img/s, conversion + float Add {m['conversion']:.1%}; {top}",
              flush=True)
    base = rows.get("qdq-out")
    print("\n| recipe | img/s, batch 32 | vs qdq-out | conversion + Add | cosine to fp32, min / mean "
          "| alone = in batch |")
    print("|---|---|---|---|---|---|")
    for name, m in rows.items():
        ratio = f"{m['img_s'] / base['img_s']:.2f}x" if base else "—"
        print(f"| {name} | {m['img_s']:.1f} | {ratio} | {m['conversion']:.1%} | {m['cos_min']:.4f} / "
              f"{m['cos_mean']:.4f} | {'yes' if m['alone_equal'] else 'no'} |")
    print(f"\nthe bar of the probes: cosine >= {export.INT8_MIN_COSINE} (min), >= {export.INT8_MEAN_COSINE} (mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Static int8 recipes side by side (issue 29): each made from the same fp32 export of the real
FashionCLIP architecture (random weights) with onnxruntime's quantize_static, the same calibration
pictures and 7-bit weights, then measured in one run: img/s at batch 32 (one session, every core,
the pipeline's session options), kernel time by op type and the share of format conversion
(Quantize/DequantizeLinear) and float Adds, cosine to the fp32 file on the 24 export verification
pictures, and whether one picture alone gives the same vector as in the batch.

    python -m benchmarks.int8_recipes [--seconds 6] [--rounds 3] [--recipes qdq-out,conv-too+bias,...]
    python -m benchmarks.int8_recipes --tiny          # tiny model: checks the script
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Assets, OtherLoad, alternating, machine_line, make_parser, parse_args

# name -> (what it is, quantize_static keyword arguments over the common ones)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qdq-out": ("MatMul, output quantized (the default until 2026-12-03: QLinearMatMul + DequantizeLinear)",
                {"op_types_to_quantize": ["MatMul"]}),
    "float-out": ("MatMul, output left in float (onnxruntime runs it as MatMulIntegerToFloat)",
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
                      "the export's graph since 2026-12-04, saved so by it)",
                      {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True,
                       "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "float-out-per-tensor": ("float-out with per-tensor weight scales",
                             {"op_types_to_quantize": ["MatMul"], "per_channel": False,
                              "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "attn-float+bias": ("conv-too+bias with the two attention products (q.k and p.v, both inputs activations) left "
                        "in float: no QuantizeLinear of q, k, v and the softmax per layer",
                        {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True, "_float_attention": True,
                         "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "optimizer-static": ("onnxruntime's transformer optimizer (model type clip: fused Attention, SkipLayerNorm) "
                         "before float-out: the fused Attention stays fp32",
                         {"_optimizer": True, "op_types_to_quantize": ["MatMul"],
                          "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "optimizer-qattention": ("the transformer optimizer, then quantize_dynamic with its Attention quantized "
                             "(contrib QAttention; onnxruntime quantizes Attention only dynamically, so "
                             "batch-dependent)",
                             {"_optimizer": True, "_dynamic": True, "op_types_to_quantize": ["MatMul", "Attention"]}),
    "optimizer-qattention-static": ("the same made batch-independent: each DynamicQuantizeLinear replaced by a "
                                    "QuantizeLinear of ranges calibrated as the export's (MinMax, the same 64 "
                                    "pictures), "
                                    "each MatMulInteger + Cast + Mul + bias Add by one MatMulIntegerToFloat",
                                    {"_optimizer": True, "_dynamic": True, "_static_ranges": True,
                                     "op_types_to_quantize": ["MatMul", "Attention"]}),
    "nbits8": ("onnxruntime's weight-only MatMulNBits, 8-bit weights in blocks of 32 along K, int8 compute "
               "(accuracy_level 4: each row of activations quantized in the kernel, so no QuantizeLinear and no "
               "calibration); the patch convolution fp32",
               {"_nbits": 32}),
    "skip-ln+bias": ("conv-too+bias with each residual Add and the LayerNorm after it as one "
                     "SkipLayerNormalization (contrib): no float Add between the layers",
                     {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True, "_post": "skip_layer_norm",
                      "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "qgemm-gelu+bias": ("conv-too+bias with each MLP's first MatMul as QGemm with a uint8 output (its range "
                        "calibrated as the export's), the GELU in uint8 (CLIP's x*sigmoid(1.702x): QLinearSigmoid, "
                        "QLinearMul into the second MatMul's input scale; a tanh or exact GELU two "
                        "QLinearMuls more): no QuantizeLinear on the 3,072 GELU "
                        "outputs",
                        {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True, "_post": "uint8_gelu",
                         "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "attn-float+qgemm-gelu": ("attn-float+bias and qgemm-gelu+bias together: the fewest QuantizeLinear of the "
                              "recipes here (the export's AMX profile, --int8-profile amx)",
                              {"op_types_to_quantize": ["MatMul", "Conv"], "_cpu_graph": True, "_float_attention": True,
                               "_post": "uint8_gelu",
                               "extra_options": {"OpTypesToExcludeOutputQuantization": ["MatMul"]}}),
    "add-too": ("MatMul and Add quantized (bias and residual Adds: QLinearAdd)",
                {"op_types_to_quantize": ["MatMul", "Add"]}),
    "all-ops": ("MatMul, Add, Mul, Softmax, Transpose, Reshape quantized (activations int8 throughout)",
                {"op_types_to_quantize": ["MatMul", "Add", "Mul", "Softmax", "Transpose", "Reshape"]}),
}


def calibration_pixels(prep: Any) -> np.ndarray:
    """The pictures the recipes are calibrated on, as the export calibrates (64 of its generated
    pictures, not the verification set), preprocessed by `prep`."""
    from pipeline import export

    return export.preprocess_batch(export.verification_images(64, seed=1), prep)


def recipe_file(folder: Path, fp32: Path, name: str, calib: Callable[[], np.ndarray],
                heads_width: tuple[int, int] = (0, 0)) -> Path:
    """RECIPES[name]'s file of the fp32 file in `folder`, made where it is not there yet (calib:
    the calibration pixels, asked for only then); an optimizer recipe's named by the heads and
    width it was fused for."""
    kwargs = RECIPES[name][1]
    fused_for = f"-{heads_width[0]}x{heads_width[1]}" if kwargs.get("_optimizer") else ""
    path = folder / f"{name}{fused_for}.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_recipe(fp32, folder / "pre.onnx", path, calib(), kwargs, heads_width)
    return path


def make_recipe(fp32: Path, pre: Path, out: Path, calib: np.ndarray, kwargs: dict[str, Any],
                heads_width: tuple[int, int] = (0, 0)) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.export import REDUCE_RANGE, calibration_reader

    Reader = calibration_reader(calib)  # as the export calibrates
    kwargs = dict(kwargs)
    fuse, dynamic = kwargs.pop("_cpu_graph", False), kwargs.pop("_dynamic", False)
    static_ranges = kwargs.pop("_static_ranges", False)
    float_attention = kwargs.pop("_float_attention", False)
    post, nbits = kwargs.pop("_post", None), kwargs.pop("_nbits", 0)
    if nbits:
        nbits_weights(fp32, out, nbits)
        return
    if kwargs.pop("_optimizer", False):
        heads, width = heads_width
        source = pre.with_name(f"optimized-{heads}x{width}.onnx")  # by what it was made for
        if not source.is_file():
            from onnxruntime.transformers.optimizer import optimize_model

            # the tower's heads and width from its config: with 0, 0 its Attention is not fused
            optimize_model(str(fp32), model_type="clip", num_heads=heads, hidden_size=width).save_model_to_file(
                str(source))
    else:
        source = pre
        if not pre.is_file():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    if dynamic:
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=REDUCE_RANGE, **kwargs)
        if static_ranges:
            with_static_ranges(out, source, calib)
        return
    if isinstance(kwargs.get("activation_type"), str):
        kwargs["activation_type"] = getattr(QuantType, kwargs["activation_type"])
    args: dict[str, Any] = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, per_channel=True,
                                calibrate_method=CalibrationMethod.MinMax, reduce_range=REDUCE_RANGE)
    if float_attention:  # a copy whose nodes all have names, which the quantizer matches them by
        source, kwargs["nodes_to_exclude"] = activation_products(source, out.with_name(f"{source.stem}-named.onnx"))
    quantize_static(str(source), str(out), Reader(), **{**args, **kwargs})
    if fuse:  # the graph the export saves (pipeline/int8graph.py); a uint8_gelu recipe's GELUs as its AMX profile's
        from pipeline.export import _save_cpu_graph, uint8_gelus_of

        _save_cpu_graph(out, (lambda m: uint8_gelus_of(m, calib)) if post == "uint8_gelu" else None)
    if post == "skip_layer_norm":
        skip_layer_norm(out)


def nbits_weights(fp32: Path, out: Path, block: int) -> None:
    """Every MatMul with a constant weight as MatMulNBits: 8-bit symmetric weights in blocks of `block`
    along K, int8 compute (accuracy_level 4), by onnxruntime's own quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    import onnx

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=block, is_symmetric=True,
                                     accuracy_level=4, algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))


def skip_layer_norm(path: Path) -> None:
    """Rewrite in place: each Add whose only other reader is a LayerNormalization over the last axis,
    and that LayerNormalization, as one SkipLayerNormalization (com.microsoft); the sum, where other
    nodes read it (the residual stream), is its fourth output."""
    import onnx
    from onnx import helper
    from pipeline.int8graph import _graph_maps, _set_nodes

    model = onnx.load(str(path))
    _, producer, graph_outputs, users = _graph_maps(model.graph)
    drop, replace = set(), {}
    for ln in model.graph.node:
        attrs = {a.name: a for a in ln.attribute}
        add = producer.get(ln.input[0]) if ln.op_type == "LayerNormalization" else None
        if add is None or add.op_type != "Add" or id(add) in drop or ("axis" in attrs and attrs["axis"].i != -1):
            continue
        total = add.output[0]
        kept = total in graph_outputs or any(u is not ln for u in users.get(total, []))
        replace[id(ln)] = helper.make_node(
            "SkipLayerNormalization", [add.input[0], add.input[1], *ln.input[1:3]],
            [ln.output[0], "", "", total if kept else ""], domain="com.microsoft", name=ln.name + "_skip",
            epsilon=attrs["epsilon"].f if "epsilon" in attrs else 1e-5)
        drop.add(id(add))
    _set_nodes(model, [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop])
    onnx.save(model, str(path))


def activation_products(path: Path, named: Path) -> tuple[Path, list[str]]:
    """The MatMuls of the file at `path` whose inputs are both activations (a transformer's
    attention products; pipeline.int8graph.activation_products, as the AMX profile finds them):
    (the file to quantize, their names). Unnamed ones are named in a copy at `named`, which is then
    the file; `path` is left as it is (other recipes start from it)."""
    import onnx
    from pipeline.int8graph import activation_products as products

    model = onnx.load(str(path))
    before = [n.name for n in model.graph.node]
    names = products(model)
    if [n.name for n in model.graph.node] == before:
        return path, names
    onnx.save(model, str(named))
    return named, names


def with_static_ranges(path: Path, fp32: Path, calib: np.ndarray) -> None:
    """Rewrite, in place, a dynamically quantized file to fixed activation ranges: each
    DynamicQuantizeLinear(x) becomes QuantizeLinear(x) with the scale and zero point onnxruntime's
    MinMax calibration gives x on `calib` (run through the fp32 file `fp32`, whose tensor names the
    quantizer kept), so QAttention and the MatMuls read constants; each MatMulInteger -> Cast ->
    Mul(Mul(x_scale, w_scale)) [-> Add(bias)] becomes one MatMulIntegerToFloat (onnxruntime fuses that
    chain itself only while x_scale is computed, not once it is a constant it folds)."""
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    import onnx
    from onnx import helper, numpy_helper
    from pipeline.embedders import _session_options, available_cores
    from pipeline.export import output_ranges
    from pipeline.int8graph import _graph_maps, _set_nodes

    model = onnx.load(str(path))
    graph = model.graph
    dql = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    names = list(dict.fromkeys(n.input[0] for n in dql))
    ranges = output_ranges(onnx.load(str(fp32)), names, calib, options=_session_options(ort, available_cores()))
    lo, hi = {k: r[0] for k, r in zip(names, ranges)}, {k: r[1] for k, r in zip(names, ranges)}
    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (xq, scale, zero) = node.input[0], node.output
        zp, s = compute_scale_zp(np.array(lo[x], np.float32), np.array(hi[x], np.float32), np.array(0, np.uint8),
                                 np.array(255, np.uint8))  # as onnxruntime's quantizer computes them
        graph.initializer.extend([numpy_helper.from_array(np.asarray(s, np.float32), scale),
                                  numpy_helper.from_array(np.asarray(zp, np.uint8), zero)])
        nodes.append(helper.make_node("QuantizeLinear", [x, scale, zero], [xq], name=node.name + "_static"))
    _set_nodes(model, nodes)
    inits, producer, _, users = _graph_maps(graph)
    activation_scales = {n.output[1] for n in dql}

    def only_user(name: str) -> Any:
        got = users.get(name, [])
        return got[0] if len(got) == 1 else None

    drop, replace = set(), {}
    for mm in graph.node:
        cast = only_user(mm.output[0]) if mm.op_type == "MatMulInteger" else None
        to_float = cast is not None and cast.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in cast.attribute)
        mul = only_user(cast.output[0]) if to_float else None
        if mul is None or mul.op_type != "Mul":
            continue
        scales = producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
        if scales is None or scales.op_type != "Mul" or only_user(scales.output[0]) is not mul:
            continue
        a_scale, b_scale = scales.input if scales.input[0] in activation_scales else scales.input[::-1]
        if a_scale not in activation_scales:
            continue
        a, b = mm.input[0], mm.input[1]
        add, bias = only_user(mul.output[0]), None
        if add is not None and add.op_type == "Add" and b in inits:
            other = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
            if other in inits and list(inits[other].dims) == [inits[b].dims[-1]]:
                bias = other
        a_zp, b_zp = (list(mm.input[2:4]) + ["", ""])[:2]
        out = add.output[0] if bias else mul.output[0]
        replace[id(mm)] = helper.make_node("MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zp, b_zp]
                                           + ([bias] if bias else []), [out], domain="com.microsoft",
                                           name=mm.name + "_to_float")
        drop.update({id(cast), id(mul), id(scales)} | ({id(add)} if bias else set()))
    _set_nodes(model, [replace.get(id(n), n) for n in graph.node if id(n) not in drop])
    onnx.save(model, str(path))


def _heads_width(model: Path) -> tuple[int, int]:
    """(attention heads, width) of a transformers CLIP/SigLIP image tower, from its config.json, for
    onnxruntime's transformer optimizer."""
    config = model / "config.json"
    if not config.is_file():
        raise SystemExit(f"the optimizer recipes need a transformers model folder with config.json; {model} has none")
    vision = json.loads(config.read_text())["vision_config"]
    return int(vision["num_attention_heads"]), int(vision["hidden_size"])


def _count_ops(path: Path, ops: tuple[str, ...]) -> int:
    import onnx

    return sum(n.op_type in ops for n in onnx.load(str(path), load_external_data=False).graph.node)


def measure(path: Path, fp32_out: np.ndarray, pixels: np.ndarray, seconds: float, keep: bool = False) -> dict[str, Any]:
    """The recipe's figures; keep: its session stays open (under "rate") for more rounds."""
    import onnxruntime as ort

    from benchmarks.embed import op_profile, rate
    from pipeline.embedders import _session_options, available_cores
    from pipeline.export import feature_cosines
    from pipeline.onnxspeed import conversion_share

    sess = ort.InferenceSession(str(path), _session_options(ort, available_cores()), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": pixels})[0]
    alone = sess.run(None, {"pixel_values": pixels[:1]})[0]
    cos = feature_cosines(got, fp32_out)
    hw = pixels.shape[2:]
    shares = op_profile(path, 32, 3)
    run = partial(rate, lambda x: sess.run(None, {"pixel_values": x}), 32, seconds, (int(hw[0]), int(hw[1])))
    first = run()
    return {
        "img_s": first, "rates": [first], **({"rate": run} if keep else {}),
        "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
        "alone_equal": bool(np.array_equal(alone[0], got[0])),
        "conversion": conversion_share(shares), "shares": shares,
    }


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES))
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every recipe's rate this many times, in alternating order, and give the median "
                         "(on a VM whose speed drifts, the figures of one round compare)")
    args = parse_args(ap, argv, tiny={"seconds": 0.1})
    print(machine_line(), flush=True)
    import onnxruntime as ort

    from pipeline import export
    from pipeline.embedders import OnnxEmbedder, _session_options, available_cores

    assets = Assets.from_args(args)
    fp32 = export.fp32_path_for(assets.onnx("static"))
    prep = OnnxEmbedder(assets.onnx("static")).preprocess_cfg
    calib = calibration_pixels(prep)
    pixels = export.preprocess_batch(export.verification_images(), prep)
    fp32_out = ort.InferenceSession(str(fp32), _session_options(ort, available_cores()),
                                    providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
    names = args.recipes.split(",")
    if unknown := [n for n in names if n not in RECIPES]:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    heads_width = _heads_width(assets.clip()) if any(RECIPES[n][1].get("_optimizer") for n in names) else (0, 0)
    folder = assets.work / "int8-recipes" / assets.model_tag
    rows = {}
    loads: list[OtherLoad] = []  # each measurement's: was the machine shared while it ran?
    for name in names:
        what = RECIPES[name][0]
        path = recipe_file(folder, fp32, name, lambda: calib, heads_width)
        with OtherLoad(label=f"{name}, round 1") as load:
            rows[name] = m = measure(path, fp32_out, pixels, args.seconds, keep=args.rounds > 1)
        loads.append(load)
        attention = _count_ops(path, ("Attention", "QAttention"))
        if attention:
            what += f" [{attention} fused Attention ops in the file]"
        top = ", ".join(f"{op} {s:.1%}" for op, s in list(m["shares"].items())[:7])
        print(f"{name}: {what}\n  {m['img_s']:.1f} img/s, conversion + float Add {m['conversion']:.1%}; {top}",
              flush=True)
    for r, (name, m) in alternating(list(rows.items()), args.rounds, start=1):  # round 1 ran as each was made
        with OtherLoad(label=f"{name}, round {r + 1}") as load:
            m["rates"].append(m["rate"]())
        loads.append(load)
    worst = OtherLoad.worst(loads)
    if worst is not None and (note := worst.note(f"{worst.label} (the most shared of {len(loads)} measurements)")):
        print(note, flush=True)
    if args.rounds > 1:
        print(f"\nrates in {args.rounds} rounds, alternating order (img/s, batch 32):")
        for name, m in rows.items():
            m["img_s"] = float(np.median(m["rates"]))
            print(f"  {name}: median {m['img_s']:.1f} of " + ", ".join(f"{x:.1f}" for x in m["rates"]))
    base_name = "qdq-out" if "qdq-out" in rows else names[0]
    base = rows[base_name]
    print(f"\n| recipe | img/s, batch 32 | vs {base_name} | conversion + Add | cosine to fp32, min / mean "
          "| alone = in batch |")
    print("|---|---|---|---|---|---|")
    for name, m in rows.items():
        ratio = f"{m['img_s'] / base['img_s']:.2f}x"
        print(f"| {name} | {m['img_s']:.1f} | {ratio} | {m['conversion']:.1%} | {m['cos_min']:.4f} / "
              f"{m['cos_mean']:.4f} | {'yes' if m['alone_equal'] else 'no'} |")
    print(f"\nthe bar of the probes: cosine >= {export.INT8_MIN_COSINE} (min), >= {export.INT8_MEAN_COSINE} (mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

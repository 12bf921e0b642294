"""Embedding speed on the real FashionCLIP architecture (ViT-B/32, 224, projection 512; random weights):
model-only images/s at batch 1, 8 and 32 for torch fp32, onnxruntime fp32 and onnxruntime int8
(static QDQ, the default export, and dynamic), then the pipeline's embedding stage end to end
(decode + preprocess + infer, from generated 768x1024 JPEGs), all in one run; this machine's own
GEMM peak in onnxruntime and the ceiling it puts on each backend; where each int8 file's kernel
time goes, by op type (onnxruntime's profiler, batch 32); last, the same model-only rates for
Marqo-FashionSigLIP's architecture (open_clip ViT-B-16-SigLIP: ViT-B/16 at 224, 196 patches
against 49; random weights, exported and verified by the pipeline's own --export-onnx), so that
the price of the better model is measured on the same machine in the same run; or, with --compare
rn50 or convnext, for a convolutional tower, open_clip's RN50 or ConvNeXt-T (its int8 file's kernel
time by op type too). Where OpenVINO is installed, the same fp32 and int8 files on it
(--onnx-runtime openvino) beside onnxruntime, and with --e2e-runtime openvino end to end too.

    python -m benchmarks.embed [--seconds 6] [--e2e-images 1000] [--compare fashion-siglip|rn50|convnext|none|DIR]
    python -m benchmarks.embed --compare none --e2e-decode cpu,cpu-simd --e2e-rounds 3  # both CPU resizers, end to end
    python -m benchmarks.embed --compare none --e2e-runtime onnxruntime,openvino --e2e-rounds 2  # both runtimes
    python -m benchmarks.embed --tiny                 # tiny models, 16 small JPEGs, static int8 only: checks the script
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import (
    Assets,
    OtherLoad,
    has_openvino,
    machine_line,
    make_parser,
    parse_args,
    real_arch_convnext,
    real_arch_fashion_siglip,
    real_arch_rn50,
    stage_seconds,
    tiny_convnext,
    tiny_fashion_siglip,
    tiny_rn50,
)
from pipeline.errors import PipelineError, first_line

if TYPE_CHECKING:
    from pipeline.report import RunSummary

STATIC, DYNAMIC = "onnxruntime int8 (static, default)", "onnxruntime int8 (dynamic)"
# --onnx-runtime openvino on the same files (measured where `pip install openvino` was run)
OV_STATIC, OV_FP32 = "openvino int8 (static, the VNNI graph)", "openvino fp32 (the same file)"
RUNTIMES = ("onnxruntime", "openvino")


def rate(fn, batch: int, seconds: float, hw: tuple[int, int] = (224, 224)) -> float:
    x = np.random.default_rng(0).normal(size=(batch, 3, *hw)).astype(np.float32)
    fn(x)
    fn(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(x)
        n += batch
    return n / (time.perf_counter() - t)


def tower_gops(assets: Assets) -> float:
    """GOP per image (2 x multiply-adds) in the image tower's matrix products and convolutions, as
    torch's flop counter counts them on the torch model at batch 1: the work every backend must do,
    for any model family."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.embedders import TorchEmbedder

    emb = TorchEmbedder(str(assets.clip()), device="cpu")
    hw = (emb.preprocess_cfg.crop_height, emb.preprocess_cfg.crop_width)
    # The model called as it is, gradients on: the counter's module tracker fails on a timm
    # attention pool's parameters under inference mode (the embedder's own). Attention in torch's
    # math kernel, whose matrix products the counter counts (it has no formula for the fused CPU
    # kernel's).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        emb.model.get_image_features(pixel_values=torch.zeros((1, 3, *hw)))
    return counter.get_total_flops() / 1e9


def gemm_peaks(seconds: float) -> dict[str, float]:
    """onnxruntime's own matrix-multiply speed on this machine (GOP/s, all cores) at the model's
    dominant shape (32 images x 50 tokens, 768 -> 3072): fp32 MatMul, and int8 MatMulInteger
    (uint8 activations x int8 weights, the kernel the int8 model runs): what the model cannot beat."""
    import tempfile

    import onnxruntime as ort

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from pipeline.embedders import _session_options, available_cores

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
            # the pipeline's options: as many threads as cores this process may use (a pinned run:
            # onnxruntime's default counts the machine's)
            opts = _session_options(ort, available_cores())
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": x})
            best, t_end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < t_end:  # the fastest run: the peak, not the noise
                t = time.perf_counter()
                sess.run(None, {"x": x})
                best = min(best, time.perf_counter() - t)
            out[name] = 2 * m * k * n / best / 1e9
    return out


def model_rates(assets: Assets, seconds: float, batches: list[int], int8: list[str]) -> dict[str, dict[int, float]]:
    """Images/s of each backend's model alone, at each batch size; int8: the int8 exports measured
    (static, dynamic)."""
    from pipeline.embedders import EmbedderSpec, OnnxEmbedder, TorchEmbedder, make_embedder
    from pipeline.export import fp32_path_for

    static = assets.onnx("static")
    backends = {
        "torch fp32": lambda: TorchEmbedder(str(assets.clip()), device="cpu"),
        "onnxruntime fp32": lambda: OnnxEmbedder(fp32_path_for(static), device="cpu"),
        STATIC: lambda: OnnxEmbedder(static, device="cpu"),
    }
    if "dynamic" in int8:
        backends[DYNAMIC] = lambda: OnnxEmbedder(assets.onnx("dynamic"), device="cpu")
    if has_openvino():
        def on_openvino(path: Path):
            return lambda: make_embedder(EmbedderSpec(onnx=str(path), backend="onnx", device="cpu", runtime="openvino"))

        # the AMX profile's file (the default on an Intel CPU) it does not read: the VNNI profile's then
        backends[OV_FP32], backends[OV_STATIC] = on_openvino(fp32_path_for(static)), on_openvino(assets.openvino_onnx())
    else:
        print("OpenVINO is not installed (pip install openvino): --onnx-runtime openvino not measured", flush=True)
    table: dict[str, dict[int, float]] = {}
    for name, load in backends.items():
        try:
            emb = load()  # one model in memory at a time
        except PipelineError as e:  # OpenVINO's refusal (a file under its probes' bar there): said, no row
            if name not in (OV_FP32, OV_STATIC):
                raise
            print(f"{name:40s} refused: {first_line(e)}", flush=True)
            continue
        hw = (emb.preprocess_cfg.crop_height, emb.preprocess_cfg.crop_width)
        with OtherLoad() as other:
            table[name] = {b: rate(emb.embed, b, seconds, hw) for b in batches}
        print(f"{name:40s} " + "  ".join(f"b{b}: {table[name][b]:6.1f} img/s" for b in batches), flush=True)
        if note := other.note(f"the {name} rates"):
            print(note, flush=True)
        del emb
    return table


def op_profile(path: Path, batch: int = 32, runs: int = 3) -> dict[str, float]:
    """Share of kernel time by op type of an ONNX file at `batch` (pipeline.onnxspeed.op_profile):
    the export's file profiled as it is; a QDQ file of an earlier export as a CPU session rewrites
    it (pipeline/int8graph.py)."""
    from pipeline import onnxspeed
    from pipeline.embedders import file_metadata
    from pipeline.int8graph import cpu_model

    return onnxspeed.op_profile(cpu_model(path, file_metadata(path)) or path, batch, runs)


def print_profiles(files: dict[str, Path], batch: int = 32) -> None:
    """Kernel time by op type of each int8 file, and the share of conversion and float Adds."""
    from pipeline import onnxspeed

    print(f"\nkernel time by op type (onnxruntime profiler, batch {batch}, every core):")
    for name, path in files.items():
        shares = op_profile(path, batch)
        top = ", ".join(f"{op} {share:.1%}" for op, share in list(shares.items())[:9])
        conversion = onnxspeed.conversion_share(shares)
        print(f"  {name}: {top}")
        print(f"  {name}: conversion (Quantize/DequantizeLinear) + float Add = {conversion:.1%} of kernel time")


def compare_models(assets: Assets, other: Assets, seconds: float, batches: list[int],
                   first: dict[str, dict[int, float]], labels: tuple[str, str], peaks: dict[str, float]) -> None:
    """The second model's model-only rates (torch fp32, onnxruntime fp32, int8 static) and its
    ceiling at the same GEMM peaks, then both models side by side at batch 1 and 32: what the second
    costs against the first."""
    print(f"\n{labels[1]}:", flush=True)
    second = model_rates(other, seconds, batches, ["static"])
    print("\n| model | backend | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for label, table in zip(labels, (first, second)):
        for backend in ("torch fp32", "onnxruntime fp32", STATIC, OV_STATIC):
            if backend in table:  # OpenVINO where it is installed
                print(f"| {label} | {backend} | " + " | ".join(f"{table[backend][b]:.1f}" for b in batches) + " |")
    for backend in ("torch fp32", STATIC):
        print(f"{labels[1]} / {labels[0]}, {backend}, batch 32: {second[backend][32] / first[backend][32]:.2f}x "
              f"the speed ({first[backend][32] / second[backend][32]:.1f}x the time per picture)")
    print(f"\n{labels[1]}:")
    print_ceiling(second, tower_gops(other), peaks)
    print_profiles({f"{labels[1]} int8 static": other.onnx("static")})


def end_to_end(assets: Assets, n: int, decode: str = "auto", runtime: str = "onnxruntime") -> RunSummary:
    """The gallery stage (decode + preprocess + thumbnail + infer + shards) on n JPEGs, int8 static,
    batch 32: the standard run's own gallery build, with its default settings otherwise (decode: its
    --decode, the CPU's resizer; runtime: its --onnx-runtime)."""
    from pipeline.config import RunConfig
    from pipeline.dataset import DatasetSpec
    from pipeline.embedders import EmbedderSpec, make_embedder
    from pipeline.galleries import build
    from pipeline.report import RunSummary

    static = assets.openvino_onnx() if runtime == "openvino" else assets.onnx("static")
    spec = EmbedderSpec(onnx=str(static), backend="onnx", device="cpu", decode=decode, runtime=runtime)
    cfg = RunConfig(
        dataset=DatasetSpec(str(assets.dataset(n)), limit=n),
        embedder=spec,
        output_dir=assets.work / "embed-e2e",
        batch_size=32,
        progress=False,
    )
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    emb = make_embedder(spec)  # loaded before the clock starts, as the model-only rows
    summary = RunSummary(mode="embed e2e")
    build(cfg, summary, emb)
    return summary


def photo_records(assets: Assets, total: int, n: int) -> list:
    """The first n rows of the end-to-end dataset (of `total` photos) as the pipeline's records
    (still encoded), read as the gallery build reads them (pipeline.dataset.iter_records)."""
    from pipeline.dataset import DatasetSpec, iter_records

    return list(iter_records(DatasetSpec(str(assets.dataset(total)), limit=n)))


DECODE_PART = "decode at the model's DCT scale"
PILLOW_RESIZE, TORCH_RESIZE = "resize for the model (Pillow)", "resize for the model (torch, --decode cpu-simd)"
WHOLE_ITEM = "the item pipeline, whole"
PART_ROUNDS = 3


def photo_parts(assets: Assets, total: int, n: int, rounds: int = PART_ROUNDS) -> dict[str, float]:
    """Milliseconds of one core per photo for each part of the embedding stage's CPU work, with the
    pipeline's own functions in its order (pipeline/items.py, Pillow's resize), on the end-to-end
    dataset's first n JPEGs (of `total`), one thread, best of `rounds`; then the whole item pipeline the same way
    (decode, hashes, signature, image file written, model input, thumbnail), to show what the parts
    leave out."""
    import tempfile

    from pipeline.duplicates import look_signature, pixel_hash
    from pipeline.fileio import sha256_bytes
    from pipeline.images import decode_image, rgb_array
    from pipeline.items import ItemPipeline, make_standard_items, write_image
    from pipeline.plots import make_thumbnail
    from pipeline.preprocess import (
        PIL_PIXELS,
        TORCH_RESIZE_PIXELS,
        PreprocessConfig,
        resize_for_model,
        to_model_input,
    )

    prep = PreprocessConfig.from_model_dir(assets.clip())
    records = photo_records(assets, total, n)
    datas = [r.data for r in records]
    best: dict[str, float] = {}

    def timed(name: str, fn, inputs: list) -> list:
        t = time.perf_counter()
        out = [fn(x) for x in inputs]
        best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t) / len(inputs) * 1e3)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        write = partial(write_image, Path(tmp))
        items = ItemPipeline(make_standard_items(prep.decode_min_side), write, prep, PIL_PIXELS)
        for _ in range(rounds):
            decoded = timed(DECODE_PART, lambda d: decode_image(d, prep.decode_min_side), datas)
            images = [d.image for d in decoded]
            timed("file sha256", sha256_bytes, datas)
            timed("pixel hash", lambda d: pixel_hash(rgb_array(d.image), (d.width, d.height)), decoded)
            timed("duplicate signature", look_signature, images)
            resized = timed(PILLOW_RESIZE, lambda im: resize_for_model(im, prep, PIL_PIXELS), images)
            timed(TORCH_RESIZE, lambda im: resize_for_model(im, prep, TORCH_RESIZE_PIXELS), images)
            timed("normalize", lambda im: to_model_input(im, prep), resized)
            timed("thumbnail", make_thumbnail, resized)
            timed(WHOLE_ITEM, lambda r: items([r]), records)
    return best


def print_photo_parts(parts: dict[str, float], model_rate: float, lanes: int, e2e: float) -> None:
    """Each part's cost per photo and core, and the end-to-end rate the model's own rate leaves room
    for: with every core busy and nothing waiting, a photo costs its inference's core time plus its
    CPU work, so end to end is at most inference / (inference + work) of the model-only rate."""
    infer = lanes * 1e3 / model_rate  # ms of a core per photo: `lanes` one-thread sessions, a slice of 32 each
    each = {name: ms for name, ms in parts.items() if name != WHOLE_ITEM}
    whole = parts[WHOLE_ITEM]
    print(f"\nper photo and core (one thread, best of {PART_ROUNDS}; inference {infer:.2f} ms at batch 32 "
          f"on {lanes} core(s)):")
    for name, ms in each.items():
        print(f"  {name:48s} {ms:6.2f} ms")
    pillow_parts = sum(ms for name, ms in each.items() if name != TORCH_RESIZE)
    print(f"  {WHOLE_ITEM:48s} {whole:6.2f} ms (the parts with Pillow's resize sum to {pillow_parts:.2f})")

    def ceiling(work: float) -> str:
        return f"{infer / (infer + work):.0%}"

    decode, normalize, pillow, torch = (parts[k] for k in (DECODE_PART, "normalize", PILLOW_RESIZE, TORCH_RESIZE))
    print(f"end to end can reach at most (of the int8 model-only rate): {ceiling(decode)} with the decode alone; "
          f"with the model's pixels {ceiling(decode + pillow + normalize)} (Pillow's resize), "
          f"{ceiling(decode + torch + normalize)} (torch's); with the whole item pipeline {ceiling(whole)} "
          f"({ceiling(whole - pillow + torch)} with torch's resize); measured {e2e / model_rate:.0%}")


def end_to_end_rounds(assets: Assets, n: int, decodes: list[str], rounds: int,
                      runtimes: tuple[str, ...] = ("onnxruntime",)) -> tuple[RunSummary, dict[tuple[str, str], float]]:
    """end_to_end for each decode and runtime in turn, `rounds` times; prints each run's rate and
    its stage times. Returns the first pair's last summary and each pair's median rate."""
    pairs = [(d, r) for d in decodes for r in runtimes]
    rates: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    last: dict[tuple[str, str], RunSummary] = {}
    for r in range(rounds):
        for pair in pairs:
            with OtherLoad() as other:
                last[pair] = end_to_end(assets, n, *pair)
            rates[pair].append(n / last[pair].stages["embed"])
            times = ", ".join(f"{k} {v:.1f} s" for k, v in stage_seconds(last[pair]).items())
            print(f"end to end, {flags_of(pair)}, round {r + 1}: {rates[pair][-1]:.1f} img/s ({times})", flush=True)
            if note := other.note(f"end-to-end round {r + 1}"):
                print(note, flush=True)
    if len(pairs) > 1 or rounds > 1:
        for pair, got in rates.items():
            print(f"end to end, {flags_of(pair)}: median {statistics.median(got):.1f} img/s of {len(got)} run(s)")
    return last[pairs[0]], {p: statistics.median(got) for p, got in rates.items()}


def flags_of(pair: tuple[str, str]) -> str:
    decode, runtime = pair
    return f"--decode {decode}" + (f" --onnx-runtime {runtime}" if runtime != "onnxruntime" else "")


def print_table(table: dict[str, dict[int, float]], batches: list[int], e2e: float | None, n: int, wh,
                model: str = STATIC) -> None:
    """The model-only rates, and the end-to-end rate `e2e` of `n` JPEGs (None: not measured, left out)
    on the runtime of `model`, the row its share is of."""
    from pipeline.embedders import available_cores

    torch32, int8 = table["torch fp32"][32], table[STATIC][32]
    print(f"\ncores: {available_cores()}")
    print("\n| backend | " + " | ".join(f"batch {b}" for b in batches) + " |\n|---|" + "---|" * len(batches))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[b]:.1f}" for b in batches) + " |")
    if e2e is not None:
        print(
            f"| embedding stage end to end (int8 static{', on OpenVINO' if model == OV_STATIC else ''}, batch 32, "
            f"{n} JPEGs {wh[0]}x{wh[1]}) |"
            + " |" * (len(batches) - 1)
            + f" {e2e:.1f} |"
        )
    print(f"\nint8 (static) / torch fp32 at batch 32: {int8 / torch32:.2f}x")
    if DYNAMIC in table:
        print(f"int8 (dynamic) / torch fp32 at batch 32: {table[DYNAMIC][32] / torch32:.2f}x")
    if e2e is not None:
        print(f"end to end / int8 model-only at batch 32: {e2e / table[model][32]:.0%}")


def print_ceiling(table: dict[str, dict[int, float]], gops: float, peaks: dict[str, float]) -> None:
    """The ceiling: every matrix product and convolution at this machine's own GEMM peak (fp32, or
    int8 for the int8 file, which has them all in int8) and everything else free."""
    fp32_ceiling, int8_ceiling = peaks["fp32"] / gops, peaks["int8"] / gops
    print(f"model: {gops:.2f} GOP per image in matrix products and convolutions (torch's flop counter)")
    print(
        f"ceiling (all of them at peak, nothing else costs): fp32 {fp32_ceiling:.0f} img/s, int8 {int8_ceiling:.0f} "
        f"img/s = {int8_ceiling / table['torch fp32'][32]:.1f}x torch fp32 at most"
    )
    print(
        f"measured int8 (static) = {table[STATIC][32] / int8_ceiling:.0%} of its ceiling; ort fp32 = "
        f"{table['onnxruntime fp32'][32] / fp32_ceiling:.0%} of its ceiling"
    )
    if OV_STATIC in table:
        print(f"on OpenVINO: int8 (static) = {table[OV_STATIC][32] / int8_ceiling:.0%} of the int8 ceiling "
              f"({table[OV_STATIC][32] / table[STATIC][32]:.2f}x onnxruntime's)"
              + (f"; fp32 = {table[OV_FP32][32] / fp32_ceiling:.0%} of the fp32 ceiling" if OV_FP32 in table else ""))


def main(argv: list[str] | None = None) -> int:
    from pipeline.embedders import available_cores

    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--e2e-images", type=int, default=1000)
    ap.add_argument("--e2e-decode", default="auto", help="the end-to-end stage's --decode (auto or cpu: Pillow "
                    "decodes and resizes; cpu-simd: torch resizes); several, comma-separated, are measured in turn")
    ap.add_argument("--e2e-rounds", type=int, default=1, help="end-to-end runs of each --e2e-decode and "
                    "runtime, in turn (the same order each round)")
    ap.add_argument("--e2e-runtime", default="onnxruntime", help="the end-to-end stage's --onnx-runtime "
                    "(onnxruntime, openvino); both, comma-separated, are measured in turn")
    ap.add_argument("--int8", default="static,dynamic", help="int8 exports measured (static is always measured)")
    ap.add_argument(
        "--compare",
        default="fashion-siglip",
        help="the model measured against the first: fashion-siglip (Marqo-FashionSigLIP's architecture, random "
        "weights), rn50 or convnext (open_clip's RN50 or ConvNeXt-T, a convolutional tower, random weights; "
        "ConvNeXt needs timm, which open_clip_torch installs), an open_clip or transformers folder, or none",
    )
    args = parse_args(ap, argv, tiny={"seconds": 0.1, "e2e_images": 16, "int8": "static"})
    decodes = args.e2e_decode.split(",")
    if unknown := [d for d in decodes if d not in ("auto", "cpu", "cpu-simd")]:
        ap.error(f"--e2e-decode: {', '.join(unknown)} is not auto, cpu or cpu-simd")
    runtimes = tuple(args.e2e_runtime.split(","))
    if unknown := [r for r in runtimes if r not in RUNTIMES]:
        ap.error(f"--e2e-runtime: {', '.join(unknown)} is not onnxruntime or openvino")
    if "openvino" in runtimes and not has_openvino():
        ap.error("--e2e-runtime openvino: OpenVINO is not installed (pip install openvino)")
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    batches = [1, 8, 32]
    table = model_rates(assets, args.seconds, batches, args.int8.split(","))
    model_of = {"onnxruntime": STATIC, "openvino": OV_STATIC}  # each end-to-end rate against its own model's
    if refused := [r for r in runtimes if model_of[r] not in table]:  # OpenVINO refused the file: said above
        print(f"end to end on {', '.join(refused)}: not measured (the file was refused)", flush=True)
        runtimes = tuple(r for r in runtimes if r not in refused)
    e2e, stages, medians, model = None, {}, {}, STATIC
    if args.e2e_images and runtimes:  # --e2e-images 0: the model alone
        summary, medians = end_to_end_rounds(assets, args.e2e_images, decodes, args.e2e_rounds, runtimes)
        e2e, stages, model = medians[decodes[0], runtimes[0]], stage_seconds(summary), model_of[runtimes[0]]
    print_table(table, batches, e2e, args.e2e_images, assets.size_wh, model)
    for (decode, runtime), got in medians.items():
        if (decode, runtime) != (decodes[0], runtimes[0]):
            print(f"end to end, {flags_of((decode, runtime))} / its model-only rate at batch 32: "
                  f"{got / table[model_of[runtime]][32]:.0%} ({got:.1f} img/s)")
    peaks = gemm_peaks(args.seconds / 2)
    print(
        f"\nonnxruntime GEMM peak here: fp32 {peaks['fp32']:.0f} GFLOP/s, int8 {peaks['int8']:.0f} GOP/s "
        f"({peaks['int8'] / peaks['fp32']:.1f}x)"
    )
    print_ceiling(table, tower_gops(assets), peaks)
    for k, v in stages.items():
        print(f"  {k:40s} {v:7.1f} s")
    if e2e is not None:
        parts = photo_parts(assets, args.e2e_images, min(args.e2e_images, 200))  # rows of the same dataset
        print_photo_parts(parts, table[model][32], available_cores(), e2e)
    int8_files = {STATIC: assets.onnx("static")}
    if DYNAMIC in table:
        int8_files[DYNAMIC] = assets.onnx("dynamic")
    print_profiles(int8_files)
    if args.compare != "none":
        other = compare_assets(args)
        first = args.model.name if args.model is not None else "tiny CLIP" if args.tiny else "FashionCLIP ViT-B/32"
        # --compare's model by its family's name; with --tiny its tiny stand-in of that family
        second = COMPARED[args.compare][0] if args.compare in COMPARED else Path(args.compare).name
        compare_models(assets, other, args.seconds, batches, table, (first, second), peaks)
    return 0


# --compare's named models: (label, the tiny model of --tiny, the real architecture)
COMPARED = {
    "fashion-siglip": ("FashionSigLIP ViT-B/16", tiny_fashion_siglip, real_arch_fashion_siglip),
    "rn50": ("open_clip RN50", tiny_rn50, real_arch_rn50),
    "convnext": ("open_clip ConvNeXt-T", tiny_convnext, real_arch_convnext),
}


def compare_assets(args) -> Assets:
    """The second model: Marqo-FashionSigLIP's architecture, open_clip's RN50 or ConvNeXt-T (or
    --tiny's small open_clip ViT, ResNet or ConvNeXt), or a folder."""
    if args.compare in COMPARED:
        _, tiny, real = COMPARED[args.compare]
        folder = tiny(args.work) if args.tiny else real(args.work)
    else:
        folder = Path(args.compare)
    return Assets(args.work, args.tiny, model=folder)


if __name__ == "__main__":
    sys.exit(main())

"""The int8 image tower on onnxruntime and on OpenVINO (issue 29; `--onnx-runtime openvino`), on
the real FashionCLIP architecture (random weights), against the default export of the issue's day
(`qdq-out`, made as `benchmarks.int8_recipes` makes it).

Each way of running: images/s at batch 1, 8 and 32 (batch 32 the median of --rounds alternating
rounds), whether one picture alone gives the same vector as in a batch of 32 (bit for bit), and the
cosine of its vectors to onnxruntime's on the default export. One session on --threads threads
for each runtime, as the issue measured, and the pipeline's own embedders (onnxruntime: one
single-thread session a core; OpenVINO: one stream a core), as a gallery build runs them. OpenVINO
is optional: `pip install openvino` to measure it; without it the script says so and measures
onnxruntime alone.

    python -m benchmarks.int8_runtimes [--seconds 6] [--threads 2] [--rounds 5]
    python -m benchmarks.int8_runtimes --tiny             # tiny model: checks the script
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Assets, alternating, has_openvino, machine_line, make_parser, parse_args

BATCHES = (1, 8, 32)
Run = Callable[[np.ndarray], np.ndarray]


def onnxruntime_run(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_run(path: Path, threads: int) -> Run:
    """OpenVINO's compiled model (one session on `threads` threads, float parts in float32) as a function."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: np.asarray(compiled(x)[0])


def pipeline_run(path: Path, runtime: str, threads: int) -> Run:
    """The pipeline's own embedder of the file (its lanes or streams), unnormalized rows compared normalized."""
    from pipeline.embedders import EmbedderSpec, make_embedder

    embedder = make_embedder(EmbedderSpec(onnx=str(path), backend="onnx", device="cpu", threads=threads,
                                          runtime=runtime))
    return embedder.embed


def qdq_out_file(assets: Assets, prep: Any) -> Path:
    """The issue's default export, made as benchmarks.int8_recipes makes it (and reused from there)."""
    from benchmarks.int8_recipes import calibration_pixels, recipe_file
    from pipeline.export import fp32_path_for

    folder = assets.work / "int8-recipes" / assets.model_tag
    return recipe_file(folder, fp32_path_for(assets.onnx("static")), "qdq-out", lambda: calibration_pixels(prep))


def rates(run: Run, x: np.ndarray, seconds: float, batches: tuple[int, ...] = BATCHES) -> dict[int, float]:
    out = {}
    for batch in batches:
        run(x[:batch])
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or n == 0:
            run(x[:batch])
            n += batch
        out[batch] = n / (time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="batch-32 rates measured this many times, alternating")
    args = parse_args(ap, argv, tiny={"seconds": 0.1, "rounds": 2})
    print(machine_line(), flush=True)
    from pipeline.embedders import OnnxEmbedder
    from pipeline.export import feature_cosines

    assets = Assets.from_args(args)
    default, threads = assets.onnx("static"), args.threads
    prep = OnnxEmbedder(default).preprocess_cfg
    base, reference = "qdq-out (the default export of issue 29's day)", "onnxruntime, the default export, one session"
    runs: dict[str, Run] = {
        f"onnxruntime, {base}, one session": onnxruntime_run(qdq_out_file(assets, prep), threads),
        reference: onnxruntime_run(default, threads),
        "onnxruntime, the default export, the pipeline's lanes": pipeline_run(default, "onnxruntime", threads),
    }
    if not has_openvino():
        print("OpenVINO is not installed (pip install openvino): onnxruntime alone", flush=True)
    else:
        readable = assets.openvino_onnx()  # the default export, or where that is the AMX profile's, the VNNI one
        what = "the default export" if readable == default else "the VNNI profile's export"
        if readable != default:
            runs[f"onnxruntime, {what}, one session"] = onnxruntime_run(readable, threads)
        runs[f"OpenVINO, {what}, one session"] = openvino_run(readable, threads)
        runs[f"OpenVINO, {what}, the pipeline's streams"] = pipeline_run(readable, "openvino", threads)

    pixels = np.random.default_rng(0).standard_normal((32, 3, prep.crop_height, prep.crop_width)).astype(np.float32)
    reference_out = runs[reference](pixels)
    speeds, same, cosine = {}, {}, {}
    for name, run in runs.items():
        speeds[name] = rates(run, pixels, args.seconds)
        alone = np.concatenate([run(pixels[i : i + 1]) for i in range(len(pixels))])
        batch = run(pixels)
        same[name], cosine[name] = np.array_equal(alone, batch), feature_cosines(batch, reference_out).min()
        print(f"{name}: " + ", ".join(f"b{b} {r:.1f}" for b, r in speeds[name].items()) + " img/s", flush=True)
    b32 = {name: [speed[32]] for name, speed in speeds.items()}
    for _, (name, run) in alternating(list(runs.items()), args.rounds, start=1):  # round 1 ran above
        b32[name].append(rates(run, pixels, args.seconds, batches=(32,))[32])
    median = {name: float(np.median(got)) for name, got in b32.items()}
    if args.rounds > 1:
        print(f"\nbatch 32 in {args.rounds} rounds, alternating (img/s):")
        for name, got in b32.items():
            print(f"  {name}: median {median[name]:.1f} of " + ", ".join(f"{x:.1f}" for x in got))
    first = next(iter(runs))
    print(f"\n{args.threads} threads; vs: batch 32 (median) against {base}")
    print("| runtime, file, how it runs | b1 | b8 | b32 (img/s) | vs | one alone = in a batch of 32 | "
          "cosine min to onnxruntime's |")
    print("|---|---|---|---|---|---|---|")
    for name, speed in speeds.items():
        print(f"| {name} | {speed[1]:.1f} | {speed[8]:.1f} | {median[name]:.1f} | {median[name] / median[first]:.2f}x "
              f"| {'yes' if same[name] else 'no'} | {cosine[name]:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

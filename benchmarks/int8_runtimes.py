"""The int8 image tower on another runtime (issue 29): onnxruntime on the default export against
OpenVINO on the portable QDQ export (`--quantization static-qdq`, the file made for runtimes that do
not read onnxruntime's contrib ops), on the real FashionCLIP architecture (random weights).

For each: images/s at batch 1, 8 and 32 on --threads threads (one session), whether one picture
alone gives the same vector as in a batch of 32 (bit for bit), and the cosine of its vectors to
onnxruntime's. OpenVINO runs twice: its float parts in fp32, and at the precision it picks for the
CPU (bf16 where the CPU has AVX-512 BF16 or AMX). OpenVINO is not a dependency of the pipeline:
`pip install openvino` to measure it; without it the script says so and measures onnxruntime alone.

    python -m benchmarks.int8_runtimes [--seconds 6] [--threads 2]
    python -m benchmarks.int8_runtimes --tiny             # tiny model: checks the script
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import Assets, machine_line, make_parser, parse_args

BATCHES = (1, 8, 32)
Run = Callable[[np.ndarray], np.ndarray]


def onnxruntime_run(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_run(path: Path, threads: int, precision: str | None) -> tuple[Run, str]:
    """OpenVINO's compiled model as a function, and the inference precision it runs the float parts at."""
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    precision_type = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: "f32", "bf16"
    return (lambda x: np.asarray(compiled(x)[0])), precision_type.get_type_name()


def rates(run: Run, x: np.ndarray, seconds: float) -> dict[int, float]:
    out = {}
    for batch in BATCHES:
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
    args = parse_args(ap, argv, tiny={"seconds": 0.1})
    print(machine_line(), flush=True)
    assets = Assets.from_args(args)
    pixels = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    if assets.tiny:  # the tiny model's own picture size
        import onnxruntime as ort

        shape = ort.InferenceSession(str(assets.onnx()), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
        pixels = np.random.default_rng(0).standard_normal((32, 3, shape[2], shape[3])).astype(np.float32)

    runs: list[tuple[str, Run]] = [("onnxruntime, default export", onnxruntime_run(assets.onnx(), args.threads))]
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO is not installed (pip install openvino): onnxruntime alone", flush=True)
    else:
        qdq = assets.onnx("static-qdq")
        for hint in ("f32", None):
            run, precision = openvino_run(qdq, args.threads, hint)
            runs.append((f"OpenVINO, portable QDQ export, float parts {precision}", run))

    from pipeline.export import feature_cosines

    reference = runs[0][1](pixels)
    rows = []
    for name, run in runs:
        speed = rates(run, pixels, args.seconds)
        alone = np.concatenate([run(pixels[i : i + 1]) for i in range(len(pixels))])
        batch = run(pixels)
        rows.append((name, speed, np.array_equal(alone, batch), feature_cosines(batch, reference).min()))
        print(f"{name}: " + ", ".join(f"b{b} {r:.1f}" for b, r in speed.items()) + " img/s", flush=True)

    base = rows[0][1][32]
    print(f"\n{args.threads} threads, one session; vs: batch 32 against onnxruntime's default export")
    print("| runtime | b1 | b8 | b32 (img/s) | vs | one alone = in a batch of 32 | cosine min to onnxruntime |")
    print("|---|---|---|---|---|---|---|")
    for name, speed, same, cos in rows:
        print(
            f"| {name} | {speed[1]:.1f} | {speed[8]:.1f} | {speed[32]:.1f} | {speed[32] / base:.2f}x "
            f"| {'yes' if same else 'no'} | {cos:.5f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

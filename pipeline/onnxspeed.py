"""What an image-tower ONNX file does on this CPU: pictures a second, and kernel time by op type.

The export measures the two files it writes, beside each other, before it moves them into place
(`measure_export`), so that whoever exports on an edge box sees what int8 buys on that CPU and how
much of the int8 file's time goes to format conversion (issue 29's bar: Quantize/DequantizeLinear
and float Adds at most 10% of kernel time). The benchmarks use the same profile
(benchmarks/embed.py, benchmarks/int8_recipes.py). Figures are this machine's: `machine.cpu_label`
names it in every line.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embedders import META_PREPROCESS, _session_options, available_cores
from .machine import cpu_label
from .preprocess import PreprocessConfig

# Format conversion and the float Adds between int8 ops: issue 29's bar, at most 10% of kernel time.
CONVERSION = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Add")
CONVERSION_BAR = 0.10


def conversion_share(shares: dict[str, float]) -> float:
    return sum(shares.get(op, 0.0) for op in CONVERSION)


# A dynamic-int8 file's activations are quantized inside this op, per batch: conversion it does
# not count apart.
FUSED_CONVERSION = "DynamicQuantizeMatMul"


def _input(sess, batch: int) -> tuple[str, np.ndarray]:
    """The session's image input and random pixels for it: its fixed channels, height and width,
    or for a dynamic one the size the file's preprocessing crops to (224 px for a file without)."""
    inp = sess.get_inputs()[0]
    prep = sess.get_modelmeta().custom_metadata_map.get(META_PREPROCESS)
    cfg = PreprocessConfig.from_json(prep) if prep else PreprocessConfig()
    fallback = (3, cfg.crop_height, cfg.crop_width)
    dims = [d if isinstance(d, int) else f for d, f in zip(inp.shape[1:], fallback)]
    return inp.name, np.random.default_rng(0).normal(size=(batch, *dims)).astype(np.float32)


def op_profile(model: str | bytes | Path, batch: int = 32, runs: int = 3) -> dict[str, float]:
    """Share of kernel time by op type (largest first) of an ONNX model at `batch`, from
    onnxruntime's profiler, with the session options the pipeline runs it with (full graph
    optimization, every core): so the op names are those of the graph as it
    really runs (MatMulIntegerToFloat, fused ops). `runs` runs after a first one, which is left out:
    a fresh session's first run grows its memory arena and packs buffers once (on open_clip's
    ConvNeXt-T its DequantizeLinear took 0.3 points of kernel time more with it, 2026-12-07)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = _session_options(ort, available_cores())
        opts.enable_profiling = True
        opts.profile_file_prefix = f"{tmp}/profile"
        sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                    providers=["CPUExecutionProvider"])
        name, x = _input(sess, batch)
        for _ in range(1 + runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    return kernel_shares(events, skip_runs=1)


def kernel_shares(events: list[dict], skip_runs: int = 0) -> dict[str, float]:
    """Share of kernel time by op type (largest first) in onnxruntime profile events, leaving out the
    nodes of the first `skip_runs` runs (those before the start of the run after them)."""
    starts = sorted(float(e.get("ts", 0)) for e in events if e.get("name") == "model_run")
    if skip_runs and len(starts) <= skip_runs:
        raise ValueError(f"the profile has {len(starts)} run(s), none left after leaving out {skip_runs}")
    since = starts[skip_runs] if skip_runs else float("-inf")
    by_op: dict[str, float] = {}
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and float(e.get("ts", 0)) >= since):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + float(e.get("dur", 0))
    total = sum(by_op.values()) or 1.0
    return {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


# A model whose warm-up run at the measured batch takes this long is timed in one round: a run that
# long averages a machine's moments out by itself, and each further round of a large tower's fp32
# file (SigLIP so400m's: 40 s a batch of 32 on two cores) only lengthens the export.
LONG_RUN_S = 5.0


def images_per_second(sessions: dict[str, object], batch: int, seconds: float = 0.5, rounds: int = 2,
                      max_runs: int = 20, outputs: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Pictures a second of each session at `batch`: after one warm-up run each, `rounds` rounds
    that take the sessions in turn (so that a machine's slower moment does not fall on one file
    alone), each timing whole runs until `seconds` have passed or `max_runs` were made (a small
    model's); the best round of each. One round only when a warm-up run took LONG_RUN_S or more.
    outputs: filled with each session's first output of the warm-up, for a caller to reuse."""
    inputs = {key: _input(sess, batch) for key, sess in sessions.items()}
    slowest = 0.0
    for key, sess in sessions.items():
        name, x = inputs[key]
        start = time.perf_counter()
        got = sess.run(None, {name: x})  # type: ignore[attr-defined]
        slowest = max(slowest, time.perf_counter() - start)
        if outputs is not None:
            outputs[key] = got[0]
    best = dict.fromkeys(sessions, 0.0)
    for _ in range(1 if slowest >= LONG_RUN_S else rounds):
        for key, sess in sessions.items():
            name, x = inputs[key]
            n, start = 0, time.perf_counter()
            while True:
                sess.run(None, {name: x})  # type: ignore[attr-defined]
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds or n >= max_runs:
                    break
            best[key] = max(best[key], n * batch / elapsed)
    return best


def batch_dependence(sess, batch: int = 32, together: np.ndarray | None = None) -> float:
    """The largest absolute difference, over three of `batch` pictures, between a picture's output
    run alone and the same picture's in the batch: 0.0 when the file is batch-independent on this
    CPU (static int8 and fp32 should be: a vector must not depend on its batch neighbours).
    together: the session's output for the whole batch of `_input`'s pixels, when already run."""
    name, x = _input(sess, batch)
    if together is None:
        together = sess.run(None, {name: x})[0]
    return max(float(np.abs(sess.run(None, {name: x[i : i + 1]})[0][0] - together[i]).max())
               for i in sorted({0, batch // 2, batch - 1}))


@dataclass
class CpuSpeed:
    """The int8 and fp32 files on this CPU, at one batch and thread count."""

    cpu: str
    batch: int
    threads: int
    int8_rate: float
    fp32_rate: float
    shares: dict[str, float] = field(default_factory=dict)  # the int8 file's kernel time by op type
    alone_diff: float | None = None  # the int8 file's batch_dependence; None: not checked
    dynamic: bool = False  # a dynamic-int8 file (its scales are each batch's)

    @property
    def is_dynamic(self) -> bool:
        return self.dynamic or FUSED_CONVERSION in self.shares

    @property
    def conversion(self) -> float:
        return conversion_share(self.shares)

    def lines(self, top: int = 6) -> list[str]:
        ops = ", ".join(f"{op} {share:.1%}" for op, share in list(self.shares.items())[:top])
        bar = "within" if round(self.conversion, 3) <= CONVERSION_BAR else "over"  # as the line shows it
        verdict = f"{bar} the {CONVERSION_BAR:.0%} bar"
        if self.is_dynamic:  # the bar cannot judge it
            verdict = f"not judged: its activations are quantized inside {FUSED_CONVERSION}, not counted apart"
        ratio = f"{self.int8_rate / self.fp32_rate:.2f}x" if self.fp32_rate > 0 else "fp32 not timed"
        return [
            f"on this CPU, {self.cpu}, batch {self.batch}, {self.threads} thread(s): int8 {self.int8_rate:.1f} img/s, "
            f"fp32 {self.fp32_rate:.1f} img/s ({ratio})",
            f"  int8 kernel time: {ops}; Quantize/DequantizeLinear + float Add {self.conversion:.1%} ({verdict})",
            *self._alone_lines(),
        ]

    def _alone_lines(self) -> list[str]:
        if self.alone_diff is None:
            return []
        head = f"  one picture alone = the same picture in a batch of {self.batch}:"
        if self.alone_diff == 0.0:
            return [f"{head} bit for bit"]
        why = ("as expected of dynamic int8, whose scales are the batch's" if self.is_dynamic
               else "this CPU's kernels make the file batch-dependent: a picture's vector may differ between runs "
                    "that batch it differently")
        return [f"{head} no, up to {self.alone_diff:.2g} apart ({why})"]


def measure_export(int8_model: str | bytes | Path, fp32_path: Path, batch: int = 32,
                   seconds: float = 0.5, dynamic: bool = False, threads: int = 0) -> CpuSpeed:
    """The int8 model (a path, or the bytes of the graph a CPU session runs) against the fp32 file,
    one session each on `threads` (0: every core); then whether the int8 model gives a picture
    alone what it gives it in the batch, and its kernel time by op type."""
    import onnxruntime as ort

    threads = threads or available_cores()
    opts = _session_options(ort, threads)
    model = str(int8_model) if isinstance(int8_model, Path) else int8_model
    sessions = {
        "int8": ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]),
        "fp32": ort.InferenceSession(str(fp32_path), opts, providers=["CPUExecutionProvider"]),
    }
    outputs: dict[str, np.ndarray] = {}
    rates = images_per_second(sessions, batch, seconds, outputs=outputs)
    alone = batch_dependence(sessions["int8"], batch, together=outputs["int8"])
    del sessions
    return CpuSpeed(cpu_label(), batch, threads, rates["int8"], rates["fp32"], op_profile(int8_model, batch, runs=2),
                    alone, dynamic)

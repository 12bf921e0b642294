"""The exported ONNX image file run by OpenVINO on the CPU (--onnx-runtime openvino).

The same file as onnxruntime runs: the VNNI profile's static file (OpenVINO reads its QDQ pairs and
onnxruntime's MatMulIntegerToFloat), portable QDQ and dynamic files; not the AMX profile's, whose
QGemm it does not read (refused with the export it reads). Checked by the same self-check probes,
its float parts in float32 (OpenVINO's CPU default on a CPU with bf16 is bfloat16, which the
probes' bar was not set for). On a 2-core AMD EPYC (2026-12-07) it ran the static int8 FashionCLIP
tower at 175 img/s against onnxruntime's 156 in one-core lanes, open_clip's ConvNeXt-T at 0.88x
onnxruntime's speed, and Marqo-FashionSigLIP's architecture (random weights) under its probes' bar
(README, "OpenVINO, taken as an option"). Its vectors are within rounding of onnxruntime's (cosine
0.9999), not equal to them: a store records which runtime made it, and one runtime's store is
never updated, resumed or searched with the other's vectors.

One compiled model with a stream per core (one thread each), and a request per stream: a batch is
split into slices, one per stream, as the onnxruntime backend splits it over its one-thread
sessions; the gallery's lanes each run one slice at a time (`embed_serial`). A picture's vector does
not depend on its batch (tested). Nothing is pinned to a core: the decoding threads share them.
"""

from __future__ import annotations

import logging
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .embedders import (
    EmbedderSpec,
    SlicedEmbedder,
    _preprocess_config_for_file,
    _session_options,
    available_cores,
    file_metadata,
)
from .errors import PipelineError, first_line
from .fileio import sha256_file_once
from .int8graph import META_INT8_RECIPE
from .probes import check_file, probe_pixels

log = logging.getLogger(__name__)

OPENVINO = "openvino"
INSTALL = "pip install openvino"
UINT8_GELU = "+uint8-gelu"  # in the recipe of the AMX profile's files (int8graph.AMX_RECIPE and the one before it)
REBUILT = "a store made on OpenVINO is then rebuilt without --onnx-runtime"
FOR_OPENVINO = ("export a file for it with --export-onnx --int8-profile vnni (the graph OpenVINO reads) or "
                "--quantization static-qdq (portable QDQ), or run this one on onnxruntime (the default)")


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise PipelineError(f"--onnx-runtime openvino needs OpenVINO: {INSTALL} (or run the file on onnxruntime, "
                            f"the default; {REBUILT})") from e
    return openvino


def compile_config(streams: int) -> dict[str, Any]:
    """OpenVINO's CPU properties for `streams` one-thread streams, float parts in float32."""
    return {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": streams,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }


def _unconverted(message: str) -> str:
    """"it does not convert OP, ..." from the operations OpenVINO's ONNX reader names as failed in its
    error (none for another error: "")."""
    ops = set(re.findall(r"^-- (\S+) with a message", message, re.MULTILINE))
    for listed in re.findall(r"No conversion rule found for operations: (.+)$", message, re.MULTILINE):
        ops.update(op.strip() for op in listed.split(","))
    return f"it does not convert {', '.join(sorted(ops))}" if ops else ""


# The probes' refusal on OpenVINO: Marqo-FashionSigLIP's architecture (random weights) scored 0.966 there
# against 0.996 on onnxruntime, its activations a level apart here and there from the first layer on
ROUNDS_OTHERWISE = ("On OpenVINO: its int8 kernels round otherwise than onnxruntime's, on which the export checked "
                    "the file (a level apart here and there, which some towers amplify): run it on onnxruntime, the "
                    f"default (without --onnx-runtime openvino; {REBUILT}).")


class OpenVinoEmbedder(SlicedEmbedder):
    """An exported image tower (input float (batch, 3, H, W), output its embedding) on OpenVINO's CPU plugin."""

    @classmethod
    def from_spec(cls, spec: EmbedderSpec) -> OpenVinoEmbedder:
        if spec.device == "cuda":
            raise PipelineError("--onnx-runtime openvino runs the file on the CPU: drop --device cuda, or run it on "
                                f"onnxruntime (the default) with onnxruntime-gpu ({REBUILT})")
        return cls(spec.onnx, threads=spec.threads, model_hint=spec.model)

    def __init__(self, path: str | Path, threads: int = 0, model_hint: str | None = None) -> None:
        ov = _import_openvino()
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"ONNX file {path} not found. Make it with: python main.py --export-onnx --onnx {path}")
        self.path = self.source_file = path
        self.device = "cpu"
        self.lanes = max(1, threads or available_cores())
        try:
            meta = file_metadata(path)
        except Exception as e:  # noqa: BLE001 - onnx's parser raises several types for a damaged file
            raise PipelineError(f"cannot read ONNX file {path}: {type(e).__name__}: {first_line(e)}. Re-create it "
                                "with --export-onnx.") from e
        if UINT8_GELU in meta.get(META_INT8_RECIPE, ""):
            raise PipelineError(
                f"{path} is an int8 file of the AMX profile (its GELUs in uint8 through onnxruntime's QGemm, "
                f"QLinearSigmoid and QLinearMul, which OpenVINO does not read): {FOR_OPENVINO}")
        try:
            core = ov.Core()
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", compile_config(self.lanes))
        except Exception as e:  # OpenVINO raises RuntimeError and its own types for a file it cannot read
            why = _unconverted(str(e)) or f"{type(e).__name__}: {first_line(e)}"
            raise PipelineError(f"OpenVINO cannot load the ONNX file {path} ({why}): {FOR_OPENVINO}") from e
        self.preprocess_cfg = _preprocess_config_for_file(path, meta, model_hint)
        self._check_io(path)
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # requests not running right now
        for _ in range(self.lanes):
            self._free.put(self._compiled.create_infer_request())
        pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="openvino") if self.lanes > 1 else None
        self._pool = pool
        probes = probe_pixels(self.preprocess_cfg)
        try:
            self.dim = int(self._run(probes[:1]).shape[-1])
        except Exception as e:  # OpenVINO's own error types, from a graph it read but cannot run
            raise PipelineError(f"OpenVINO cannot run the ONNX file {path}: {type(e).__name__}: {first_line(e)}. "
                                f"{FOR_OPENVINO[0].upper()}{FOR_OPENVINO[1:]}.") from e
        self.self_check = check_file(path, meta, [probes], lambda: self._run(probes), remedy=ROUNDS_OTHERWISE)
        log.debug("%s on OpenVINO: %s", path, self.self_check)
        self.identity = self._file_identity(meta, sha256_file_once(path), OPENVINO)

    def _check_io(self, path: Path) -> None:
        """One float (batch, 3, H, W) input, its fixed sizes (symbolic ones pass) what the preprocessing makes."""
        inputs = self._compiled.inputs
        if len(inputs) != 1:
            raise PipelineError(f"{path}: expected one image input, found {len(inputs)}")
        shape, kind = inputs[0].get_partial_shape(), inputs[0].get_element_type().get_type_name()
        if kind != "f32" or shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise PipelineError(f"{path}: input is {kind} {shape}; expected float (batch, 3, H, W)")
        want = (3, self.preprocess_cfg.crop_height, self.preprocess_cfg.crop_width)
        for dim, size, name in zip(list(shape)[1:], want, ("channels", "height", "width")):
            if dim.is_static and dim.get_length() != size:
                raise PipelineError(f"{path}: input {name} is {dim.get_length()} but preprocessing makes {size}")

    def _infer(self, runner: Any, x: np.ndarray) -> np.ndarray:
        runner.infer({0: x})
        return np.array(runner.get_output_tensor(0).data, dtype=np.float32)  # a copy: the buffer is reused

    def _text_session(self) -> tuple[Any, list[str]]:
        import onnxruntime as ort

        return _session_options(ort, 1), ["CPUExecutionProvider"]

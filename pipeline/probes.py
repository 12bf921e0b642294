"""Self-check probes: an exported ONNX file carries the fp32 torch model's outputs for a few fixed
inputs in its metadata, and checks itself against them wherever it is loaded.

An int8 file is made once and copied to other machines; int8 kernels differ between CPUs (VNNI,
AVX2-only, AMX), and a file can be damaged in transit. The probes are four deterministic synthetic
pictures at the model's input size, generated here without Pillow (so no library version changes
them) and mapped to model inputs by the file's own preprocessing; the reference is stored, not the
inputs. Size: 4 x D float32 (8 KiB for D = 512, base64 in the metadata). Checking costs one batch of
four through the model at load.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .errors import PipelineError
from .machine import cpu_info, cpu_label
from .preprocess import PreprocessConfig, to_model_input

log = logging.getLogger(__name__)

META_PROBES = "fashion_pipeline.probes"
PROBE_VERSION = 1
PROBE_COUNT = 4
# How far below its own export-time score a file may fall where it is loaded. The same file on
# another CPU computes the same integer sums (7-bit weights never saturate) and differs only in
# float rounding (~1e-6); a damaged file or a saturating kernel falls by 0.01 to 1.
PROBE_SLACK = 0.002


def _lcg(seed: int) -> Callable[[], int]:
    """A 32-bit linear congruential generator: the same numbers on every platform and version."""
    state = [seed & 0xFFFFFFFF]

    def next_byte() -> int:
        state[0] = (1664525 * state[0] + 1013904223) & 0xFFFFFFFF
        return state[0] >> 24

    return next_byte


def _grid(rand: Callable[[], int], rows: int, cols: int) -> np.ndarray:
    return np.array([[[rand() for _ in range(3)] for _ in range(cols)] for _ in range(rows)], dtype=np.float64)


def _bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample (r, c, 3) to (height, width, 3) by bilinear interpolation in float64."""
    ys = np.linspace(0, grid.shape[0] - 1, height)
    xs = np.linspace(0, grid.shape[1] - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, grid.shape[0] - 1), np.minimum(x0 + 1, grid.shape[1] - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def probe_images(height: int, width: int) -> list[np.ndarray]:
    """The probe pictures: uint8 (height, width, 3) RGB each, in a fixed order.

    A smooth colour field, a garment-like block on a gradient, a coarse texture and stripes:
    varied enough that a damaged or miscomputed layer moves at least one of them.
    """
    rand = _lcg(20261127)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = _bilinear(_grid(rand, 5, 4), height, width)
    block = np.stack([xx * 255.0 / max(width - 1, 1), yy * 255.0 / max(height - 1, 1), np.full(xx.shape, 128.0)], -1)
    block[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = [rand(), rand(), rand()]
    coarse = _grid(rand, -(-height // 8), -(-width // 8))
    texture = coarse.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    a, b = np.array([rand(), rand(), rand()], float), np.array([rand(), rand(), rand()], float)
    stripes = np.where((((xx // 12) + (yy // 20)) % 2 == 0)[..., None], a, b)
    return [np.rint(np.clip(p, 0, 255)).astype(np.uint8) for p in (smooth, block, texture, stripes)]


def probe_pixels(prep: PreprocessConfig) -> np.ndarray:
    """float32 (PROBE_COUNT, 3, crop_height, crop_width): the probes through the file's own
    rescale/normalize (no resize: they are made at the input size)."""
    images = probe_images(prep.crop_height, prep.crop_width)
    return np.stack([to_model_input(Image.fromarray(im), prep) for im in images])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    return np.sum(_unit_rows(a) * _unit_rows(b), axis=1)


def input_digest(inputs: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for x in inputs:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


@dataclass
class ProbeRecord:
    """What the metadata holds: the reference outputs and the bar a file must clear.

    kind: "image" (inputs from probe_pixels) or "text" (inputs: the `texts` tokenized by the
        tokenizer shipped beside the file).
    reference: base64 of float32 (count, D), L2-normalized outputs of the fp32 torch model.
    input_sha256: digest of the inputs the exporter fed; a loader that generates other inputs
        (a later version of this generator) cannot check and says so.
    min_cosine: the bar: the export's verification threshold, or PROBE_SLACK under what the file
        scored on the probes at export if that is lower (synthetic probes are not catalogue
        photos, and int8 ranges calibrated on photos may fit them less well).
    exported_cosines: what this file scored where it was exported, on `exported_on` (a CPU).
    """

    kind: str
    count: int
    dim: int
    reference: str
    input_sha256: str
    min_cosine: float
    exported_cosines: list[float]
    exported_on: dict = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    version: int = PROBE_VERSION

    @classmethod
    def make(
        cls,
        kind: str,
        inputs: Sequence[np.ndarray],
        reference: np.ndarray,
        got: np.ndarray,
        min_cosine: float,
        texts: Sequence[str] = (),
    ) -> ProbeRecord:
        """The record for a file whose outputs for `inputs` are `got`, against the fp32 `reference`."""
        ref = _unit_rows(reference).astype(np.float32)
        scores = cosines(got, ref)
        return cls(
            kind=kind,
            count=len(ref),
            dim=int(ref.shape[1]),
            reference=base64.b64encode(ref.tobytes()).decode("ascii"),
            input_sha256=input_digest(inputs),
            min_cosine=round(min(float(min_cosine), float(scores.min()) - PROBE_SLACK), 6),
            exported_cosines=[round(float(c), 6) for c in scores],
            exported_on=dict(cpu_info()),
            texts=list(texts),
        )

    def reference_array(self) -> np.ndarray:
        return np.frombuffer(base64.b64decode(self.reference), dtype=np.float32).reshape(self.count, self.dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProbeRecord:
        return cls(**json.loads(text))


ON_THIS_CPU = ("The file is damaged, or this CPU computes its int8 kernels differently: re-export it here with "
               "--export-onnx, or use the fp32 file.")


def check_file(path, meta: dict[str, str], inputs: Sequence[np.ndarray], run: Callable[[], np.ndarray],
               remedy: str = ON_THIS_CPU) -> str:
    """Run the probes of an ONNX file where it is loaded.

    Args:
        path: the file, for messages.
        meta: its custom metadata map.
        inputs: the probe inputs as this loader makes them (for the digest check).
        run: computes the file's outputs for those inputs, (count, D).
        remedy: the refusal's last sentence (another runtime's says what to do there).
    Returns:
        one line saying what was checked (for the log).
    Raises:
        PipelineError: the outputs are further from the reference than the file's bar; the
            message names the measured cosine and this CPU's int8 instruction sets.
    """
    if META_PROBES not in meta:
        log.warning(
            "%s has no self-check probes (made by another tool or an older version): its outputs on this CPU "
            "are unverified; re-export it with --export-onnx to add them",
            path,
        )
        return "no probes"
    try:
        record = ProbeRecord.from_json(meta[META_PROBES])
        reference = record.reference_array()
    except (TypeError, ValueError, KeyError) as e:
        raise PipelineError(
            f"{path}: its self-check probes are unreadable ({e}); re-export it with --export-onnx"
        ) from e
    if record.version != PROBE_VERSION or record.input_sha256 != input_digest(inputs):
        log.warning(
            "%s: its probes were made by another version of this tool (probe format %s); not checked",
            path,
            record.version,
        )
        return "probes of another version: not checked"
    got = run()
    if got.shape != reference.shape:
        raise PipelineError(
            f"{path} failed its self-check: it returns {got.shape[1:]} vectors, its probes say ({record.dim},)"
        )
    cos = cosines(got, reference)
    worst = float(cos.min()) if len(cos) else 1.0
    if not np.all(np.isfinite(cos)) or worst < record.min_cosine:
        then = min(record.exported_cosines) if record.exported_cosines else float("nan")
        raise PipelineError(
            f"{path} failed its self-check on this CPU: on its {record.count} built-in {record.kind} probes the cosine "
            f"to "
            f"the fp32 model's outputs is {worst:.4f} (needs >= {record.min_cosine}; it was {then:.4f} where it was "
            f"exported, on {cpu_label(record.exported_on)}). This CPU: {cpu_label()}. {remedy}"
        )
    return (
        f"self-check passed: min cosine {worst:.6f} over {record.count} {record.kind} probes (bar {record.min_cosine})"
    )

"""ONNX export: a CLIP model (hub id or folder) in; an fp32 and an int8 ONNX image encoder out,
each carrying the source model and its preprocessing in its metadata, verified against torch
before they are moved into place.

Exporter: torch.onnx.export with dynamo=True (torch.export), opset 18, dynamic batch axis.
Quantization (static: the MatMuls and the convolutions, MatMul outputs left in float; dynamic: the
MatMuls), int8 weights, three ways:
- "static" (default): activation ranges calibrated on gallery images. An image's vector does not
  depend on which other images share its batch, so a file embedded again (a query, a resumed run,
  a video crop) gets exactly its gallery vector. onnxruntime's quantizer writes QDQ; the file is
  saved as onnxruntime's CPU provider runs it best (pipeline/int8graph.py: each bias fused into its
  int8 GEMM, each GELU one op), so any onnxruntime CPU session gets that speed as it opens the file.
- "static-qdq": the same file left as onnxruntime's quantizer writes it (QDQ, uint8 activations
  with zero points), for runtimes that read QDQ but not onnxruntime's contrib ops (OpenVINO); its
  verification runs that graph; the pipeline rewrites it when a CPU session opens it, with the
  vectors of the "static" file.
- "dynamic": quantize_dynamic. Activations are quantized with one scale per batch tensor, so the
  same image embedded in two different batches differs (README, Benchmarks).

Int8 weights are kept to 7 bits (onnxruntime's reduce_range) in all three. onnxruntime multiplies uint8
activations by int8 weights; on CPUs with VNNI or AMX the sums are exact, but on AVX2-only and
AVX-512 CPUs without VNNI the kernel adds each pair of products into a saturating 16-bit sum
(vpmaddubsw). With 8-bit weights a pair can reach 2 x 255 x 127 = 64,770 and is clipped to 32,767;
with 7-bit weights it stays under 2 x 255 x 64 = 32,640, so every CPU computes the same result
(tests/int8_emulation.py emulates that kernel; README, "Int8 that holds on every x86 CPU").

Every file also carries self-check probes (pipeline/probes.py): the fp32 torch model's outputs for
a few fixed inputs, which the file must reproduce wherever it is loaded.

Before the files are moved into place, both are timed on this CPU and the int8 one profiled as a
CPU session runs it (pipeline/onnxspeed.py): the summary says what int8 buys on the machine that
exported it, and how much of its kernel time goes to format conversion.
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import textclean
from .backends import INT8_PROFILES, family_of, load_hint
from .embedders import (
    META_FAMILY,
    META_KIND,
    META_NO_TEXT,
    META_PAD_ID,
    META_PRECISION,
    META_PREPROCESS,
    META_SOURCE_MODEL,
    META_SOURCE_WEIGHTS,
    META_TEXT_CLEAN,
    META_TEXT_CONTEXT,
    META_TEXT_SIDES,
    l2_normalize,
    model_reference,
    model_weights_sha256,
    preprocess_config_of,
    projected,
    text_context,
    text_onnx_path_for,
    tokenizer_path_for,
    weights_unread,
)
from .errors import PipelineError, first_line
from .fileio import link_or_copy, remove_abandoned, sha256_file, waiting_lock
from .int8graph import (
    AMX_GRAPH,
    AMX_RECIPE,
    CPU_GRAPH_RECIPE,
    DEPTHWISE_GRAPH,
    DEPTHWISE_RECIPE,
    FUSED_RECIPE,
    META_INT8_RECIPE,
    VNNI_GRAPH,
    cpu_graph,
    cpu_model,
    gelu_chains,
    in_float,
    per_position_gemm,
    pools_as_convolutions,
    scales_into_matmuls,
    static_graph,
    uint8_gelu,
)
from .machine import cpu_info, cpu_vendor
from .onnxspeed import measure_export
from .preprocess import preprocess_batch
from .probes import META_PROBES, ProbeRecord, probe_pixels
from .tokens import TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

OPSET = 18
FP32_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.99
INT8_MEAN_COSINE = 0.995
# 7-bit int8 weights: no u8 x s8 pair sum saturates on AVX2 / AVX-512 without VNNI (module docstring).
REDUCE_RANGE = True


@dataclass
class ExportReport:
    fp32_path: Path
    int8_path: Path
    images: int
    fp32_cos_min: float
    fp32_cos_mean: float
    int8_cos_min: float
    int8_cos_mean: float
    passed: bool
    probe_fp32_min: float = 1.0
    probe_int8_min: float = 1.0
    probe_int8_bar: float = 1.0
    profile: str = ""  # the int8 profile the static CPU graph was written for (vnni, amx)
    graph: str = ""  # the static CPU graph written (int8graph.static_graph: vnni, amx, float-depthwise)
    speed_lines: list[str] = field(default_factory=list)  # both files on this CPU (onnxspeed.CpuSpeed)
    text_lines: list[str] = field(default_factory=list)
    kept_lines: list[str] = field(default_factory=list)  # the earlier file this export replaced, kept

    def lines(self) -> list[str]:
        def ok(good: bool) -> str:
            return "ok" if good else "FAILED"

        return [
            f"verified on {self.images} images against torch (cosine of unnormalized-then-normalized features):",
            f"  fp32 ONNX: min {self.fp32_cos_min:.6f}, mean {self.fp32_cos_mean:.6f} (need min >= {FP32_MIN_COSINE}) "
            f"{ok(self.fp32_cos_min >= FP32_MIN_COSINE)}",
            f"  int8 ONNX: min {self.int8_cos_min:.6f}, mean {self.int8_cos_mean:.6f} (need min >= {INT8_MIN_COSINE}, "
            f"mean >= {INT8_MEAN_COSINE}) "
            f"{ok(self.int8_cos_min >= INT8_MIN_COSINE and self.int8_cos_mean >= INT8_MEAN_COSINE)}",
            f"  self-check probes stored in both files: fp32 min {self.probe_fp32_min:.6f}, int8 min "
            f"{self.probe_int8_min:.6f} "
            f"(the int8 file refuses to run where it scores below {self.probe_int8_bar:.4f})",
            *self.speed_lines,
            *self.text_lines,
            *self.kept_lines,
        ]


def fp32_path_for(int8_path: str | Path) -> Path:
    """onnx/fashion_clip_image_int8_matmul.onnx -> onnx/fashion_clip_image_fp32.onnx; a file an
    export kept (keep_replaced: `<stem>.<12 hex>.onnx`) -> its twin kept with it, under its tag."""
    p = Path(int8_path)
    kept = re.fullmatch(r"(.*)(\.[0-9a-f]{12})", p.stem)
    base, tag = (kept.group(1), kept.group(2)) if kept else (p.stem, "")
    stem = base.replace("_int8_matmul", "").replace("_int8", "")
    return p.with_name(f"{stem}_fp32{tag}{p.suffix}")


def verification_images(n: int = 24, seed: int = 0) -> list[Image.Image]:
    """Deterministic pictures of varied sizes, aspect ratios and content for the export check."""
    rng = np.random.default_rng(seed)
    sizes = [(224, 224), (768, 1024), (1024, 768), (300, 900), (640, 480), (250, 251), (96, 128), (1200, 400)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if i % 3 == 0:  # smooth colour fields
            small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        elif i % 3 == 1:  # gradients with a block, like a garment on a plain background
            yy, xx = np.mgrid[0:h, 0:w]
            arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 128)], -1).astype(
                np.uint8
            )
            arr[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(0, 256, 3)
            im = Image.fromarray(arr)
        else:  # texture
            small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)
        out.append(im)
    return out


def feature_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def export_onnx(
    model: str,
    int8_path: str | Path,
    images: Sequence[Image.Image] | None = None,
    per_channel: bool = True,
    quantization: str = "static",
    calibration_images: Sequence[Image.Image] | None = None,
    profile: str = "auto",
    threads: int = 0,
) -> ExportReport:
    """Export, quantize and verify; files appear at their final paths only if verification passes.

    Args:
        model: hub id or local folder of a transformers CLIP model.
        int8_path: where the int8 model goes; the fp32 one goes beside it (fp32_path_for).
        images: RGB images for the check (default: verification_images()).
        per_channel: per-channel weight quantization (more faithful at the same speed, measured).
        quantization: "static" (calibrated, batch-independent, saved as onnxruntime's CPU runs it),
            "static-qdq" (the same as portable QDQ) or "dynamic".
        calibration_images: RGB images for the static ranges (default: 64 generated pictures that
            are not the verification set); gallery images give the best ranges.
        profile: the static CPU graph for which CPU kind (INT8_PROFILES; "auto": this CPU's,
            `int8_profile`); the tower decides the graph (int8graph.static_graph).
        threads: the threads the files' speed is measured with (--threads; 0: every core).
    Raises:
        PipelineError: the export, quantization or verification failed (nothing is left behind).
    """
    _require_export_packages()
    job = None
    try:
        job = _ImageExport(model, Path(int8_path), per_channel, quantization, int8_profile(profile))
        job.export_fp32()
        job.torch_steps(images)  # everything torch is needed for, then the model is let go
        job.quantize(calibration_images)
        report, records = job.verify()
        report.speed_lines = job.speed(threads)
        if quantization == "static":  # the others have one graph for every CPU
            report.profile, report.graph = job.profile, job.graph
        job.write(report, records)
        return report
    except PipelineError:
        raise
    except Exception as e:  # exporter and quantizer raise many types
        raise PipelineError(f"ONNX export of {model!r} failed: {type(e).__name__}: {e}") from e
    finally:
        if job is not None:
            job.remove_temp_files()


def _require_export_packages() -> None:
    """Fail before any work, with an install hint; the steps import what they use where they use it."""
    try:  # unused here: imported only to fail before loading the model
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: F401
        from transformers import CLIPModel  # noqa: F401

        import onnx  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PipelineError(
            f"--export-onnx needs torch, transformers, onnx and onnxruntime ({e}): pip install -r requirements.txt"
        ) from e


class _ImageExport:
    """One image-tower export: the loaded model and the files that become the final files only
    once both are verified. They are written under their final names in a folder of this export's
    own beside the target (two exports into one folder keep their unfinished files apart; two
    that finish at once move their files in one after the other, under the target's lock, so the
    final files are all of the last to move), so that a tower written with its weights in a `.data`
    file beside it (EXTERNAL_DATA_BYTES) finds them there once moved; remove_temp_files removes the
    folder and whatever is left in it."""

    def __init__(self, model: str, int8_path: Path, per_channel: bool, quantization: str,
                 profile: str = "vnni") -> None:
        self.model, self.quantization, self.per_channel = model, quantization, per_channel
        # the profile asked for (resolved), then that of the graph written; and the graph
        self.profile, self.graph = profile, VNNI_GRAPH
        self.int8_path, self.fp32_path = int8_path, fp32_path_for(int8_path)
        int8_path.parent.mkdir(parents=True, exist_ok=True)
        self.family = family_of(model)
        try:
            self.clip = self.family.load(model, attn_implementation="eager").eval()
        except OSError as e:
            raise PipelineError(f"cannot load model {model!r}: {first_line(e)} {load_hint(model)}") from e
        except Exception as e:  # noqa: BLE001 - weights of another architecture, or damaged: said as a run says them
            raise PipelineError(weights_unread(model, e)) from e
        self.prep = preprocess_config_of(model, self.clip)
        self.tower = image_tower(self.clip)
        self.external = False  # weights in a .data file beside the fp32 file (export_fp32)
        remove_abandoned(int8_path.parent, f".{int8_path.stem}.export-*")
        self.work = Path(tempfile.mkdtemp(prefix=f".{int8_path.stem}.export-", dir=int8_path.parent))
        self.tmp_fp32 = self.work / self.fp32_path.name
        self.tmp_int8 = self.work / int8_path.name
        self.tmp_pre = self.work / f"{int8_path.stem}.pre.onnx"

    @property
    def weight_mode(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    def export_fp32(self) -> None:
        import torch

        example = torch.zeros(2, 3, self.prep.crop_height, self.prep.crop_width)
        self.external = _used_weight_bytes(self.tower, example) > EXTERNAL_DATA_BYTES
        log.info("exporting %s to ONNX (torch.export, opset %d)", self.model, OPSET)
        torch_onnx_export(self.tower, {"pixel_values": example}, "image_embeds", self.tmp_fp32, self.external)
        self.external = bool(_data_files(self.tmp_fp32))  # torch goes external on its own over 1.5 GiB
        _give_memory_back()

    def quantize(self, calibration_images: Sequence[Image.Image] | None) -> None:
        """fp32 temp file -> int8 temp file (module docstring): static, MatMul and Conv; dynamic, MatMul."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        mode = self.weight_mode
        if self.quantization == "dynamic":
            log.info("quantizing MatMul to int8 (dynamic, %s 7-bit weights)", mode)
            quantize_dynamic(
                str(self.tmp_fp32),
                str(self.tmp_int8),
                op_types_to_quantize=["MatMul"],
                weight_type=QuantType.QInt8,
                per_channel=self.per_channel,
                reduce_range=REDUCE_RANGE,
                use_external_data_format=self.external,
            )
            _as_one_file(self.tmp_int8)
        elif self.quantization in ("static", "static-qdq"):
            calib = list(calibration_images) if calibration_images is not None else verification_images(64, seed=1)
            log.info(
                "quantizing MatMul and Conv to int8 (%s, %s 7-bit weights, ranges from %d images)",
                self.quantization, mode, len(calib),
            )
            calib_pixels = preprocess_batch(calib, self.prep)
            profile = self.profile if self.quantization == "static" else None  # portable QDQ: one graph
            self.graph, batch = _quantize_static(self.tmp_fp32, self.tmp_pre, self.tmp_int8, calib_pixels,
                                                 self.per_channel, self.external, profile)
            # a tower that takes no AMX graph gets the VNNI one: the graph written is recorded
            self.profile = "amx" if self.graph == AMX_GRAPH else "vnni"
            if self.quantization == "static":
                # the AMX graph's uint8 GELUs calibrated in the batches the quantizer's were; one save
                amx = self.graph == AMX_GRAPH
                post = (lambda m: uint8_gelus_of(m, calib_pixels, batch)) if amx else None
                _save_cpu_graph(self.tmp_int8, post)
            else:
                _as_one_file(self.tmp_int8)
        else:
            raise PipelineError(
                f"unknown quantization {self.quantization!r}; expected 'static', 'static-qdq' or 'dynamic'"
            )

    @property
    def recipe(self) -> str:
        """The int8 recipe this export makes, recorded in its file."""
        return int8_recipe(self.quantization, self.graph)

    @property
    def meta(self) -> dict[str, str]:
        """What every file of this export records of its source."""
        weights = model_weights_sha256(self.model)
        return {
            META_SOURCE_MODEL: model_reference(self.model),
            **({META_SOURCE_WEIGHTS: weights} if weights else {}),
            META_PREPROCESS: self.prep.to_json(),
            META_KIND: f"{self.family.name}-image-tower",
            META_FAMILY: self.family.name,
        }

    def torch_steps(self, images: Sequence[Image.Image] | None) -> None:
        """The torch model's outputs the verification compares against, and the text tower (exported
        and verified); then the model is let go, so that quantization, whose copies of the graph
        take about five times the tower's weights, does not run beside it (a large tower's export
        needs a few GB less at its peak)."""
        import torch

        imgs = list(images) if images is not None else verification_images()
        self.pixels, self.probes = preprocess_batch(imgs, self.prep), probe_pixels(self.prep)
        with torch.inference_mode():
            self.ref = self.tower(torch.from_numpy(self.pixels)).numpy()
            self.probe_ref = self.tower(torch.from_numpy(self.probes)).numpy()
        self.text = _export_text_tower(self.clip, self.model, self.int8_path, self.meta, self.family.text_mask,
                                       self.work)
        with torch.no_grad():  # emptied in place: onnxscript's rewrite rules keep the last exported graph,
            for t in (*self.clip.parameters(), *self.clip.buffers()):  # which holds these tensors
                t.data = torch.empty(0, dtype=t.dtype)
        del self.clip, self.tower
        _give_memory_back()

    def verify(self) -> tuple[ExportReport, dict[Path, ProbeRecord]]:
        """Both temp files against torch's outputs (torch_steps), logged; their probe records keyed
        by temp path.

        Raises:
            PipelineError: a file misses its bar (the report's lines say which).
        """
        import onnxruntime as ort

        pixels, probes, ref, probe_ref = self.pixels, self.probes, self.ref, self.probe_ref
        c32 = feature_cosines(run_onnx(ort, self.tmp_fp32, pixels), ref)
        c8 = feature_cosines(run_onnx(ort, self.tmp_int8, pixels), ref)
        records = {
            path: ProbeRecord.make("image", [probes], probe_ref, run_onnx(ort, path, probes), bar)
            for path, bar in ((self.tmp_fp32, FP32_MIN_COSINE), (self.tmp_int8, INT8_MIN_COSINE))
        }
        p32, p8 = min(records[self.tmp_fp32].exported_cosines), min(records[self.tmp_int8].exported_cosines)
        report = ExportReport(
            self.fp32_path,
            self.int8_path,
            len(pixels),
            float(c32.min()),
            float(c32.mean()),
            float(c8.min()),
            float(c8.mean()),
            passed=bool(c32.min() >= FP32_MIN_COSINE and c8.min() >= INT8_MIN_COSINE and c8.mean() >= INT8_MEAN_COSINE),
            probe_fp32_min=p32,
            probe_int8_min=p8,
            probe_int8_bar=records[self.tmp_int8].min_cosine,
        )
        for line in report.lines():  # the run's summary lists them (main.py); a caller of export_onnx has them
            log.debug(line)          # in the report it returns
        if not report.passed:
            raise PipelineError("ONNX export failed verification; no file was written:\n" + "\n".join(report.lines()))
        return report, records

    def speed(self, threads: int = 0) -> list[str]:
        """Both verified files on this CPU (onnxspeed.measure_export), the int8 one as a CPU session
        will run it, on `threads` (0: every core); a failed measurement is said in its line and
        fails nothing."""
        try:
            meta = {META_INT8_RECIPE: self.recipe}  # written into the file only later
            lines = measure_export(cpu_model(self.tmp_int8, meta) or self.tmp_int8, self.tmp_fp32,
                                   dynamic=self.quantization == "dynamic", threads=threads).lines()
        except Exception as e:  # onnxruntime raises many types; the files themselves are verified
            log.warning("could not measure the exported files' speed: %s: %s", type(e).__name__, first_line(e))
            return [f"speed on this CPU not measured ({type(e).__name__}: {first_line(e)})"]
        for line in lines:  # in the report's lines, as the verification's
            log.debug(line)
        return lines

    def write(self, report: ExportReport, records: dict[Path, ProbeRecord]) -> None:
        """Stamp the verified files' metadata, add the text tower, then move everything into place:
        the renames come last so that a failure before them leaves no file behind."""
        import onnx

        meta = self.meta
        kind = "static" if self.quantization == "static-qdq" else self.quantization  # the recipe tells the two apart
        precision = f"int8-{kind}-matmul-{self.weight_mode}-7bit"
        fp32_meta = {**meta, META_PRECISION: "fp32", META_PROBES: records[self.tmp_fp32].to_json()}
        int8_meta = {**meta, META_PRECISION: precision, META_PROBES: records[self.tmp_int8].to_json(),
                     META_INT8_RECIPE: self.recipe}
        if self.text.absent:  # said by a text search against the file (no export can make its text tower)
            fp32_meta[META_NO_TEXT] = int8_meta[META_NO_TEXT] = self.text.absent
        _set_metadata(onnx, self.tmp_fp32, fp32_meta)
        _set_metadata(onnx, self.tmp_int8, int8_meta)
        report.text_lines = self.text.lines
        with waiting_lock(move_lock_path(self.int8_path), lambda: log.info(
                "waiting for another export to %s to finish moving its files into place", self.int8_path.parent)):
            renames = _Renames()
            try:
                report.kept_lines = keep_replaced(self.int8_path, self.tmp_int8, self.fp32_path, self.tmp_fp32,
                                                  renames)
                _move_into_place(self.tmp_fp32, self.fp32_path)
                _move_into_place(self.tmp_int8, self.int8_path)
                self.text.commit()
            except BaseException:  # an error or a stop midway: the replaced files back where they were
                renames.undo()
                raise

    def remove_temp_files(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


_EXPORTED_SINCE_WALK = False  # torch.onnx.export ran since _give_memory_back last looked for its matchers


def _give_memory_back() -> None:
    """Collect what was let go and hand the freed heap back to the system (glibc's malloc_trim;
    elsewhere a no-op), so that the next step's peak does not stand on the last one's.

    onnxscript's rewrite rules, which torch's exporter runs over every graph it exports, are
    module-level objects whose matchers keep the last graph they looked at: the whole exported
    graph stays alive after torch.onnx.export returns (600 MB for FashionCLIP, measured). Their
    references are dropped here; a version of onnxscript without them is left as it is."""
    import ctypes
    import gc

    global _EXPORTED_SINCE_WALK
    matchers = []
    if _EXPORTED_SINCE_WALK:  # the walk of every object (0.3-0.7 s) only where torch's exporter ran since the last
        _EXPORTED_SINCE_WALK = False
        try:
            from onnxscript.rewriter._matcher import SimplePatternMatcher

            with _exporter_quiet():  # the walk meets torch.distributed.reduce_op, whose isinstance check warns
                matchers = [o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)]
        except ImportError:  # pragma: no cover - another onnxscript
            pass
    for matcher in matchers:
        for attr in ("_graph", "_match", "_current_node", "_tracer"):
            if getattr(matcher, attr, None) is not None:
                setattr(matcher, attr, None)
    del matchers
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def move_lock_path(int8_path: Path) -> Path:
    """The lock file that the exports to `int8_path` take while they move their files into place:
    the image files, the text tower and its tokenizer of two exports that finish at once are
    then all of one of them, never some of each."""
    return int8_path.parent / f".{int8_path.stem}.export.lock"


# A tower whose weights take more than this is written with them in a `.data` file beside its
# .onnx file (ONNX's external data; one protobuf holds at most 2 GB, and torch's exporter switches
# at 1.5 GiB on its own): SigLIP so400m's or a ViT-H's fp32 towers. The int8 image file, a quarter
# of the size, is always one file.
EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024


def _used_weight_bytes(tower, *inputs) -> int:
    """Bytes of the weights of the modules a forward pass of `tower` runs: one tower's, though the
    wrapper holds the whole two-tower model."""
    import torch

    used: dict[int, int] = {}

    def note(module, _args) -> None:
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            used[id(t)] = t.numel() * t.element_size()

    hooks = [m.register_forward_pre_hook(note) for m in tower.modules()]
    try:
        with torch.inference_mode():
            tower(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return sum(used.values())


def _data_files(path: Path) -> list[Path]:
    """The external-data files the ONNX file at `path` names (none for a file that holds its weights)."""
    from onnx.external_data_helper import uses_external_data

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer if uses_external_data(t) for e in t.external_data
             if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def _as_one_file(path: Path) -> None:
    """The ONNX file at `path` rewritten with its weights inside it, when they are in external data."""
    from onnx.external_data_helper import convert_model_from_external_data

    import onnx

    data = _data_files(path)
    if not data:
        return
    model = onnx.load(str(path))
    convert_model_from_external_data(model)
    onnx.save(model, str(path))
    for f in data:
        f.unlink(missing_ok=True)


@dataclass
class _Renames:
    """The renames and links keep_replaced made, undone in reverse when the export cannot finish
    moving its files into place: the files it replaced are where they were, not under kept names
    beside no new file."""

    moved: list[tuple[Path, Path]] = field(default_factory=list)
    linked: list[Path] = field(default_factory=list)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        self.moved.append((src, dst))

    def link(self, src: Path, dst: Path) -> None:
        link_or_copy(src, dst)
        self.linked.append(dst)

    def undo(self) -> None:
        for made in reversed(self.linked):
            made.unlink(missing_ok=True)
        for src, dst in reversed(self.moved):
            if dst.is_file():
                os.replace(dst, src)  # over a new file moved there since: the old one back in its place


def keep_replaced(int8_path: Path, new_int8: Path, fp32_path: Path | None = None,
                  new_fp32: Path | None = None, renames: _Renames | None = None) -> list[str]:
    """The files an export replaces, when their bytes differ from the new ones', kept beside them
    under the first 12 hex digits of their sha256 (`<stem>.<sha>.onnx`): the int8 file with its text
    tower and tokenizer (renamed as text_onnx_path_for names them for that file; a text tower with
    external data stays, as its .data file would be replaced), and the fp32 file (one without
    external data) with a link to that text tower. The stores made with either still open with it,
    and a refused store's remedy finds it by the sha256 the store records. Returns the report's
    lines (none when nothing was replaced)."""
    renames = renames if renames is not None else _Renames()
    lines: list[str] = []
    kept_text: Path | None = None
    kept_int8: Path | None = None
    if int8_path.is_file() and not filecmp.cmp(int8_path, new_int8, shallow=False):
        keep = kept_int8 = _kept_name(int8_path)
        moves = [(int8_path, keep)]
        text = text_onnx_path_for(int8_path)
        with_text = text.is_file() and not _data_files(text)
        if with_text:
            kept_text = text_onnx_path_for(keep)
            moves += [(text, kept_text), (tokenizer_path_for(text), tokenizer_path_for(kept_text))]
        for src, dst in moves:
            if src.is_file():
                renames.replace(src, dst)
        text_said = (" with its text tower" if with_text else
                     " (its text tower, whose weights are in a .data file, is not kept: text queries need it "
                     "exported again)" if text.is_file() else "")
        lines.append(f"the int8 file this export replaced is kept as {keep}{text_said}: stores made with it open "
                     f"with --onnx {keep}; delete it when none does")
    if fp32_path is None or new_fp32 is None or not fp32_path.is_file():
        return lines
    if _data_files(fp32_path):
        lines.append(f"the fp32 file this export replaced ({fp32_path}, its weights in a .data file) is not kept: a "
                     "store made with --onnx on it needs that model exported again")
        return lines
    twin = fp32_path_for(kept_int8) if kept_int8 is not None else None  # where the kept int8 file's twin is looked for
    if not filecmp.cmp(fp32_path, new_fp32, shallow=False):
        keep = _kept_name(fp32_path)
        renames.replace(fp32_path, keep)
        if twin is not None and twin != keep:
            renames.link(keep, twin)
        text_said = " (no text tower kept with it: text queries of its stores need it exported again)"
        if kept_text is not None and kept_text.is_file():  # the towers were exported together: the same text tower
            for src, dst in ((kept_text, text_onnx_path_for(keep)),
                             (tokenizer_path_for(kept_text), tokenizer_path_for(text_onnx_path_for(keep)))):
                if src.is_file() and src != dst:
                    renames.link(src, dst)
            text_said = " with its text tower"
        lines.append(f"the fp32 file this export replaced is kept as {keep}{text_said}: stores made with it open "
                     f"with --onnx {keep}; delete it when none does")
    elif twin is not None:  # the same fp32 bytes: the kept int8 file's twin still
        renames.link(fp32_path, twin)
    return lines


def _kept_name(path: Path) -> Path:
    """model_int8.onnx -> model_int8.<first 12 hex of its sha256>.onnx"""
    return path.with_name(f"{path.stem}.{sha256_file(path)[:12]}{path.suffix}")


def _move_into_place(src: Path, dst: Path, onnx_file: bool = True) -> None:
    """An exported file and, for an ONNX file (whatever its name ends with), the external-data
    files it names (under the same names: they are written under their final names) moved beside
    `dst`; a `.data` file an earlier export left there under dst's name, that this file does not
    name, is removed."""
    data = _data_files(src) if onnx_file else []
    for f in data:
        os.replace(f, dst.parent / f.name)
    os.replace(src, dst)
    stale = dst.with_name(dst.name + ".data")
    if stale.name not in {f.name for f in data}:
        stale.unlink(missing_ok=True)


TEXT_PROBES = [
    "a red floral midi dress", "blue denim jacket", "black leather ankle boots", "white cotton t-shirt",
    "striped shirt",
]


@dataclass
class _TextExport:
    """A verified text tower waiting in temp files; commit() moves it into place."""

    lines: list[str]
    moves: list[tuple[Path, Path]] = field(default_factory=list)  # the text tower, then its tokenizer
    absent: str = ""  # why there is none (recorded in the image files: the text search's refusal says it)
    # When this export has no text tower: the paths of one beside the target, removed at commit
    # (under the target's lock) whatever is there then, an export that finished meanwhile's too.
    removes: list[Path] = field(default_factory=list)

    def commit(self) -> None:
        for i, (src, dst) in enumerate(self.moves):
            _move_into_place(src, dst, onnx_file=i == 0)
        for old in self.removes:
            old.unlink(missing_ok=True)


def _export_text_tower(clip, model: str, int8_path: Path, meta: dict[str, str], masked: bool,
                       work: Path) -> _TextExport:
    """Export the text tower (fp32, the model's context: 77 tokens for CLIP, 64 for SigLIP; dynamic
    batch) and its tokenizer.json into `work` (the image export's folder, removed after it),
    verified against torch. A model without a tokenizer gets no text tower, said in the report.
    masked: the tower reads an attention mask (CLIP); SigLIP's takes the padded ids alone, as it
    was trained."""
    import onnx

    text_path = text_onnx_path_for(int8_path)
    tok_path = tokenizer_path_for(text_path)
    context = text_context(clip.config)
    clean_mode = ""
    if hasattr(clip, "text_export"):  # open_clip: its tokenizer, when `tokenizers` can repeat it
        got = clip.text_export()
        if isinstance(got, str):
            return _no_text_tower(got, text_path, tok_path, " (text search with this model runs with --backend torch)")
        tok, clean_mode = got
    else:
        try:
            tok = load_tokenizer(model)
        except TokenizerError as e:
            return _no_text_tower(f"{e}", text_path, tok_path)
        if not getattr(tok, "is_fast", False):
            return _no_text_tower(f"{model} has no fast (tokenizer.json) tokenizer", text_path, tok_path)
    cleaned = [textclean.clean(t, clean_mode) for t in TEXT_PROBES]
    enc = tok(cleaned, padding="max_length", truncation=True, max_length=context, return_tensors="pt")
    if hasattr(clip, "tokenize") and not bool((clip.tokenize(TEXT_PROBES) == enc["input_ids"]).all()):
        return _no_text_tower("the tokenizer's ids differ from open_clip's on the probe texts", text_path, tok_path)
    tmp_text, tmp_tok = work / text_path.name, work / tok_path.name
    tower = _text_tower(clip, masked)
    _export_text_graph(tower, enc, tmp_text, masked)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.backend_tokenizer.save(str(tmp_tok))
    line, probes = _verify_text_graph(tower, enc, tmp_text, masked)
    text_meta = {
        **meta,
        META_KIND: f"{meta.get(META_FAMILY, 'clip')}-text-tower",
        META_TEXT_CONTEXT: str(context),
        META_PRECISION: "fp32",
        META_PAD_ID: str(int(pad_id)),
        META_TEXT_SIDES: f"{getattr(tok, 'padding_side', 'right')},{getattr(tok, 'truncation_side', 'right')}",
        **({META_TEXT_CLEAN: clean_mode} if clean_mode else {}),
        META_PROBES: probes.to_json(),
    }
    _set_metadata(onnx, tmp_text, text_meta)
    return _TextExport([line], [(tmp_text, text_path), (tmp_tok, tok_path)])


def _no_text_tower(why: str, text_path: Path, tok_path: Path, more: str = "") -> _TextExport:
    """The report's one line for an export without text search; an earlier export's text tower beside
    the new image file is removed, since it belongs to other weights."""
    paths = [text_path, text_path.with_name(text_path.name + ".data"), tok_path]
    stale = [p for p in paths if p.exists()]
    removed = f" (the earlier export's {', '.join(p.name for p in stale)} removed)" if stale else ""
    return _TextExport([f"text tower not exported, so no text search with this file: {why}{more}{removed}"],
                       removes=paths, absent=why)


def _text_tower(clip, masked: bool = True):
    """Wrap a CLIP or SigLIP model as (input_ids[, attention_mask]) (B, context) -> projected text
    features (B, D), before normalization: what get_text_features returns."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, input_ids, attention_mask=None):
            if not masked:
                return projected(self.clip.get_text_features(input_ids=input_ids))
            return projected(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    return TextTower().eval()


def _export_text_graph(tower, enc, path: Path, masked: bool = True) -> None:
    """The text tower to ONNX, traced on two of the probe texts with a dynamic batch axis; its
    weights in a .data file beside it when they are over EXTERNAL_DATA_BYTES."""
    names = ["input_ids", "attention_mask"] if masked else ["input_ids"]
    external = _used_weight_bytes(tower, *(enc[n][:2] for n in names)) > EXTERNAL_DATA_BYTES
    torch_onnx_export(tower, {n: enc[n][:2] for n in names}, "text_embeds", path, external)


def torch_onnx_export(module, inputs: dict[str, Any], output: str, path: Path, external: bool) -> None:
    """`module` to ONNX at `path` by torch.export (opset OPSET), its inputs named and traced on the
    tensors of `inputs`, each with a dynamic batch axis (its first), its one output named `output`;
    its weights in a .data file beside it where `external`; torch's own warnings quiet."""
    import torch

    global _EXPORTED_SINCE_WALK
    _EXPORTED_SINCE_WALK = True  # its rewrite rules' matchers may keep this graph: _give_memory_back lets it go
    batch = torch.export.Dim("batch")
    with _exporter_quiet():
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=[output],
            dynamic_shapes={n: {0: batch} for n in inputs},
            opset_version=OPSET,
            dynamo=True,
            external_data=external,
            verbose=False,
        )


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """torch.onnx.export without its warnings about torch's own internals: the deprecation of
    `torch.distributed.reduce_op` (an isinstance check on it warns; so does _give_memory_back's
    walk of every object) and a dynamic axis named after itself. Neither says anything a user can
    act on; the export's progress is our log's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        yield


def _verify_text_graph(tower, enc, path: Path, masked: bool = True) -> tuple[str, ProbeRecord]:
    """The exported text tower against torch on the probe texts: the report line and the probe
    record the file will carry.

    Raises:
        PipelineError: the file misses the fp32 bar.
    """
    import onnxruntime as ort
    import torch

    with torch.inference_mode():
        ref = tower(enc["input_ids"], enc["attention_mask"]).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [enc["input_ids"].numpy().astype(np.int64), enc["attention_mask"].numpy().astype(np.int64)]
    feeds = {"input_ids": inputs[0], "attention_mask": inputs[1]} if masked else {"input_ids": inputs[0]}
    got = sess.run(None, feeds)[0]
    cos = feature_cosines(got, ref)
    line = (
        f"  text fp32 ONNX: min {cos.min():.6f} over {len(TEXT_PROBES)} texts (need >= {FP32_MIN_COSINE}); "
        f"stored as its self-check probes"
    )
    if cos.min() < FP32_MIN_COSINE:
        raise PipelineError("text tower export failed verification; no file was written:\n" + line)
    return line, ProbeRecord.make("text", inputs, ref, got, FP32_MIN_COSINE, texts=TEXT_PROBES)


# How each quantization makes its int8 file, recorded in the file (fashion_pipeline.int8_recipe): a
# file made by an earlier recipe still loads (its probes vouch for it), and a benchmark can tell it is
# not the current one. Static: "matmul-float-out+conv+gemm+relu+cpu-graph" now (saved as the CPU
# runs it; QDQ, as "static-qdq" writes it, "matmul-float-out+conv+gemm+relu"); on 2026-12-04
# "matmul-float-out+conv+cpu-graph" and its QDQ "matmul-float-out+conv" (Relus, Gemms and pools in
# float); "matmul-float-out" from 2026-12-03; "matmul-qdq-out" before.
INT8_RECIPES = {"static": CPU_GRAPH_RECIPE, "static-qdq": FUSED_RECIPE, "dynamic": "matmul-dynamic"}
# --int8-profile: which static CPU graph the export writes (int8graph.static_graph: by the profile and
# the tower). "vnni": CPU_GRAPH_RECIPE, the fastest where the int8 GEMMs are most of the time (an
# AMD EPYC's AVX-512 VNNI), and for a ConvNeXt DEPTHWISE_RECIPE, its depthwise convolutions in float;
# "amx": AMX_RECIPE, whose attention products (a ConvNeXt's depthwise convolutions) stay in float and
# whose GELUs run in uint8, so that fewer passes turn activations between float and uint8 where the
# GEMMs are cheap against them (AMX; and Intel's cores with their AVX-512 VNNI or AVX2 kernels, README
# "Int8 by CPU kind"); "auto": the profile of the CPU the export runs on. Either file runs on every
# CPU, batch-independent.
# INT8_PROFILES (pipeline/backends.py, which the command line reads without importing this module).


def int8_profile(profile: str = "auto") -> str:
    """The CPU kind `profile` names: "auto" is "amx" on a CPU with AMX int8 (amx_int8 in /proc/cpuinfo,
    less what a CPUID mask hides) and on an Intel CPU with AVX2 or more, "vnni" elsewhere (an AMD
    EPYC). On a Xeon's cores with CPUID masked to the AVX-512 VNNI and AVX2 kernels, the AMX graph
    ran 0.98-1.05x the VNNI graph's speed with conversion + Add at 3.0-8.8% of kernel time against
    7.1-22.9% (every family's; the ViTs' VNNI graph over the 10% bar on the VNNI kernels); on an AMD
    EPYC it ran 0.93-0.99x (a ConvNeXt's 0.87x) where the VNNI graph already converts 4.9-5.6%
    (README, "Other CPU kinds' kernels", "Int8 by CPU kind")."""
    if profile not in INT8_PROFILES:
        raise PipelineError(f"unknown int8 profile {profile!r}; expected one of {', '.join(INT8_PROFILES)}")
    if profile == "auto":
        found = cpu_info().get("isa")
        isa = set(found) if isinstance(found, (list, tuple, set)) else set()
        intel = cpu_vendor() == "GenuineIntel" and "avx2" in isa
        return "amx" if "amx_int8" in isa or intel else "vnni"
    return profile


def int8_recipe(quantization: str, graph: str = VNNI_GRAPH) -> str:
    """The recipe an export of `quantization` writing the static CPU `graph` (int8graph.static_graph:
    "vnni", "amx", "float-depthwise") records in its file: the graph changes the static CPU file alone
    (portable QDQ and dynamic files are one recipe)."""
    if quantization != "static":
        return INT8_RECIPES[quantization]
    return {AMX_GRAPH: AMX_RECIPE, DEPTHWISE_GRAPH: DEPTHWISE_RECIPE}.get(graph, INT8_RECIPES[quantization])

# What the export's summary says of each (--quantization).
INT8_FORMATS = {"static": "static, saved as onnxruntime's CPU runs it (--quantization static-qdq for portable QDQ)",
                "static-qdq": "static, portable QDQ", "dynamic": "dynamic"}


def calibration_reader(calib_pixels: np.ndarray, batch: int = 8):
    """onnxruntime's CalibrationDataReader over preprocessed pictures, `batch` at a time (a class: a
    fresh instance reads from the start). The ranges (MinMax over every picture) do not depend on
    the batch; the calibration run's memory does."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self):
            if self.start >= len(calib_pixels):
                return None
            got = {"pixel_values": calib_pixels[self.start : self.start + batch]}
            self.start += batch
            return got

    return Reader


# The calibration run keeps the float activations of about a third of the graph's tensors at once,
# and onnxruntime holds twice a run's peak after its second run: SigLIP so400m's tower, 2.2 GB of
# float tensors per picture in all, took 17 GB calibrating 8 pictures at a time. Pictures go in
# batches whose tensors add up to at most this (8 at most; 1 at least).
CALIBRATION_BYTES = 1 << 30


def calibration_batch(model: Any) -> int:
    """How many pictures to calibrate at a time for a shape-inferred float graph (the loaded model):
    as many as CALIBRATION_BYTES of its float activations allows (per picture: the size of every
    float tensor that has a batch axis, less that axis; an estimate, tensors of unknown shape
    uncounted), from 1 to 8."""
    import onnx

    graph = model.graph
    per_picture = 0
    for v in graph.value_info:
        t = v.type.tensor_type
        dims = t.shape.dim
        if t.elem_type == onnx.TensorProto.FLOAT and any(d.HasField("dim_param") for d in dims):  # by the batch
            per_picture += 4 * int(np.prod([d.dim_value for d in dims if d.HasField("dim_value")]))
    return max(1, min(8, CALIBRATION_BYTES // max(per_picture, 1)))


def _quantize_static(fp32: Path, pre: Path, out: Path, calib_pixels: np.ndarray, per_channel: bool,
                     external: bool = False, profile: str | None = None) -> tuple[str, int]:
    """QDQ int8 for MatMul, the convolutions (a ViT's patch convolution, a ResNet's every one, its
    Relus folded into them) and every Gemm over every position: uint8 asymmetric activations
    (MinMax ranges), 7-bit int8 weights, MatMul and Gemm outputs in float. external: the fp32
    file's weights are in a .data file, and so are those of every file made on the way.
    profile: the static CPU graph's profile ("amx", "vnni"; None: the VNNI graph, as portable QDQ
    is), which with the tower decides the graph (int8graph.static_graph): the AMX graph leaves a
    transformer's MatMuls of two activations (attention products) or a ConvNeXt's depthwise
    convolutions in float, and the uint8 GELU (`uint8_gelus_of`) follows; the VNNI profile's graph
    for a ConvNeXt leaves its depthwise convolutions in float. Returns the graph made, and how many
    pictures were calibrated at a time (`calibration_batch`), for the uint8 GELUs' ranges."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=f"{pre.name}.data")
    excluded, graph, batch = _before_quantization(pre, per_channel, profile)
    log.info("calibrating %d picture(s) at a time", batch)
    Reader = calibration_reader(calib_pixels, batch)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        # Conv too: in a ViT tower the patch convolution alone, which onnxruntime then runs as
        # QLinearConv (its output uint8, turned to float once for the class token and position
        # embedding; README, "Int8 recipes"). A convolutional tower (an open_clip ResNet or
        # ConvNeXt, but for the AMX profile's depthwise ones) has every convolution quantized (a tiny
        # ResNet's is tested), and its probes
        # decide whether the file passes. 7-bit weights keep AVX2 exact, as for the MatMuls.
        # Relu and Clip: the quantizer then drops them, the op before them writing the
        # activation's range (which starts at 0): no dequantize -> Relu -> quantize between two
        # convolutions. A ViT has none. Gemm: a Gemm over every position (open_clip ViTs'
        # attention output projection, a ResNet's attention pool) is a MatMul written otherwise;
        # one of a row per picture (a final projection) stays float, as it always was.
        op_types_to_quantize=["MatMul", "Conv", "Relu", "Clip", "Gemm"],
        nodes_to_exclude=excluded,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=REDUCE_RANGE,
        use_external_data_format=external,
        # No QuantizeLinear on a MatMul's output: onnxruntime then runs each as MatMulIntegerToFloat
        # (int8 GEMM, dequantized in its epilogue) instead of QLinearMatMul + DequantizeLinear before
        # the float bias/residual Adds. Scales stay the calibrated ones (batch-independent); faster
        # and closer to fp32 (benchmarks/int8_recipes.py); _save_cpu_graph then fuses the bias.
        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
    )
    return graph, batch


def _before_quantization(pre: Path, per_channel: bool = True,
                         profile: str | None = None) -> tuple[list[str], str, int]:
    """The float graph at `pre` with its pools rewritten as int8 runs them best
    (int8graph.pools_as_convolutions) and, for per-channel weights, its layer scales folded into the
    MatMul before them (int8graph.scales_into_matmuls: a ConvNeXt's); a ViT has neither, and its
    file is left as it is. Returns the names of the Gemms that do not run over every position
    (`per_position_gemm`), for the quantizer to leave in float (it matches nodes by name: an unnamed
    Gemm is named first), and those the static graph of `profile` for this tower leaves in float
    (int8graph.static_graph, `in_float`: the AMX graph's attention products or, in a tower without
    them, depthwise convolutions; a ConvNeXt's depthwise convolutions under "vnni"); that graph;
    and the calibration batch (`calibration_batch`, of the graph as loaded here: parsed once). The
    file is saved again only where a node was rewritten or named."""
    import onnx

    model = onnx.load(str(pre), load_external_data=False)  # weights stay where they are, even over 2 GB
    batch = calibration_batch(model)
    unnamed = sum(not n.name for n in model.graph.node)
    # the graph as exported (a benchmark asks the fp32 file the same); before the pools become
    # depthwise convolutions, which are for int8
    graph = static_graph(model, profile) if profile else VNNI_GRAPH
    floats = in_float(model, graph)
    changed = pools_as_convolutions(model)
    if per_channel:
        changed += scales_into_matmuls(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    for i, node in enumerate(gemms):
        node.name = node.name or f"gemm_{i}_{node.output[0]}"
    if changed or sum(not n.name for n in model.graph.node) < unnamed:
        onnx.save(model, str(pre))
    return [n.name for n in gemms if not per_position_gemm(model, n)] + floats, graph, batch


def uint8_gelus_of(model, calib_pixels: np.ndarray, batch: int = 8) -> None:
    """The CPU graph `model` rewritten in place so that each GELU between two int8 MatMuls runs on
    uint8 values (int8graph.uint8_gelu, the AMX profile; `_save_cpu_graph`'s post step). The first
    MatMul's output range is calibrated as the quantizer calibrates (MinMax over the same pictures,
    in its batches), but on this int8 graph's outputs, those the GELU will read, not the fp32 graph's."""
    chains = gelu_chains(model)
    if not chains:  # the float graph's GELUs (static_graph) did not reach the CPU graph as chains
        log.warning("AMX profile: no GELU between two int8 MatMuls to run in uint8; the attention products or "
                    "depthwise convolutions alone are in float")
        return
    ranges = output_ranges(model, [mm.output[0] for mm, *_ in chains], calib_pixels, batch)
    rewritten = uint8_gelu(model, chains, ranges)
    log.info("AMX profile: %d GELU(s) in uint8 (QGemm, QLinearMul, QLinearSigmoid)", rewritten)


def output_ranges(model, names: list[str], pixels: np.ndarray, batch: int = 8,
                  options=None) -> list[tuple[float, float]]:
    """(min, max) of each named value of `model` over `pixels`, `batch` at a time, each range holding
    0 (onnxruntime's MinMax calibration): the values are read as extra outputs of one session, and
    the model is left as it was. options: the session's (default: onnxruntime's)."""
    import onnxruntime as ort

    import onnx
    from onnx import helper

    outputs = [o.name for o in model.graph.output]
    count = len(outputs)
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in dict.fromkeys(names) if n not in outputs)
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model.graph.output[count:]
    lo, hi = [0.0] * len(names), [0.0] * len(names)
    for i in range(0, len(pixels), batch):
        for k, value in enumerate(sess.run(names, {sess.get_inputs()[0].name: pixels[i : i + batch]})):
            lo[k], hi[k] = min(lo[k], float(value.min())), max(hi[k], float(value.max()))
    return list(zip(lo, hi))


def _save_cpu_graph(path: Path, post=None) -> None:
    """The QDQ file at `path` rewritten in place into the graph onnxruntime's CPU provider runs
    best (pipeline/int8graph.py), and by `post` (a function of the model: the AMX profile's uint8
    GELUs) before it is saved, once; the export's verification then checks that graph itself."""
    from onnx.external_data_helper import convert_model_from_external_data

    import onnx

    data = _data_files(path)
    model = onnx.load(str(path))
    convert_model_from_external_data(model)  # the int8 file is one file (a quarter of the fp32 weights)
    rewrites = cpu_graph(model)
    log.info("int8 graph written as onnxruntime's CPU runs it: %d rewrites (bias into the int8 GEMM, GELU as one op)",
             rewrites)
    if post is not None:
        post(model)
    onnx.save(model, str(path))
    for f in data:
        f.unlink(missing_ok=True)


def _set_metadata(onnx, path: Path, props: dict[str, str]) -> None:
    m = onnx.load(str(path), load_external_data=False)  # external weights stay in their .data file
    existing = {p.key: p for p in m.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = m.metadata_props.add()
            entry.key, entry.value = k, v
    onnx.save(m, str(path))


def run_onnx(ort, path: Path, pixels: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: pixels[i : i + 16]})[0] for i in range(0, len(pixels), 16)])


def image_tower(clip):
    """Wrap a CLIPModel as pixel_values (B, 3, H, W) -> projected image features (B, D), before
    normalization: what CLIPModel.get_image_features returns."""
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, pixel_values):
            return projected(self.clip.get_image_features(pixel_values=pixel_values))

    return ImageTower().eval()

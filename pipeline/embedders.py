"""Embedders: float32 (B, 3, H, W) pixels in, float32 (B, D) L2-normalized embeddings out.

One interface, two backends picked once by `make_embedder`: transformers' CLIPModel
(`get_image_features`) and onnxruntime running an exported image tower. Both return the same shape,
dtype and normalization, so nothing downstream asks which one it got. The ONNX backend imports
neither torch nor transformers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import textclean
from .backends import (
    BACKENDS,
    ONNXRUNTIME,
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_PREFIX,
    family_of,
    hub_reference,
    known_family,
    load_hint,
    open_clip_weights,
)
from .errors import PipelineError, UsageError, first_line
from .fileio import file_version, sha256_bytes, sha256_file_once, unlink_quietly
from .identity import VectorIdentity
from .int8graph import CPU_GRAPH_RECIPES, META_INT8_RECIPE, cached_cpu_model, cpu_model, keep_cpu_model
from .preprocess import PIXELS_OF_DECODE, PreprocessConfig
from .probes import META_PROBES, PROBE_VERSION, ProbeRecord, check_file, input_digest, probe_pixels
from .tokens import TEXT_CONTEXT, TokenizerError, check_distinct, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Keys written into the ONNX file's metadata by `pipeline.export` and read back here.
META_SOURCE_MODEL = "fashion_pipeline.source_model"
META_PREPROCESS = "fashion_pipeline.preprocess"
META_PRECISION = "fashion_pipeline.precision"
META_KIND = "fashion_pipeline.kind"
META_PAD_ID = "fashion_pipeline.pad_token_id"
META_FAMILY = "fashion_pipeline.family"  # backends.FAMILIES; absent in files made before SigLIP: "clip"
META_TEXT_CONTEXT = "fashion_pipeline.text_context"  # tokens the text tower takes; absent: 77
META_TEXT_SIDES = "fashion_pipeline.text_sides"  # the tokenizer's "padding,truncation" sides; absent: right,right
META_TEXT_CLEAN = "fashion_pipeline.text_clean"  # open_clip's cleaning before tokenizing (textclean.py); absent: none
# in an image file exported without a text tower: why (no export can make one for its model)
META_NO_TEXT = "fashion_pipeline.no_text_tower"
# the sha256 of the source model's weights (model_weights_sha256), where they are local: a folder moved or
# copied since the export is still the file's model; absent in files exported before 2026-12-07 and from the hub
META_SOURCE_WEIGHTS = "fashion_pipeline.source_weights_sha256"


def text_onnx_path_for(image_onnx: str | Path) -> Path:
    """onnx/fashion_clip_image_int8_matmul.onnx -> onnx/fashion_clip_text_fp32.onnx"""
    p = Path(image_onnx)
    stem = p.stem.replace("_int8_matmul", "").replace("_int8", "").replace("_fp32", "")
    stem = stem.replace("_image", "_text") if "_image" in stem else f"{stem}_text"
    return p.with_name(f"{stem}_fp32{p.suffix}")


def tokenizer_path_for(text_onnx: str | Path) -> Path:
    p = Path(text_onnx)
    return p.with_name(p.stem.replace("_fp32", "") + "_tokenizer.json")


# What a checkpoint of another architecture says as it loads (open_clip's asserts, torch's load_state_dict)
_OTHER_SHAPES = re.compile(r"size mismatch|width changed|Missing key\(s\)|Unexpected key\(s\)|shape mismatch|"
                           r"ignore_mismatched_sizes")  # transformers': a config.json not of its weights


def weights_unread(model: str, e: Exception) -> str:
    """Why a model's weights did not load: shapes of another architecture (open_clip:ARCH:FILE with
    the wrong ARCH, a config.json of another size), or a file damaged or cut short."""
    said = f"cannot load model {model!r}: its weights "
    if isinstance(e, AssertionError) or _OTHER_SHAPES.search(str(e)):
        return (said + f"do not fit its architecture ({type(e).__name__}: {first_line(e)}): they are of another "
                "model; with open_clip:ARCH:FILE, ARCH must be the checkpoint's own (its training config says "
                "which), and a folder's config.json must be its weights' own")
    return said + (f"cannot be read ({type(e).__name__}: {first_line(e)}): a file damaged or cut short; download "
                   "or save it again")


class Embedder(Protocol):
    """What every backend provides (backends subclass it to inherit the defaults).

    identity: what made the vectors (backend, model, precision, file hashes, preprocessing, dim);
        stored in the sidecar and compared before a cache is reused.
    lanes: how many `embed_serial` calls may run at once, one per core, from callers that run one
        thread per core (the gallery's lanes); 1 when the backend is not built for that.
    """

    preprocess_cfg: PreprocessConfig
    dim: int
    identity: VectorIdentity
    lanes: int = 1
    source_file: Path | None = None  # the file it runs (an ONNX file), which a summary names; None: a model's

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Args: pixels float32 (B, 3, H, W), RGB. Returns: float32 (B, D), unit L2 norm per row."""
        ...

    def embed_serial(self, pixels: np.ndarray) -> np.ndarray:
        """`embed` on the calling thread's core only (default: `embed`)."""
        return self.embed(pixels)

    def embed_tensor(self, pixels: Any) -> np.ndarray:
        """`embed` for a torch tensor (B, 3, H, W), possibly on the GPU; backends that run there
        take it where it is (default: through host memory)."""
        return self.embed(pixels.detach().float().cpu().numpy())

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Texts in, float32 (len(texts), D) unit vectors out, in the same space as `embed`."""
        raise PipelineError(f"{type(self).__name__} has no text tower")


DEFAULT_MODEL = "patrickjohncyh/fashion-clip"
DEFAULT_ONNX = "onnx/fashion_clip_image_int8_matmul.onnx"


@dataclass(frozen=True)
class EmbedderSpec:
    """What the user asked for; `resolve_backend` turns backend "auto" into "onnx" or "torch"."""

    model: str = DEFAULT_MODEL
    onnx: str = DEFAULT_ONNX
    backend: str = "auto"  # auto | onnx | torch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | fp16 | int8 (torch backend only)
    threads: int = 0  # 0: all cores this process may use
    # auto (on the GPU when the model runs there, else cpu) | cpu (Pillow decodes and resizes) |
    # cpu-simd (Pillow decodes, torch resizes) | device (torchvision on the model's device): preprocess.PIXELS_OF_DECODE
    decode: str = "auto"
    runtime: str = ONNXRUNTIME  # what runs an ONNX file: backends.ONNX_RUNTIMES (openvino: pipeline/ovruntime.py)

    def resolve_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        # As the reference does: the ONNX file when it exists, transformers otherwise.
        return "onnx" if Path(self.onnx).is_file() else "torch"


def on_cuda(embedder: object) -> bool:
    """The embedder runs on a CUDA device (embedders without a device attribute run on the CPU)."""
    return getattr(embedder, "device", None) == "cuda"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalization in float32; zero rows stay zero (callers treat them as failures)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def exported_from(path: str | Path) -> str:
    """The model the ONNX file at `path` records it was exported from ("" when none, or no file)."""
    return file_source_model(known_file_metadata(path))


def file_source_model(meta: dict[str, str]) -> str:
    """The model an exported file records it was made from, as identities name it (backends.hub_reference:
    a file exported before from an open_clip hub model's plain id names it as open_clip's form)."""
    return hub_reference(meta.get(META_SOURCE_MODEL, ""), meta.get(META_FAMILY, "clip"))


def model_reference(model: str) -> str:
    """The model as recorded: absolute path for a local folder, the hub id otherwise
    (open_clip:ARCH:FILE with the file's absolute path)."""
    named = open_clip_weights(model)
    if named is not None:
        arch, weights = named
        return f"{OPEN_CLIP_PREFIX}{arch}:{Path(weights).resolve()}" if weights else model
    p = Path(model)
    return str(p.resolve()) if p.exists() else hub_reference(model, known_family(model))


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


def model_weights_sha256(model: str) -> str:
    """sha256 of a local model's weight file (a folder's, or open_clip:ARCH:FILE's); "" for a hub
    id (the id names the weights)."""
    named = open_clip_weights(model)
    if named is not None:
        weights = Path(named[1])
        return sha256_file_once(weights) if named[1] and weights.is_file() else ""
    p = Path(model)
    if not p.is_dir():
        return ""
    if (p / OPEN_CLIP_CONFIG).is_file():  # the file open_clip loads, found by its own rule
        chosen = _open_clip_checkpoint(p)
        return sha256_file_once(chosen) if chosen is not None else ""
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return sha256_file_once(p / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (p / index).is_file():  # sharded weights: the index and every shard it names
            try:
                shards = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                shards = []
            return _combined_sha256([p / index, *(p / s for s in shards)])
    # Weights under another name: every weights file there, so that changed weights are never taken for the same
    return _combined_sha256(sorted(f for ext in ("*.safetensors", "*.bin", "*.pth") for f in p.glob(ext)))


def _combined_sha256(files: list[Path]) -> str:
    """One sha256 for several files (their names and sha256s, in order); "" for none."""
    present = [f for f in files if f.is_file()]
    if not present:
        return ""
    return sha256_bytes("\n".join(f"{f.name} {sha256_file_once(f)}" for f in present).encode())


def _open_clip_checkpoint(folder: Path) -> Path | None:
    """The weights file open_clip loads from an open_clip folder (its _find_checkpoint_in_dir)."""
    try:
        from open_clip.factory import _find_checkpoint_in_dir

        found = _find_checkpoint_in_dir(folder)
        return Path(found) if found else None
    except ImportError:  # open_clip absent (it loads nothing then) or another version: its preferred names
        names = (*WEIGHT_FILES[2:], "open_clip_pytorch_model.pth", *WEIGHT_FILES[:2], "pytorch_model.pth", "model.pth")
        return next((folder / n for n in names if (folder / n).is_file()), None)


def requested_identity(spec: EmbedderSpec) -> VectorIdentity:
    """The part of an embedder's identity knowable without loading it; used to check caches.

    Raises:
        PipelineError: the ONNX backend is asked for and the file is missing.
    """
    backend = spec.resolve_backend()
    pixels = PIXELS_OF_DECODE.get(spec.decode)
    if backend == "onnx":
        if not Path(spec.onnx).is_file():
            raise PipelineError(
                f"ONNX file {spec.onnx} not found. Make it with: python main.py --export-onnx --model {spec.model} "
                f"--onnx {spec.onnx}"
            )
        return VectorIdentity(backend="onnx", onnx_sha256=sha256_file_once(spec.onnx), pixels=pixels,
                              runtime=spec.runtime)
    return VectorIdentity(
        backend="torch",
        family=known_family(spec.model),  # from its config.json: SigLIP vectors never meet CLIP's
        model=model_reference(spec.model),
        model_sha256=model_weights_sha256(spec.model) or None,
        precision=None if spec.precision == "auto" else spec.precision,
        pixels=pixels,
    )


def make_embedder(spec: EmbedderSpec) -> Embedder:
    """Build the backend the spec asks for (backend auto resolved here, once; backends.BACKENDS)."""
    backend = spec.resolve_backend()
    if backend not in BACKENDS:
        raise PipelineError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[backend].build(spec)


class SlicedEmbedder(Embedder):
    """An exported image file run by `lanes` one-core runners (onnxruntime's one-thread sessions,
    OpenVINO's infer requests), queued in `_free`: `_run` runs one slice on a free runner, and a
    batch is split over them on `_pool` (None: one runner). A picture's vector does not depend on
    the slice it is in. Its text tower, beside the file, runs on onnxruntime (fp32) either way."""

    path: Path
    _pool: ThreadPoolExecutor | None = None
    _free: queue.SimpleQueue
    _text: _OnnxText | None = None  # opened by the first embed_text
    _input_label = "the image file"  # how check_input's message names the file's input

    def _infer(self, runner: Any, x: np.ndarray) -> np.ndarray:
        """One slice through one runner (contiguous float32 (n, 3, H, W) in, (n, dim) out)."""
        raise NotImplementedError

    def _text_session(self) -> tuple[Any, list[str]]:
        """The onnxruntime session options and providers the text tower runs with."""
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> np.ndarray:
        runner = self._free.get()  # a free runner; blocks while all are busy
        try:
            return self._infer(runner, np.ascontiguousarray(x))
        finally:
            self._free.put(runner)

    def check_input(self, pixels: np.ndarray) -> None:
        """Raise PipelineError naming the mismatch when `pixels` does not fit the file's input."""
        want = (3, self.preprocess_cfg.crop_height, self.preprocess_cfg.crop_width)
        if pixels.dtype != np.float32:
            raise PipelineError(f"{self._input_label} takes float32, got {pixels.dtype}")
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise PipelineError(
                f"{self._input_label} takes (batch, {want[0]}, {want[1]}, {want[2]}), got {tuple(pixels.shape)}"
            )

    def _file_identity(self, meta: dict[str, str], sha256: str, runtime: str) -> VectorIdentity:
        """What the file's vectors are, from its metadata (once `dim` and the preprocessing are known)."""
        return VectorIdentity(
            backend="onnx",
            family=meta.get(META_FAMILY, "clip"),
            model=file_source_model(meta),
            onnx_sha256=sha256,
            precision="onnx-" + meta.get(META_PRECISION, "unknown"),
            preprocess=json.loads(self.preprocess_cfg.to_json()),
            dim=self.dim,
            runtime=runtime,
        )

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """The text tower exported beside the image file, tokenized with the `tokenizers` library
        (no torch, no transformers)."""
        if self._text is None:
            self._text = _OnnxText(self.path, self.identity.model or "", *self._text_session())
        return self._text.embed(texts)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        self.check_input(pixels)
        if self._pool is None or len(pixels) < 2:
            out = self._run(pixels)
        else:
            parts = np.array_split(pixels, min(self.lanes, len(pixels)))
            out = np.concatenate(list(self._pool.map(self._run, parts)))
        return l2_normalize(out)

    def embed_serial(self, pixels: np.ndarray) -> np.ndarray:
        """`embed` on one core, in the calling thread: for callers that already run one thread per
        core, so that no core is shared by two busy threads."""
        self.check_input(pixels)
        return l2_normalize(self._run(pixels))


# ----------------------------------------------------------------------------- onnxruntime
class OnnxEmbedder(SlicedEmbedder):
    """onnxruntime session over an exported CLIP image tower (input pixel_values, output image_embeds)."""

    input: Any  # the session's image input (onnxruntime's NodeArg)

    @classmethod
    def from_spec(cls, spec: EmbedderSpec) -> Embedder:
        if spec.runtime != ONNXRUNTIME:  # --onnx-runtime openvino: the same file on OpenVINO
            from .ovruntime import OpenVinoEmbedder

            return OpenVinoEmbedder.from_spec(spec)
        return cls(spec.onnx, device=spec.device, threads=spec.threads, model_hint=spec.model)

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, model_hint: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the install
            raise PipelineError("the ONNX backend needs onnxruntime: pip install onnxruntime") from e
        path = Path(path)
        if path.is_dir():  # a model's folder, or the folder of the exports: "make it" there would be refused too
            inside = sorted(p.name for p in path.glob("*.onnx"))[:6]
            raise PipelineError(f"--onnx {path} is a folder: pass an ONNX file"
                                + (f" in it ({', '.join(inside)})" if inside else
                                   "; a model's folder is given as --model"))
        if not path.is_file():
            model = f" --model {model_hint}" if model_hint else ""  # the file of the model asked for, not the default's
            raise PipelineError(f"ONNX file {path} not found. Make it with: python main.py --export-onnx{model} --onnx "
                                f"{path}")
        self.path = self.source_file = path
        self._providers = self._text_providers = _providers_for(ort, device)  # the fp32 text tower may use the GPU
        if device == "auto" and "CUDAExecutionProvider" in self._providers and written_for_the_cpu(file_metadata(path)):
            # its int8 GEMMs have no CUDA kernel: they would run on the CPU anyway, with copies at every layer
            log.info("%s is an int8 file written for onnxruntime's CPU: it runs on the CPU", path)
            self._providers = ["CPUExecutionProvider"]
        self._start_sessions(ort, threads)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise PipelineError(f"onnxruntime could not start its CUDA provider for {path} (check CUDA/cuDNN versions)")
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        # the file's own metadata (its probes among them), not a cached graph's copy of it
        meta = file_metadata(path) if self._cached else self.session.get_modelmeta().custom_metadata_map
        if self.device == "cuda" and written_for_the_cpu(meta):  # --device cuda asked for it
            log.warning(cpu_file_on_gpu(path))
        self.input = self._image_input()
        self._input_label = f"ONNX input {self.input.name!r}"
        self.output_name = self.session.get_outputs()[0].name
        self.preprocess_cfg = _preprocess_config_for_file(path, meta, model_hint)
        self._check_input_size()
        out_shape = self.session.get_outputs()[0].shape
        self.dim = int(out_shape[-1]) if isinstance(out_shape[-1], int) else self._probe_dim()
        # The file checks itself on this CPU before it embeds anything (pipeline/probes.py).
        probes = probe_pixels(self.preprocess_cfg)
        try:
            self.self_check = check_file(path, meta, [probes], lambda: self._run(probes))
        except PipelineError:
            if not self._from_cache:
                if self._cached is not None:  # a file that fails: its rewrite is not kept
                    unlink_quietly(self._cached)
                raise
            # The cached rewrite, not the file, may be what fails: dropped, and the file checked again.
            log.warning("the cached CPU graph %s fails %s's self-check: made again from the file", self._cached, path)
            if self._cached is not None:
                unlink_quietly(self._cached)
            if self._pool is not None:  # the old pool: the new sessions get a pool of their own
                self._pool.shutdown(wait=True)
            self._start_sessions(ort, threads, use_cache=False)
            try:
                self.self_check = check_file(path, meta, [probes], lambda: self._run(probes))
            except PipelineError:
                if self._cached is not None:
                    unlink_quietly(self._cached)
                raise
        log.debug("%s: %s", path, self.self_check)
        self.identity = self._file_identity(meta, self.file_sha256, ONNXRUNTIME)

    def _start_sessions(self, ort: Any, threads: int, use_cache: bool = True) -> None:
        """Open `self.session` and its replicas, queued in `self._free`, and the pool that runs them;
        `self._cached`: the cache entry they run (int8graph.cached_cpu_model), if any, and
        `self._from_cache` whether it was read (not made) here; use_cache=False makes the entry again
        from the file without reading it.

        On the CPU: one single-threaded session per core, each running a slice of the batch. Alone
        it is as fast as one multi-threaded session, but while other threads also need the CPU
        (decoding), a multi-threaded session loses time to its per-operator synchronisation (one
        preempted thread stalls all) and slices do not. Vectors do not depend on the slicing
        (static int8 and fp32 are batch-independent).
        """
        cores = threads or available_cores()
        replicas = 1 if "CUDAExecutionProvider" in self._providers else max(1, cores)
        self._opts = _session_options(ort, intra_op_threads=1 if replicas > 1 else cores)
        # On the CPU, the bias is fused into the int8 GEMM (int8graph.py), from the cache when it is there.
        self.file_sha256 = sha256_file_once(self.path)  # once a run: the checks before the load asked too
        on_cpu = list(self._providers) == ["CPUExecutionProvider"]
        cached = cached_cpu_model(self.file_sha256) if on_cpu and use_cache else None
        source: str | bytes = str(cached) if isinstance(cached, Path) else str(self.path)
        session = None
        if isinstance(cached, Path):
            try:
                session = ort.InferenceSession(source, sess_options=self._opts, providers=self._providers)
            except Exception as e:  # a damaged cache entry (the file itself is opened below): dropped, made again
                log.warning("the cached CPU graph %s does not load (%s): made again from %s", cached, e, self.path)
                unlink_quietly(cached)
                cached, source = None, str(self.path)
        self._cached: Path | None = cached if isinstance(cached, Path) else None
        self._from_cache = self._cached is not None  # read from the cache (not made by this call)
        try:
            self.session = session or ort.InferenceSession(source, sess_options=self._opts, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise PipelineError(
                f"cannot load ONNX file {self.path}: {type(e).__name__}: {e}. Re-create it with --export-onnx."
            ) from e
        if cached is None and self.session.get_providers() == ["CPUExecutionProvider"]:
            try:
                fused = cpu_model(self.path, self.session.get_modelmeta().custom_metadata_map)
                if fused is not None:
                    self.session = ort.InferenceSession(fused, sess_options=self._opts, providers=self._providers)
            except Exception as e:  # the file opened: it runs as it is (its probes still check it)
                log.warning("could not rewrite %s into the graph onnxruntime's CPU runs best (%s: %s): it runs as it "
                            "is, slower, its vectors within rounding of the rewritten graph's", self.path,
                            type(e).__name__, first_line(e))
            else:
                kept = keep_cpu_model(self.file_sha256, fused)
                if fused is not None:
                    source, self._cached = (str(kept), kept) if kept is not None else (fused, None)
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # sessions not running right now
        self._free.put(self.session)
        try:
            for _ in range(replicas - 1):
                self._free.put(ort.InferenceSession(source, sess_options=self._opts, providers=self._providers))
        except Exception as e:  # the first opened: memory, most likely
            raise PipelineError(f"cannot open {replicas} onnxruntime sessions of {self.path} (one per core): "
                                f"{type(e).__name__}: {first_line(e)}; try --threads 1") from e
        self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix="onnx") if replicas > 1 else None
        # Callers with their own per-core threads (the gallery's lanes) may run this many
        # `embed_serial` calls at once, each on one core.
        self.lanes = replicas

    def _image_input(self) -> Any:
        """The session's one input, checked to be float (batch, 3, H, W)."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            text = " (a text tower: --onnx takes the image tower's file, which finds this one beside it)" \
                if "input_ids" in names else ""
            raise PipelineError(f"{self.path}: expected one image input, found {names}{text}")
        image = inputs[0]
        if image.type != "tensor(float)" or len(image.shape) != 4:
            raise PipelineError(
                f"{self.path}: input {image.name!r} is {image.type} {image.shape}; expected float (batch, 3, H, W)"
            )
        return image

    def _check_input_size(self) -> None:
        """The file's fixed input sizes (symbolic ones pass) must be what the preprocessing makes."""
        _, c, h, w = self.input.shape
        expected = (3, self.preprocess_cfg.crop_height, self.preprocess_cfg.crop_width)
        for got, want, name in zip((c, h, w), expected, ("channels", "height", "width")):
            if isinstance(got, int) and got != want:
                raise PipelineError(f"{self.path}: input {name} is {got} but preprocessing makes {want}")

    def _probe_dim(self) -> int:
        x = np.zeros((1, 3, self.preprocess_cfg.crop_height, self.preprocess_cfg.crop_width), np.float32)
        return int(self.session.run([self.output_name], {self.input.name: x})[0].shape[-1])

    def _infer(self, runner: Any, x: np.ndarray) -> np.ndarray:
        return runner.run([self.output_name], {self.input.name: x})[0]

    def embed_tensor(self, pixels: Any) -> np.ndarray:
        """A torch float32 tensor bound where it is (IO binding, no host copy on the GPU)."""
        x = pixels.detach().float().contiguous()
        want = (3, self.preprocess_cfg.crop_height, self.preprocess_cfg.crop_width)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            shape = ", ".join(map(str, want))
            raise PipelineError(f"ONNX input {self.input.name!r} takes (batch, {shape}), got {tuple(x.shape)}")
        session = self._free.get()
        try:
            binding = session.io_binding()
            device, index = x.device.type, x.device.index or 0
            binding.bind_input(self.input.name, device, index, np.float32, list(x.shape), x.data_ptr())
            binding.bind_output(self.output_name, "cpu")
            session.run_with_iobinding(binding)
            return l2_normalize(binding.copy_outputs_to_cpu()[0])
        finally:
            self._free.put(session)

    def _text_session(self) -> tuple[Any, list[str]]:
        return self._opts, self._text_providers


def written_for_the_cpu(meta: dict[str, str]) -> bool:
    """A static int8 file saved as onnxruntime's CPU runs it (pipeline/int8graph.py): its int8 GEMMs
    (MatMulIntegerToFloat) have no CUDA kernel, so on CUDA they would fall back to the CPU, with
    copies between the devices at every layer."""
    return meta.get(META_INT8_RECIPE) in CPU_GRAPH_RECIPES


def file_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata read without a session (onnx's parser: no provider started)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def known_file_metadata(path: str | Path) -> dict[str, str]:
    """file_metadata of a file that may be absent or unreadable ({} then: it is judged where it
    loads, with its own message), read once per version of the file (parsing a large one takes
    most of a second, and a run's flags may ask about it more than once)."""
    if not Path(path).is_file():
        return {}
    return dict(_metadata_of(*file_version(path)))


@functools.lru_cache(maxsize=4)
def _metadata_of(path: str, inode: int, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    try:
        return tuple(file_metadata(Path(path)).items())
    except Exception:  # noqa: BLE001 - onnx's parser raises several types
        return ()


def cpu_file_on_gpu(path: Path) -> str:
    """The warning for such a file run with --device cuda (with --device auto it runs on the CPU)."""
    return (f"{path} is an int8 file written for onnxruntime's CPU: on CUDA its int8 matrix multiplies run on the "
            "CPU. Use --device cpu, or on a GPU the fp32 file the export wrote beside it, or --backend torch.")


def check_device(spec: EmbedderSpec) -> None:
    """PipelineError for --device cuda where the backend sees no GPU, as loading the model says it,
    without loading it (a Ray build said it only once Ray had started, 15 s on)."""
    if spec.device != "cuda":
        return
    if spec.resolve_backend() == "onnx":
        import onnxruntime as ort

        _providers_for(ort, "cuda")
        return
    import torch

    if not torch.cuda.is_available():
        raise PipelineError("--device cuda asked for, but torch sees no CUDA device")


def _providers_for(ort: Any, device: str) -> list[str]:
    """onnxruntime execution providers for --device (auto: CUDA when this onnxruntime has it).

    Raises:
        PipelineError: --device cuda, and this onnxruntime has no CUDA provider.
    """
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise PipelineError(
            f"--device cuda asked for, but this onnxruntime has no CUDA provider (it has {available}). "
            "Install onnxruntime-gpu, or use --device cpu."
        )
    use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


def _session_options(ort: Any, intra_op_threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads must not spin: the decoding thread needs those cycles.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _preprocess_config_for_file(path: Path, meta: dict[str, str], model_hint: str | None) -> PreprocessConfig:
    """The preprocessing the export recorded in the file; else the hinted model folder's; else CLIP's defaults."""
    if META_PREPROCESS in meta:
        return PreprocessConfig.from_json(meta[META_PREPROCESS])
    if model_hint and Path(model_hint).is_dir():
        return PreprocessConfig.from_model_dir(model_hint)
    log.warning("%s carries no preprocessing metadata; using CLIP defaults", path)
    return PreprocessConfig()


class _OnnxText:
    """Text ONNX (input_ids, attention_mask: int64 (B, 77)) -> text_embeds, plus its tokenizer."""

    def __init__(self, image_onnx: Path, image_model: str, opts, providers) -> None:
        import onnxruntime as ort

        path, tok_path = text_onnx_path_for(image_onnx), tokenizer_path_for(text_onnx_path_for(image_onnx))
        absent = file_metadata(image_onnx).get(META_NO_TEXT) if not path.is_file() or not tok_path.is_file() else None
        if absent:  # the export said why: "make them with --export-onnx" would make the same file again
            raise PipelineError(
                f"{image_onnx.name} was exported without a text tower: {absent}. Text search needs one exported "
                "with the image file: export again where the model can have one and build the gallery with that file, "
                "or build it with --backend torch (and --model) for text search; searches by picture work with this "
                "file"
            )
        if not path.is_file() or not tok_path.is_file():
            raise PipelineError(
                f"text search with the ONNX backend needs {path.name} and {tok_path.name} beside {image_onnx}; "
                "make them with --export-onnx (from a model that has a tokenizer)"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise PipelineError("text search needs the tokenizers package: pip install tokenizers") from e
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        if file_source_model(meta) != image_model:
            raise PipelineError(
                f"{path} was exported from {file_source_model(meta)!r} but the image model from {image_model!r}: "
                f"their vectors are not comparable"
            )
        self.context = int(meta.get(META_TEXT_CONTEXT, TEXT_CONTEXT))
        self.clean = meta.get(META_TEXT_CLEAN, "")  # open_clip's, repeated torch-free
        if self.clean and self.clean not in textclean.MODES:
            raise PipelineError(f"{path}: text cleaning {self.clean!r} is not one this version knows; export again")
        self.masked = "attention_mask" in {i.name for i in self.session.get_inputs()}  # SigLIP's takes none
        self.pad_id = int(meta.get(META_PAD_ID, 0))
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        # Padded and cut on the sides the model's tokenizer uses (SigLIP 2's Gemma tokenizer pads on
        # the left, and SigLIP's unmasked tower pools the last token: another side, another vector)
        sides = meta.get(META_TEXT_SIDES)
        self._set_sides(path, sides or "right,right")
        try:
            check_distinct(lambda texts: self.tokenize(texts)[0].tolist(), None, str(tok_path))
        except TokenizerError as e:
            remedy = "export again with --export-onnx from a model folder that has its tokenizer"
            raise TokenizerError(f"{e}: {remedy}") from None
        record = ProbeRecord.from_json(meta[META_PROBES]) if META_PROBES in meta else None
        inputs = self.tokenize(record.texts if record is not None else [])
        if record is not None and record.version == PROBE_VERSION and record.input_sha256 != input_digest(inputs):
            if sides is None:  # exported before the sides were recorded: its probes say which it was
                self._set_sides(path, "left,right")
                inputs = self.tokenize(record.texts)
            if record.input_sha256 != input_digest(inputs):
                raise PipelineError(
                    f"{tok_path} does not tokenize the probe texts as the tokenizer {path.name} was exported with "
                    "did: it is another model's tokenizer, or was changed; export again with --export-onnx"
                )
            log.info("%s: exported before its tokenizer's sides were recorded; its probes say it pads on the left",
                     path)
        check_file(path, meta, inputs, lambda: self._run(*inputs))

    def _set_sides(self, path: Path, sides: str) -> None:
        """Pad and truncate on the sides 'padding,truncation' (left or right) name."""
        padding, _, truncation = sides.partition(",")
        if padding not in ("left", "right") or truncation not in ("left", "right"):
            raise PipelineError(f"{path}: unreadable tokenizer sides {sides!r} in its metadata; export again")
        self.tokenizer.enable_truncation(self.context, direction=truncation)
        self.tokenizer.enable_padding(length=self.context, pad_id=self.pad_id, direction=padding)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 (B, context) input ids and attention mask (77 tokens for CLIP, 64 for SigLIP)."""
        enc = self.tokenizer.encode_batch([textclean.clean(t, self.clean) for t in texts])
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(enc), self.context)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(enc), self.context)
        return ids, mask

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask} if self.masked else {"input_ids": ids}
        return self.session.run(None, feeds)[0]

    def embed(self, texts: list[str]) -> np.ndarray:
        return l2_normalize(self._run(*self.tokenize(texts)))


# ----------------------------------------------------------------------------- transformers
class TorchEmbedder(Embedder):
    """transformers CLIPModel: fp32 on CPU; on CUDA fp16, or bitsandbytes 8-bit (see resolve_torch_precision)."""

    @classmethod
    def from_spec(cls, spec: EmbedderSpec) -> TorchEmbedder:
        return cls(spec.model, device=spec.device, precision=spec.precision, threads=spec.threads)

    def __init__(self, model: str, device: str = "auto", precision: str = "auto", threads: int = 0) -> None:
        try:
            import torch
            import transformers  # noqa: F401 - checked here, where the message can say what to install
        except ImportError as e:  # pragma: no cover - depends on the install
            raise PipelineError(
                "the torch backend needs torch and transformers: pip install -r requirements.txt"
            ) from e
        if device == "cuda" and not torch.cuda.is_available():
            raise PipelineError("--device cuda asked for, but torch sees no CUDA device")
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self.precision = resolve_torch_precision(precision, self.device)
        if self.device == "cpu":
            torch.set_num_threads(threads or available_cores())
        kwargs: dict[str, Any] = {}
        if self.precision == "int8":
            from transformers import BitsAndBytesConfig

            kwargs = {
                "quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                "device_map": {"": 0},
                "dtype": torch.float16,
            }
        elif self.precision == "fp16":
            kwargs = {"dtype": torch.float16}
        self.family = family_of(model)
        if self.precision == "int8" and self.family.name == "open_clip":  # bitsandbytes loads transformers models only
            raise PipelineError("--precision int8 (bitsandbytes) is for transformers models; an open_clip model runs "
                                "fp32 or fp16 on torch, or int8 through --export-onnx")
        try:
            self.model = self.family.load(model, **kwargs).eval()
        except OSError as e:
            raise PipelineError(f"cannot load model {model!r}: {first_line(e)} {load_hint(model)}") from e
        except Exception as e:  # noqa: BLE001 - damaged weights: safetensors', torch's unpickling errors and others
            raise PipelineError(weights_unread(model, e)) from e
        if self.precision != "int8":
            self.model.to(self.device)
        self._torch = torch
        self._model_name = model
        self._tokenizer: PreTrainedTokenizerBase | None = None  # loaded by the first embed_text
        self._dtype = next(iter(self.model.parameters())).dtype
        self.input_dtype = self._dtype  # what a device preprocessor should hand embed_tensor
        self.preprocess_cfg = preprocess_config_of(model, self.model)
        self.dim = model_dim(self.model.config)
        self.text_context = text_context(self.model.config)
        self.identity = VectorIdentity(
            backend="torch",
            family=self.family.name,
            model=model_reference(model),
            model_sha256=model_weights_sha256(model) or None,
            precision=self.precision,
            preprocess=json.loads(self.preprocess_cfg.to_json()),
            dim=self.dim,
        )

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return self.embed_tensor(self._torch.from_numpy(np.ascontiguousarray(pixels)))

    def embed_tensor(self, pixels: Any) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = pixels.to(self.device, dtype=self._dtype, non_blocking=True)
            feats = projected(self.model.get_image_features(pixel_values=x))
            return l2_normalize(feats.float().cpu().numpy())

    def embed_text(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        if hasattr(self.model, "tokenize"):  # open_clip: its own tokenizer and cleaning
            inputs = {"input_ids": self.model.tokenize(texts).to(self.device)}
        else:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self._model_name)  # refused when it cannot tell texts apart
            tok = self._tokenizer(
                list(texts), padding="max_length", truncation=True, max_length=self.text_context, return_tensors="pt"
            )
            inputs = {"input_ids": tok["input_ids"].to(self.device)}
            if self.family.text_mask:  # SigLIP was trained on padded texts, unmasked
                inputs["attention_mask"] = tok["attention_mask"].to(self.device)
        with torch.inference_mode():
            feats = projected(self.model.get_text_features(**inputs))
            return l2_normalize(feats.float().cpu().numpy())


def model_dim(config: Any) -> int:
    """The length of a model's vectors: CLIP's projection_dim; SigLIP's towers end at their width."""
    dim = getattr(config, "projection_dim", None)
    return int(dim if dim else config.vision_config.hidden_size)


def text_context(config: Any) -> int:
    """How many tokens the text tower takes (CLIP 77, SigLIP 64), from its position embeddings."""
    return int(min(TEXT_CONTEXT, config.text_config.max_position_embeddings))


def projected(out):
    """The projected features from CLIPModel.get_image_features / get_text_features: a tensor in
    transformers 4, an output object holding them in pooler_output in transformers 5."""
    import torch

    return out if torch.is_tensor(out) else out.pooler_output


def resolve_torch_precision(precision: str, device: str) -> str:
    """auto: fp32 on CPU, fp16 on CUDA.

    The reference loaded bitsandbytes 8-bit whenever it was installed. On an H100, bitsandbytes
    8-bit was slower than fp16 and agreed less with fp32 (README, GPU benchmarks), so fp16 is the
    CUDA default and 8-bit is there with --precision int8 for cards short of memory.
    """
    if device == "cpu":
        if precision not in BACKENDS["torch"].cpu_precisions:  # --device auto on a machine without CUDA
            raise UsageError(
                f"--precision {precision} needs --device cuda, a CUDA GPU (--device auto found none here); on CPU "
                "the torch backend runs fp32 (use the ONNX int8 file for int8)"
            )
        return "fp32"
    if precision == "int8" and not _has_bitsandbytes():
        raise PipelineError("--precision int8 needs bitsandbytes: pip install bitsandbytes")
    return "fp16" if precision == "auto" else precision


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def preprocess_config_of(model: str, loaded: Any) -> PreprocessConfig:
    """A loaded model's preprocessing: open_clip's from its own configuration, a transformers
    model's from its preprocessor_config.json (without one, its family's processor's defaults at
    the model's own picture size, said once)."""
    own = getattr(loaded, "preprocess_config", None)
    return own() if callable(own) else preprocess_config_for_model(model, loaded)


def preprocess_config_for_model(model: str, loaded: Any = None) -> PreprocessConfig:
    try:
        if Path(model).is_dir():
            path = Path(model) / "preprocessor_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (a folder saved with the model's save_pretrained alone)")
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "preprocessor_config.json"))
        return PreprocessConfig.from_processor_dict(json.loads(path.read_text()))
    except Exception as e:  # noqa: BLE001 - offline, missing file: the family's defaults, loudly
        prep, said = family_default_preprocess(loaded)
        log.warning("no preprocessor_config.json for %s (%s); using %s. Save the processor beside the model "
                    "(AutoProcessor.from_pretrained(...).save_pretrained(folder)) to use its own", model, e, said)
        return prep


def family_default_preprocess(loaded: Any) -> tuple[PreprocessConfig, str]:
    """(preprocessing, its description) of a transformers model without its processor file: what
    its family's image processor does by default, at the picture size its config gives (a SigLIP
    squashes to the square with mean/std 0.5; a CLIP resizes the short side and crops)."""
    config = getattr(loaded, "config", None)
    vision = getattr(config, "vision_config", None)
    size = int(getattr(vision, "image_size", 0) or 224)
    if getattr(config, "model_type", "") == "siglip":
        prep = PreprocessConfig(shortest_edge=size, crop_height=size, crop_width=size, resize_height=size,
                                resize_width=size, do_center_crop=False, image_mean=(0.5, 0.5, 0.5),
                                image_std=(0.5, 0.5, 0.5))
        return prep, f"SigLIP's image processor's defaults ({size}x{size}, mean/std 0.5)"
    prep = PreprocessConfig(shortest_edge=size, crop_height=size, crop_width=size)
    return prep, f"CLIP's image processor's defaults ({size} px)"

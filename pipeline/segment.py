"""Person segmentation: RGB images in; per person a box (xyxy, source pixels), a mask at source
resolution and a confidence out; and the white-background crop made from them.

Ultralytics results are turned into numpy here (`PersonMask`) and never passed on, so crops,
retrieval, video matching and plots are testable with plain arrays.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from .config import SegmentSpec
from .dataset import Record
from .errors import PipelineError
from .gallery import GalleryItem, ItemMaker, decode_record
from .images import encode_png
from .store import ManifestRow, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

PERSON_CLASS = 0  # COCO "person"


@dataclass(frozen=True)
class PersonMask:
    """One detected person.

    box_xyxy: float32 (4,) x1, y1, x2, y2 in source pixels.
    mask: bool (H, W) at the source image's resolution; True on the person.
    confidence: detection score in [0, 1].
    """

    box_xyxy: np.ndarray
    mask: np.ndarray
    confidence: float

    @cached_property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


class Segmenter(Protocol):
    def segment(self, images_rgb: Sequence[np.ndarray]) -> list[list[PersonMask]]:
        """Args: uint8 (H, W, 3) RGB images. Returns: per image, its persons (best first)."""
        ...


def box_pixels(box_xyxy: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop bounds that contain the box: floor of x1/y1, ceil of x2/y2, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    left = int(np.clip(np.floor(x1), 0, width))
    top = int(np.clip(np.floor(y1), 0, height))
    right = int(np.clip(np.ceil(x2), 0, width))
    bottom = int(np.clip(np.ceil(y2), 0, height))
    return left, top, right, bottom


def white_background_crop(image_rgb: np.ndarray, mask: np.ndarray, box_xyxy: np.ndarray) -> np.ndarray | None:
    """Cut the box out of the image and paint every pixel outside the person's mask white.

    Args:
        image_rgb: uint8 (H, W, 3).
        mask: bool (H, W), same size as the image.
        box_xyxy: (4,) box in source pixels; may extend past the borders (it is clipped).
    Returns:
        uint8 (h, w, 3) crop, or None when the clipped box is empty.
    Raises:
        ValueError: the mask does not have the image's size.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), but got {image_rgb.shape}")
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image_rgb.shape[:2]}")
    h, w = mask.shape
    left, top, right, bottom = box_pixels(box_xyxy, w, h)
    if right <= left or bottom <= top:
        return None
    inside = mask[top:bottom, left:right]
    crop = np.full((bottom - top, right - left, 3), 255, np.uint8)
    np.copyto(crop, image_rgb[top:bottom, left:right], where=(inside if inside.dtype == bool else inside.astype(bool))[..., None])
    return crop


# ----------------------------------------------------------------------------- Ultralytics
def _import_ultralytics():
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        from ultralytics import YOLO
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PipelineError("segmentation needs ultralytics: pip install ultralytics") from e
    return YOLO


def load_yolo(model: str, task: str):
    """Load Ultralytics weights (.pt), a model yaml (random weights), or an exported .onnx.

    A bare name such as yolov8l-seg.pt is fetched by Ultralytics on first use (needs network);
    the error says how to pass a local file instead.
    """
    YOLO = _import_ultralytics()
    local = Path(model)
    # A bare *.yaml name is one of Ultralytics' bundled model configs: no download needed.
    if not local.exists() and not model.endswith(".yaml") and (os.sep in model or os.environ.get("YOLO_OFFLINE")):
        raise PipelineError(
            f"YOLO model {model!r} not found locally"
            + (" and YOLO_OFFLINE is set" if os.environ.get("YOLO_OFFLINE") else "")
            + ". Pass a local .pt, .onnx or model .yaml file."
        )
    try:
        return YOLO(model, task=task)
    except Exception as e:  # Ultralytics raises many types (download, parse, version)
        raise PipelineError(f"cannot load YOLO model {model!r} ({type(e).__name__}: {e}). Pass a local .pt, .onnx or .yaml file.") from e


def rgb_to_bgr(image_rgb: np.ndarray) -> np.ndarray:
    """A contiguous BGR copy (Ultralytics reads numpy arrays as OpenCV's BGR). OpenCV's channel
    swap: measured 0.04 ms for a 768x1024 picture against 2.6 ms for numpy's reversed-stride copy."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)


def yolo_device(device: str) -> str | None:
    if device == "auto":
        return None
    return "0" if device == "cuda" else "cpu"


# Largest difference allowed between the torch model and its ONNX export, per output channel,
# relative to that channel's largest magnitude (at least 1): boxes in pixels, scores, mask
# coefficients and prototypes are each judged on their own scale.
YOLO_ONNX_TOLERANCE = 1e-3


def yolo_onnx_path(weights: Path) -> Path:
    """Where the ONNX export of a .pt file lives: beside it, named with the weights' hash, so a
    changed .pt never reuses an old export. Only verified exports are ever written there.

    Weights in a folder this user cannot write (a shared, read-only model folder) get their
    export in the user's cache instead, $XDG_CACHE_HOME/fashion-visual-search/yolo (default
    ~/.cache/...), rather than falling back to the 2x slower torch model on every run.
    """
    beside = weights.with_name(f"{weights.stem}.{sha256_file(weights)[:12]}.onnx")
    if beside.is_file() or _writable(weights.parent):
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion-visual-search" / "yolo"
    return cache / beside.name


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def load_segmentation_model(spec: SegmentSpec, device: str = "auto"):
    """The Ultralytics segmentation model and its backend ("onnx" or "torch"): load_cpu_yolo."""
    return load_cpu_yolo(spec.model, "segment", spec.backend, spec.imgsz, device)


def load_cpu_yolo(model: str, task: str, backend: str = "auto", imgsz: int = 640, device: str = "auto"):
    """An Ultralytics model ready to predict, and its backend ("onnx" or "torch").

    On the CPU, .pt weights run as their ONNX export in onnxruntime (backend auto, the default):
    measured here ~2x faster than torch for yolov8l-seg, with the same persons and masks
    (benchmarks/segment.py). The export is made once, verified against the torch model, and kept
    beside the weights. On CUDA, for a model .yaml (random weights, nothing worth keeping), or
    with backend torch, the torch model runs. An export that fails or does not verify falls
    back to torch with a warning (auto) or is an error (backend onnx).

    Args:
        model: .pt weights (a bare name is fetched by Ultralytics), an exported .onnx, or a .yaml.
        task: "segment" or "detect".
        imgsz: the inference size, used for the export's check.
    """
    flag = "--seg-backend" if task == "segment" else "--det-backend"
    if backend not in ("auto", "onnx", "torch"):
        raise PipelineError(f"unknown {flag} {backend!r}; expected auto, onnx or torch")
    if model.endswith(".onnx"):
        if backend == "torch":
            raise PipelineError(f"{model} is an ONNX file, which runs in onnxruntime: drop {flag} torch or pass .pt weights")
        return load_yolo(model, task=task), "onnx"
    if backend == "onnx" and device == "cuda":
        raise PipelineError(f"{flag} onnx runs on the CPU (onnxruntime); with --device cuda use {flag} auto or torch")
    if backend == "onnx" and not model.endswith(".pt"):
        raise PipelineError(f"{flag} onnx exports .pt weights once and reuses the export; {model} is not a .pt file")
    torch_model = None
    if model.endswith(".pt") and backend != "torch" and not _runs_on_gpu(device):
        weights = Path(model)
        if not weights.is_file():  # a bare name: Ultralytics fetches it, then it is a local file
            torch_model = load_yolo(model, task=task)
            weights = Path(getattr(torch_model, "ckpt_path", "") or model)
        target = yolo_onnx_path(weights) if weights.is_file() else None
        if target is not None and target.is_file():
            return load_yolo(str(target), task=task), "onnx"
        try:
            if target is None:
                raise PipelineError(f"cannot find the weights file of {model!r} to export")
            torch_model = torch_model or load_yolo(model, task=task)
            export_yolo_onnx(torch_model, weights, target, imgsz, task)
            return load_yolo(str(target), task=task), "onnx"
        except PipelineError as e:
            if backend == "onnx":
                raise
            log.warning("running %s with torch: the ONNX export of %s is not usable (%s)", task, model, e)
    return torch_model or load_yolo(model, task=task), "torch"


def _runs_on_gpu(device: str) -> bool:
    """Whether Ultralytics' torch model would run on a GPU for this --device."""
    if device != "auto":
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def export_yolo_onnx(torch_model, weights: Path, target: Path, imgsz: int, task: str = "segment") -> None:
    """Export with Ultralytics (dynamic batch and size, so the ONNX model gets the same minimal
    letterbox as torch and therefore the same input), verify against `torch_model`, and move the
    file to `target` only if it passes. Raises PipelineError; nothing is left behind on failure."""
    import shutil
    import tempfile

    t0 = time.perf_counter()
    work = None
    try:
        # A private folder beside the target (same file system for the final rename; two runs
        # exporting at once do not share it).
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", suffix=".export", dir=target.parent))
        # Ultralytics writes <weights stem>.onnx beside the weights it loaded; a link in our own
        # folder keeps it from overwriting a file of the user's.
        link = work / weights.name
        try:
            link.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, link)
        log.info("exporting %s to ONNX for onnxruntime (once; kept as %s)", weights, target)
        exported = Path(load_yolo(str(link), task=task).export(format="onnx", dynamic=True, imgsz=imgsz, simplify=False, verbose=False))
        worst = verify_yolo_onnx(torch_model, exported, imgsz)
        if worst > YOLO_ONNX_TOLERANCE:
            raise PipelineError(f"the ONNX export differs from the torch model by {worst:.2e} (allowed {YOLO_ONNX_TOLERANCE:.0e})")
        os.replace(exported, target)
        log.info("ONNX export verified (largest relative difference %.1e) in %.1f s", worst, time.perf_counter() - t0)
    except PipelineError:
        raise
    except Exception as e:  # the exporter raises many types
        raise PipelineError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def verify_yolo_onnx(torch_model, onnx_path: Path, imgsz: int) -> float:
    """Run the torch network and the ONNX file on the same fixed input (a portrait letterbox
    shape, as a 768x1024 photo gets) and return the largest per-channel relative difference over
    the ONNX outputs (detections and mask prototypes)."""
    import onnxruntime as ort
    import torch

    h, w = imgsz, max(32, int(round(imgsz * 0.75 / 32)) * 32)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    net = torch_model.model.float().eval()
    with torch.no_grad():
        ref = [t.numpy() for t in _tensors(net(x))]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    worst = 0.0
    for g in got:
        r = next((r for r in ref if r.shape == g.shape), None)
        if r is None:
            raise PipelineError(f"the ONNX output of shape {g.shape} has no torch counterpart (torch gave {[r.shape for r in ref]})")
        r2, g2 = r.reshape(r.shape[0], r.shape[1], -1), g.reshape(g.shape[0], g.shape[1], -1)
        scale = np.maximum(np.abs(r2).max(axis=(0, 2)), 1.0)
        worst = max(worst, float((np.abs(g2 - r2).max(axis=(0, 2)) / scale).max()))
    return worst


def _tensors(out) -> list:
    """Every tensor in a nested model output, in order."""
    import torch

    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


class UltralyticsSegmenter:
    """Ultralytics YOLO segmentation, person class only, masks at source resolution."""

    def __init__(self, spec: SegmentSpec, device: str = "auto", batch: int = 8) -> None:
        self.spec = spec
        self.model, self.backend = load_segmentation_model(spec, device)
        self.device = yolo_device(device)
        self.batch = batch
        self.predict_seconds = 0.0

    def segment(self, images_rgb: Sequence[np.ndarray]) -> list[list[PersonMask]]:
        if not images_rgb:
            return []
        # Ultralytics reads numpy arrays as BGR (OpenCV's order).
        sources = [rgb_to_bgr(im) for im in images_rgb]
        results = self.model.predict(
            source=sources,
            classes=[PERSON_CLASS],
            conf=self.spec.conf,
            imgsz=self.spec.imgsz,
            retina_masks=True,  # masks at the source resolution, not the 640 letterbox
            device=self.device,
            batch=self.batch,
            stream=True,
            verbose=False,
        )
        t = time.perf_counter()
        out = [persons_from_result(r, im.shape[:2]) for r, im in zip(results, images_rgb)]
        self.predict_seconds += time.perf_counter() - t
        return out


def persons_from_result(result, shape_hw: tuple[int, int]) -> list[PersonMask]:
    """Convert one Ultralytics Results object to PersonMasks (numpy), best confidence first."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0 or result.masks is None:
        return []
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float32)
    conf = boxes.conf.cpu().numpy().astype(np.float32)
    cls = boxes.cls.cpu().numpy().astype(np.int64)
    masks = result.masks.data.cpu().numpy() > 0.5
    if masks.shape[1:] != tuple(shape_hw):
        raise PipelineError(f"segmentation masks are {masks.shape[1:]}, expected the source size {shape_hw}")
    order = np.argsort(-conf, kind="stable")
    return [PersonMask(xyxy[i], masks[i], float(conf[i])) for i in order if cls[i] == PERSON_CLASS]


def make_segmenter(spec: SegmentSpec, device: str = "auto") -> Segmenter:
    return UltralyticsSegmenter(spec, device=device)


# ----------------------------------------------------------------------------- gallery items
def crop_file_name(source_row: int, person: int | None) -> str:
    return f"seg_{source_row:05d}_full.png" if person is None else f"seg_{source_row:05d}_p{person:02d}.png"


def make_segment_items(segmenter: Segmenter, spec: SegmentSpec) -> ItemMaker:
    """Item maker for --use-segmentation: each image decoded once at full size, segmented, and cut
    into one white-background crop per person (PNG, so the file re-embeds to the same vector)."""

    def items(records: list[Record]) -> list[list[GalleryItem]]:
        out: list[list[GalleryItem] | None] = [None] * len(records)
        decoded = []
        for k, rec in enumerate(records):
            row, d = decode_record(rec)  # full size: the crops are cut from it
            if d is None:
                out[k] = [GalleryItem(row)]
                continue
            decoded.append((k, rec, d))
        arrays = [np.asarray(d.image) for _, _, d in decoded]
        persons_per_image = segmenter.segment(arrays)
        for (k, rec, d), arr, persons in zip(decoded, arrays, persons_per_image):
            out[k] = _crops_for_row(rec, d.width, d.height, d.note, arr, persons, spec)
        return [o if o is not None else [] for o in out]

    return items


def _crops_for_row(rec: Record, width: int, height: int, note: str, arr: np.ndarray, persons: Iterable[PersonMask], spec: SegmentSpec) -> list[GalleryItem]:
    items = []
    for p, person in enumerate(persons):
        crop = white_background_crop(arr, person.mask, person.box_xyxy)
        row = ManifestRow(
            index=-1, file=crop_file_name(rec.source_row, p), source_row=rec.source_row, source=rec.source,
            note=note, person=p, confidence=round(person.confidence, 6), mask_area=person.area,
            box_x1=round(float(person.box_xyxy[0]), 2), box_y1=round(float(person.box_xyxy[1]), 2),
            box_x2=round(float(person.box_xyxy[2]), 2), box_y2=round(float(person.box_xyxy[3]), 2),
        )
        if crop is None or person.area == 0:
            row.status, row.error, row.file = "failed", "empty person mask or box", ""
            items.append(GalleryItem(row))
            continue
        image = Image.fromarray(crop)
        data = encode_png(image)
        row.sha256, row.height, row.width = sha256_bytes(data), crop.shape[0], crop.shape[1]
        items.append(GalleryItem(row, image, data))
    if items:
        return items
    row = ManifestRow(index=-1, file="", source_row=rec.source_row, source=rec.source, width=width, height=height, note=note)
    if spec.keep_unsegmented:
        image = Image.fromarray(arr)
        data = encode_png(image)
        row.file, row.sha256 = crop_file_name(rec.source_row, None), sha256_bytes(data)
        row.note = "; ".join(x for x in (note, "no person found: whole image kept (--keep-unsegmented)") if x)
        return [GalleryItem(row, image, data)]
    row.status, row.error = "no_person", "no person detected"
    return [GalleryItem(row)]

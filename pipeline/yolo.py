"""Ultralytics YOLO, for segmentation and for video detection: loading (.pt, exported .onnx or a model
.yaml), the one-time verified ONNX export that runs on the CPU, and the adapters that turn
Ultralytics results into `persons.Person` where they enter, so nothing downstream sees a
framework object.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .fileio import remove_abandoned, sha256_file, user_cache_dir
from .persons import CappedPersons, Detector, Person, Segmenter

log = logging.getLogger(__name__)

PERSON_CLASS = 0  # COCO "person"
ULTRALYTICS_MAX_DET = 300  # Ultralytics' own default max_det: the most persons a video frame keeps


@dataclass(frozen=True)
class SegmentSpec:
    """Ultralytics segmentation settings (the person class only)."""

    model: str = "yolov8l-seg.pt"
    conf: float = 0.25
    imgsz: int = 640
    keep_unsegmented: bool = False
    backend: str = "auto"  # auto (ONNX export of .pt weights on the CPU) | onnx | torch
    # Persons kept per picture, the most confident: a catalogue or query photo plausibly holds a few;
    # a detector that fires everywhere would otherwise make hundreds of full-size masks per photo.
    max_persons: int = 10


# what a query or video cuts persons with, as the store's crops were cut: its recorded settings
# (GallerySource's field, SegmentSpec's)
STORE_SEGMENT = (("seg_model", "model"), ("seg_backend", "backend"), ("seg_conf", "conf"), ("seg_imgsz", "imgsz"),
                 ("max_persons", "max_persons"))
KEPT_WHOLE = ("keep_unsegmented", "keep_unsegmented")  # what an --update takes too: the new photos kept as the store's
FIELD_OF_SETTING = {name: field for field, name in (*STORE_SEGMENT, KEPT_WHOLE)}


def recorded_segment(made, spec: SegmentSpec, typed: frozenset[str] | set[str], store_dir: Path,
                     model_flag: str = "--seg-model PATH", persons: bool = True,
                     whole: bool = False) -> tuple[SegmentSpec, dict[str, object]]:
    """`spec` with the settings a segmented store's source (`made`, identity.GallerySource) records
    for those not in `typed` (the defaults' model would cut query persons otherwise, or, offline, fail
    to load; the defaults' 10 persons would ask with more persons than the store kept), checked:
    weights retrained under the same name, or a model file not found from here, are refused saying
    what to pass (`model_flag`). persons=False: the store's persons a photo not taken (a video's
    frames are not capped by it); whole=True: its --keep-unsegmented too (an --update's new photos).
    Returns the spec and what was taken from the store, by SegmentSpec's names."""
    from dataclasses import replace

    from .errors import CacheMismatchError
    from .fileio import sha256_file_once

    taken = {name: getattr(made, field) for field, name in (*STORE_SEGMENT, *([KEPT_WHOLE] if whole else []))
             if field not in typed and getattr(made, field, None) not in (None, getattr(spec, name))
             and (persons or name != "max_persons")}
    if not taken:
        return spec, {}
    spec = replace(spec, **taken)
    if "model" in taken:
        path = Path(spec.model)
        if made.seg_weights and not path.is_file():
            raise PipelineError(f"{store_dir} was segmented by {spec.model}, which is not there from here: "
                                f"pass {model_flag}, the same weights file")
        if made.seg_weights and path.is_file() and sha256_file_once(path) != made.seg_weights:
            raise CacheMismatchError(
                f"{store_dir} was segmented by {spec.model}, whose weights changed since (sha256 "
                f"{made.seg_weights[:12]}… then): its crops were cut by the old weights, query persons would be "
                "cut by these. Put the old weights back, or build the segmented gallery afresh")
    return spec, taken


# what Ultralytics loads from a path: weights, a model yaml, its exports (files and folders)
YOLO_SUFFIXES = (".pt", ".onnx", ".yaml", ".yml", ".torchscript", ".engine", ".tflite", ".pb", ".mnn", ".mlpackage")
YOLO_FOLDERS = ("_openvino_model", "_saved_model", "_ncnn_model", "_paddle_model", "_web_model", ".mlpackage",
                "_imx_model", "_rknn_model")


def _import_ultralytics():
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        from ultralytics import YOLO
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PipelineError("segmentation needs ultralytics: pip install ultralytics") from e
    return YOLO


def check_yolo_name(model: str) -> None:
    """What can be known of YOLO weights without loading them (a run checks its --det-model before it
    embeds a gallery): a local file or folder that is there and can be weights, or a bare name
    Ultralytics may fetch; PipelineError otherwise."""
    local = Path(model)
    # A bare *.yaml name is one of Ultralytics' bundled model configs: no download needed.
    if not local.exists() and not model.endswith(".yaml") and (os.sep in model or os.environ.get("YOLO_OFFLINE")):
        raise PipelineError(
            f"YOLO model {model!r} not found locally"
            + (" and YOLO_OFFLINE is set" if os.environ.get("YOLO_OFFLINE") else "")
            + ". Pass a local .pt, .onnx or model .yaml file."
        )
    exported = local.is_dir() and local.name.endswith(YOLO_FOLDERS)  # an Ultralytics export's folder
    if (local.is_dir() and not exported) or (local.is_file() and local.suffix.lower() not in YOLO_SUFFIXES):
        # Ultralytics takes what it cannot read for a detection model: said as such, not as "a YOLO detect model"
        what = "a folder" if local.is_dir() else f"a {local.suffix or 'suffix-less'} file"
        hint = ", the weights file in it" if local.is_dir() else ""
        raise PipelineError(f"YOLO model {model!r} is {what}, not YOLO weights: pass a .pt, .onnx or model .yaml "
                            f"file{hint}")


def load_yolo(model: str, task: str, named: str | None = None):
    """Load Ultralytics weights (.pt), a model yaml (random weights), or an exported .onnx.

    A bare name such as yolov8l-seg.pt is fetched by Ultralytics on first use (needs network);
    the error says how to pass a local file instead. named: what the user passed, when `model` is
    its cached ONNX export (a refusal names that, not a file they never typed).
    """
    check_yolo_name(model)
    YOLO = _import_ultralytics()
    # Its own task: a checkpoint's or a yaml's Ultralytics reads; an export's, its metadata (which
    # Ultralytics before 8.4 does not read, guessing from the file's name); an ONNX file that records
    # none is taken as asked
    own_task = _recorded_task(model) if model.endswith(".onnx") else None
    try:
        loaded = YOLO(model, task=own_task or task) if model.endswith(".onnx") else YOLO(model)
    except Exception as e:  # Ultralytics raises many types (download, parse, version)
        raise PipelineError(
            f"cannot load YOLO model {model!r} ({type(e).__name__}: {e}). Pass a local .pt, .onnx or .yaml file."
        ) from e
    own = getattr(loaded, "task", None)
    shown = named or model
    if task == "segment" and own != "segment":
        raise YoloTaskError(f"{shown} is a YOLO {own} model: --seg-model needs a segmentation model, which draws each "
                            "person's outline (a -seg model, e.g. yolov8n-seg.pt)")
    if task == "detect" and own not in ("detect", "segment", "pose"):  # segmentation and pose models box persons too
        raise YoloTaskError(f"{shown} is a YOLO {own} model: --det-model needs a model that boxes persons: a detection "
                            "model (e.g. yolov8n.pt), or a segmentation or pose one")
    return loaded


class YoloTaskError(PipelineError):
    """YOLO weights of another task than the one asked for (detection weights as --seg-model)."""


def _recorded_task(path: str) -> str | None:
    """The task an Ultralytics ONNX export records in its metadata, or None."""
    try:
        import onnx

        props = onnx.load(path, load_external_data=False).metadata_props
    except Exception:  # noqa: BLE001 - no file, or not ONNX: Ultralytics' own load says what is wrong
        return None
    return next((p.value.strip("'\"") for p in props if p.key == "task"), None) or None


def rgb_to_bgr(image_rgb: np.ndarray) -> np.ndarray:
    """A contiguous BGR copy (Ultralytics reads numpy arrays as OpenCV's BGR), by OpenCV's channel
    swap, which is much cheaper than numpy's reversed-stride copy of a large picture."""
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
    ~/.cache/...), rather than falling back to the slower torch model on every run.
    """
    beside = weights.with_name(f"{weights.stem}.{sha256_file(weights)[:12]}.onnx")
    if beside.is_file() or _writable(weights.parent):
        return beside
    cache = user_cache_dir("yolo")
    return cache / beside.name


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def load_cpu_yolo(model: str, task: str, backend: str = "auto", imgsz: int = 640, device: str = "auto"):
    """An Ultralytics model ready to predict, and its backend ("onnx" or "torch").

    On the CPU, .pt weights run as their ONNX export in onnxruntime (backend auto, the default),
    which is faster than torch with the same persons and masks (README, Benchmarks). The export is
    made once, verified against the torch model, and kept beside the weights. On CUDA, for a model
    .yaml (random weights, nothing worth keeping), or with backend torch, the torch model runs. An
    export that fails or does not verify falls back to torch with a warning (auto) or is an error
    (backend onnx).

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
            raise PipelineError(
                f"{model} is an ONNX file, which runs in onnxruntime: drop {flag} torch or pass .pt weights"
            )
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
            return load_yolo(str(target), task=task, named=model), "onnx"
        # weights that do not load are refused here, once: not warned about as an export, then refused again
        torch_model = torch_model or load_yolo(model, task=task)
        try:
            if target is None:
                raise PipelineError(f"cannot find the weights file of {model!r} to export")
            export_yolo_onnx(torch_model, weights, target, imgsz, task)
            return load_yolo(str(target), task=task, named=model), "onnx"
        except PipelineError as e:
            if backend == "onnx" or isinstance(e, YoloTaskError):  # weights of another task: no fallback helps
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
    t0 = time.perf_counter()
    work = None
    try:
        # A private folder beside the target (same file system for the final rename; two runs
        # exporting at once do not share it).
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target.parent, f".{target.stem}.*.export")  # killed exports' (as large as the file)
        work = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", suffix=".export", dir=target.parent))
        # Ultralytics writes <weights stem>.onnx beside the weights it loaded; a link in our own
        # folder keeps it from overwriting a file of the user's.
        link = work / weights.name
        try:
            link.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, link)
        log.info("exporting %s to ONNX for onnxruntime (once; kept as %s)", weights, target)
        exported = Path(
            load_yolo(str(link), task=task).export(
                format="onnx", dynamic=True, imgsz=imgsz, simplify=False, verbose=False
            )
        )
        worst = verify_yolo_onnx(torch_model, exported, imgsz)
        if worst > YOLO_ONNX_TOLERANCE:
            raise PipelineError(
                f"the ONNX export differs from the torch model by {worst:.2e} (allowed {YOLO_ONNX_TOLERANCE:.0e})"
            )
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
            raise PipelineError(
                f"the ONNX output of shape {g.shape} has no torch counterpart (torch gave {[r.shape for r in ref]})"
            )
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


def persons_from_ultralytics(result, shape_hw: tuple[int, int], need_masks: bool = False) -> list[Person]:
    """Convert one Ultralytics Results object to Persons (numpy), best confidence first.

    Args:
        result: one image's Results (boxes, and masks for a segmentation model).
        shape_hw: the source picture's size; masks must be at that size (retina_masks=True).
        need_masks: a result without masks has no persons (segmentation); otherwise its persons
            are boxes alone (detection).
    """
    boxes = result.boxes
    if boxes is None or len(boxes) == 0 or (need_masks and result.masks is None):
        return []
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float32)
    conf = boxes.conf.cpu().numpy().astype(np.float32)
    cls = boxes.cls.cpu().numpy().astype(np.int64)
    masks = None
    if need_masks and result.masks is not None:  # a segmentation model used to detect: its boxes alone
        masks = result.masks.data.cpu().numpy() > 0.5
        if masks.shape[1:] != tuple(shape_hw):
            raise PipelineError(f"segmentation masks are {masks.shape[1:]}, expected the source size {shape_hw}")
    order = np.argsort(-conf, kind="stable")
    return [
        Person(xyxy[i], float(conf[i]), None if masks is None else masks[i]) for i in order if cls[i] == PERSON_CLASS
    ]


@cache
def counting_predictor() -> type:
    """Ultralytics' segmentation predictor, recording on each result how many persons its NMS kept
    (`nms_persons`) before Ultralytics drops those whose mask has no pixel: how we know that a
    picture held more persons than max_det let through, even when some of those had empty masks."""
    from ultralytics.models.yolo.segment import SegmentationPredictor

    class CountingSegmentationPredictor(SegmentationPredictor):
        def construct_result(self, pred, img, orig_img, img_path, proto):
            result = super().construct_result(pred, img, orig_img, img_path, proto)
            result.nms_persons = int(pred.shape[0])
            return result

    return CountingSegmentationPredictor


class UltralyticsSegmenter(Segmenter):
    """Ultralytics YOLO segmentation, person class only, masks at source resolution, at most
    spec.max_persons persons a picture (the most confident)."""

    def __init__(self, spec: SegmentSpec, device: str = "auto", batch: int = 8) -> None:
        self.spec = spec
        self.model, self.backend = load_cpu_yolo(spec.model, "segment", spec.backend, spec.imgsz, device)
        self.device = yolo_device(device)
        # A picture's persons must not depend on the pictures beside it (the engines, and an update,
        # batch differently): Ultralytics letterboxes a batch of one shape to its smallest rectangle
        # and a mixed one to the square, which finds other persons. On the CPU each picture is its
        # own batch (no slower: yolov8l-seg 1.57-1.58 s a 768x1024 picture alone against 1.63-1.67 in
        # batches of 8, yolov8n-seg 115-136 ms against 120-135, 2 cores, alternating); on a GPU, where
        # batches pay, every picture goes to the square (rect=False) in batches of `batch`.
        self.batch, self.rect = (batch, False) if _runs_on_gpu(device) else (1, True)
        self.predict_seconds = 0.0

    def segment(self, images_rgb: Sequence[np.ndarray]) -> list[list[Person]]:
        cap = self.spec.max_persons
        found = self.segment_capped(images_rgb, cap)
        if cut := sum(f.cut for f in found):
            why = "Ultralytics' own limit" if cap >= ULTRALYTICS_MAX_DET else "--max-persons"
            log.info("%d picture(s) held more than %d persons: the most confident kept (%s)", cut, cap, why)
        return [f.persons for f in found]

    def segment_capped(self, images_rgb: Sequence[np.ndarray], cap: int) -> list[CappedPersons]:
        """Ultralytics stops at cap + 1 persons a picture: its NMS keeps the most confident of the
        person class (classes=[person] filters before max_det), and masks are only made for those,
        so a detector that fires everywhere costs at most cap + 1 full-size masks a picture. The
        one past the cap only says that the picture held more; it is dropped here. Of the persons
        considered, Ultralytics drops those with an empty mask, so fewer than `cap` may be kept."""
        if not images_rgb:
            return []
        t = time.perf_counter()
        out = []
        for k in range(0, len(images_rgb), self.batch):  # Ultralytics takes a list of arrays as one batch
            chunk = images_rgb[k : k + self.batch]
            results = self.model.predict(
                source=[rgb_to_bgr(im) for im in chunk],  # Ultralytics reads numpy arrays as BGR
                classes=[PERSON_CLASS],
                conf=self.spec.conf,
                imgsz=self.spec.imgsz,
                max_det=cap + 1,
                retina_masks=True,  # masks at the source resolution, not the 640 letterbox
                device=self.device,
                rect=self.rect,
                stream=True,
                verbose=False,
                predictor=counting_predictor(),
            )
            out += [
                CappedPersons(persons_from_ultralytics(r, im.shape[:2], need_masks=True)[:cap], _found(r) > cap)
                for r, im in zip(results, chunk)
            ]
        self.predict_seconds += time.perf_counter() - t
        return out


def _found(result) -> int:
    """Persons NMS kept for a picture (counting_predictor's count; without its hook, in an Ultralytics
    that lacks it, the persons returned, which may miss those dropped for an empty mask)."""
    if hasattr(result, "nms_persons"):
        return int(result.nms_persons)
    return 0 if result.boxes is None else len(result.boxes)


class UltralyticsDetector(Detector):
    """Ultralytics YOLO detection, person class only: boxes without masks."""

    def __init__(self, model: str, conf: float, device: str = "auto", imgsz: int = 640, backend: str = "auto") -> None:
        self.model, self.backend = load_cpu_yolo(model, "detect", backend, imgsz, device)
        self.conf, self.device, self.imgsz = conf, yolo_device(device), imgsz

    def detect(self, frames_rgb: Sequence[np.ndarray]) -> list[list[Person]]:
        results = self.model.predict(
            source=[rgb_to_bgr(f) for f in frames_rgb],
            classes=[PERSON_CLASS],
            conf=self.conf,
            imgsz=self.imgsz,
            device=self.device,
            stream=True,
            verbose=False,
        )
        return [
            [Person(p.box_xyxy, p.confidence) for p in persons_from_ultralytics(r, f.shape[:2])]
            for r, f in zip(results, frames_rgb)
        ]


def make_segmenter(spec: SegmentSpec, device: str = "auto") -> Segmenter:
    return UltralyticsSegmenter(spec, device=device)

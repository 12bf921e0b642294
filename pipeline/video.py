"""Video matching: a video file in; for every --frame-stride-th frame the people in it (boxes,
optional white-background masks), their top-k catalogue matches, one picture per processed frame
and one JSONL results file out (video_results/<clip>/).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .config import RunConfig
from .errors import PipelineError
from .plots import THUMB_SIZE, compose_matches, make_thumbnail, save_jpeg
from .preprocess import preprocess_batch
from .report import RunSummary
from .retrieval import topk_neighbours
from .segment import PERSON_CLASS, PersonMask, box_pixels, load_cpu_yolo, rgb_to_bgr, white_background_crop, yolo_device
from .store import ThumbnailReader, atomic_write_text, embedded_rows

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
REENCODE_HINT = "re-encode it to H.264, e.g. ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p OUTPUT.mp4"


@dataclass(frozen=True)
class Frame:
    """A decoded frame: index in the stream, time in seconds, uint8 (H, W, 3) RGB pixels."""

    index: int
    time_s: float
    rgb: np.ndarray


@dataclass(frozen=True)
class Detections:
    """Persons in one frame: xyxy float32 (N, 4) in frame pixels, scores float32 (N,)."""

    xyxy: np.ndarray
    scores: np.ndarray


class Detector(Protocol):
    def detect(self, frames_rgb: Sequence[np.ndarray]) -> list[Detections]: ...


def find_video(video_dir: Path, clip: str) -> Path:
    """<video_dir>/<clip>.mp4 (or another common container when that is what exists)."""
    direct = video_dir / clip
    if direct.suffix.lower() in VIDEO_SUFFIXES and direct.is_file():
        return direct
    candidates = [video_dir / f"{clip}{s}" for s in VIDEO_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    raise PipelineError(f"video not found: {video_dir / (clip + '.mp4')} (also looked for {', '.join(c.suffix for c in candidates[1:])}); check --video_dir and --video_clip")


def open_video(path: Path):
    """cv2.VideoCapture that is known to open; PipelineError naming the file otherwise."""
    import cv2

    if path.stat().st_size == 0:
        raise PipelineError(f"video {path} is empty (0 bytes)")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise PipelineError(f"OpenCV cannot open video {path}: unsupported or damaged; {REENCODE_HINT}")
    return cap


class FrameReader:
    """Read a video front to back: grab() every frame, decode only every stride-th one.

    Never seeks (seeking is slow and inexact for inter-frame codecs). Frames leave OpenCV here,
    converted from BGR to RGB once. After iteration, `frames_read` is the number of frames the
    stream really had (the container's count is only a hint).
    """

    def __init__(self, path: Path, stride: int) -> None:
        self.path, self.stride = path, stride
        self.frames_read = 0

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        cap = open_video(self.path)
        try:
            fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            index = 0
            while True:
                if index % self.stride == 0:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    t = index / fps if fps > 0 else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    self.frames_read = index + 1
                    yield Frame(index, float(t), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                elif not cap.grab():
                    break
                index += 1
                self.frames_read = index
            if index == 0:
                raise PipelineError(f"video {self.path} has no readable frames (empty or damaged); {REENCODE_HINT}")
        finally:
            cap.release()


def frame_count(path: Path) -> int:
    """The container's frame count (for the progress bar only; it may be wrong or 0)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


class UltralyticsDetector:
    """Ultralytics YOLO detection, person class only."""

    def __init__(self, model: str, conf: float, device: str = "auto", imgsz: int = 640, backend: str = "auto") -> None:
        self.model, self.backend = load_cpu_yolo(model, "detect", backend, imgsz, device)
        self.conf, self.device, self.imgsz = conf, yolo_device(device), imgsz

    def detect(self, frames_rgb: Sequence[np.ndarray]) -> list[Detections]:
        sources = [rgb_to_bgr(f) for f in frames_rgb]  # Ultralytics wants BGR
        out = []
        for r in self.model.predict(source=sources, classes=[PERSON_CLASS], conf=self.conf, imgsz=self.imgsz, device=self.device, stream=True, verbose=False):
            b = r.boxes
            if b is None or len(b) == 0:
                out.append(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
                continue
            keep = b.cls.cpu().numpy().astype(int) == PERSON_CLASS
            out.append(Detections(b.xyxy.cpu().numpy().astype(np.float32)[keep], b.conf.cpu().numpy().astype(np.float32)[keep]))
        return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes a (N, 4) and b (M, 4), xyxy: float32 (N, M)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def person_crops(frame_rgb: np.ndarray, det: Detections, masks: list[PersonMask] | None, min_iou: float = 0.5) -> list[tuple[np.ndarray, bool]]:
    """One crop per detection; with masks, pixels outside the best-overlapping person mask (box IoU
    >= min_iou) are white. Returns (uint8 crop, whether a mask was applied) per detection."""
    h, w = frame_rgb.shape[:2]
    ious = box_iou(det.xyxy, np.stack([m.box_xyxy for m in masks])) if masks else None
    crops = []
    for i, box in enumerate(det.xyxy):
        if ious is not None and ious.shape[1] and ious[i].max() >= min_iou:
            m = masks[int(ious[i].argmax())]
            crop = white_background_crop(frame_rgb, m.mask, box)
            masked = True
        else:
            x1, y1, x2, y2 = box_pixels(box, w, h)
            crop = frame_rgb[y1:y2, x1:x2].copy() if x2 > x1 and y2 > y1 else None
            masked = False
        crops.append((crop, masked))
    return crops


def draw_frame_picture(
    frame_rgb: np.ndarray,
    det: Detections,
    rows: list[Image.Image],
    max_width: int = 1280,
) -> Image.Image:
    """The frame (scaled to max_width) with numbered boxes, above one match row per person."""
    im = Image.fromarray(frame_rgb)
    scale = min(1.0, max_width / im.width)
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for k, (box, score) in enumerate(zip(det.xyxy, det.scores)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=3)
        label = f"#{k} {score:.2f}"
        draw.rectangle([x1, max(0, y1 - 14), x1 + 7 * len(label), max(0, y1 - 14) + 14], fill=(255, 40, 40))
        draw.text((x1 + 2, max(0, y1 - 14)), label, fill=(255, 255, 255))
    width = max([im.width] + [r.width for r in rows])
    height = im.height + sum(r.height for r in rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(im, (0, 0))
    y = im.height
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


def run_video(cfg: RunConfig, detector: Detector | None = None, segmenter=None) -> RunSummary:
    """--video_clip: gallery (cache or built), then detect, (segment), embed, match, draw per frame."""
    from .embedders import make_embedder
    from .gallery import record_failures
    from .runner import build_or_load_gallery, segmenter_factory
    from .store import check_writable

    assert cfg.video_clip is not None
    summary = RunSummary(mode=f"video {cfg.video_clip}" + (" (segmented)" if cfg.segmented else ""))
    path = find_video(cfg.video_dir, cfg.video_clip)
    open_video(path).release()  # fail on an unreadable file before any model is loaded
    out_dir = cfg.video_results_dir
    check_writable(out_dir)
    with summary.stage("load embedder"):
        embedder = make_embedder(cfg.embedder)
    gallery, rows, _ = build_or_load_gallery(cfg, summary, embedder=embedder)
    record_failures(rows, summary)
    embedded = embedded_rows(rows)
    if not embedded:
        raise PipelineError(f"the gallery in {cfg.store_dir} has no embedded items to match against")
    with summary.stage("load detector"):
        detector = detector or UltralyticsDetector(cfg.det_model, cfg.det_conf, device=cfg.embedder.device, backend=cfg.det_backend)
        if cfg.segmented and segmenter is None:
            segmenter = segmenter_factory(cfg)
    thumbs = ThumbnailReader(cfg.store_dir / "thumbnails.npy")
    for old in out_dir.glob("frame_*.jpg"):
        old.unlink()
    total = frame_count(path)
    times = dict.fromkeys(("read", "detect", "segment", "embed", "match", "draw"), 0.0)
    results: list[str] = []
    n_frames = n_persons = n_empty = 0
    t_read = time.perf_counter()
    bar = tqdm(total=total or None, unit="frame", desc=f"video {cfg.video_clip}", disable=not cfg.progress)
    last_index = -1
    reader = FrameReader(path, cfg.frame_stride)
    try:
        for frame in reader:
            t0 = time.perf_counter()
            times["read"] += t0 - t_read
            bar.update(frame.index - last_index)
            last_index = frame.index
            det = detector.detect([frame.rgb])[0]
            t1 = time.perf_counter()
            masks = segmenter.segment([frame.rgb])[0] if (segmenter is not None and len(det.xyxy)) else None
            t2 = time.perf_counter()
            crops = person_crops(frame.rgb, det, masks)
            valid = [k for k, (c, _) in enumerate(crops) if c is not None and c.size]
            crop_images = {k: Image.fromarray(crops[k][0]) for k in valid}
            if valid:
                queries = embedder.embed(preprocess_batch(list(crop_images.values()), embedder.preprocess_cfg))
            t3 = time.perf_counter()
            nb = topk_neighbours(queries, gallery, cfg.top_k) if valid else None
            t4 = time.perf_counter()
            persons, pic_rows = [], []
            for qi, k in enumerate(valid):
                matches = [
                    {"rank": r + 1, "file": embedded[j].file, "row": embedded[j].index, "source_row": embedded[j].source_row, "distance": round(float(d), 6)}
                    for r, (j, d) in enumerate(zip(nb.indices[qi], nb.distances[qi])) if j >= 0
                ]
                persons.append({
                    "person": k,
                    "box_xyxy": [round(float(v), 2) for v in det.xyxy[k]],
                    "score": round(float(det.scores[k]), 6),
                    "masked": crops[k][1],
                    "matches": matches,
                })
                tiles = [thumbs[m_j].copy() for m_j in nb.indices[qi] if m_j >= 0]
                labels = [f"d={m['distance']:.3f}\n{m['file']}" for m in matches]
                pic_rows.append(compose_matches(make_thumbnail(crop_images[k], THUMB_SIZE), f"person #{k}", tiles, labels))
            picture = draw_frame_picture(frame.rgb, det, pic_rows)
            save_jpeg(picture, out_dir / f"frame_{frame.index:06d}.jpg", quality=88)
            t5 = time.perf_counter()
            results.append(json.dumps({"frame": frame.index, "time_s": round(frame.time_s, 3), "persons": persons}))
            times["detect"] += t1 - t0
            times["segment"] += t2 - t1
            times["embed"] += t3 - t2
            times["match"] += t4 - t3
            times["draw"] += t5 - t4
            n_frames += 1
            n_persons += len(persons)
            n_empty += not persons
            t_read = time.perf_counter()
    finally:
        bar.update(max(0, reader.frames_read - 1 - last_index))
        bar.close()
        thumbs.close()
    results_path = out_dir / "results.jsonl"
    atomic_write_text(results_path, "\n".join(results) + ("\n" if results else ""))
    read_frames = reader.frames_read
    if read_frames < cfg.frame_stride:
        summary.notes.append(f"the video has {read_frames} frame(s), fewer than --frame-stride {cfg.frame_stride}: only frame 0 was analysed")
    summary.counts.update({"frames read": read_frames, "frames processed": n_frames, "persons": n_persons, "frames without persons": n_empty})
    video_wall = sum(times.values())
    for k, v in times.items():
        summary.stages[f"video {k}"] = v
    if video_wall > 0:
        summary.notes.append(f"{n_frames / video_wall:.2f} processed frames per second of wall time (gallery excluded)")
    summary.outputs["frame pictures"] = f"{out_dir}/frame_*.jpg"
    summary.outputs["results"] = str(results_path)
    return summary

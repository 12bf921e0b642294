"""Video matching: a video file in; for every --frame-stride-th frame the people in it (boxes,
optional white-background masks), their top-k catalogue matches, one picture per processed frame
and one JSONL results file out (video_results/<clip>/).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .catalog import open_gallery, segmenter_factory
from .config import RunConfig
from .embedders import make_embedder
from .errors import PipelineError
from .fileio import atomic_write_text, check_writable
from .persons import Detector, Person, Segmenter, person_crop, with_masks
from .plots import THUMB_SIZE, compose_matches, make_thumbnail, neighbour_tiles, save_jpeg
from .preprocess import preprocess_batch
from .report import RunSummary
from .retrieval import topk_neighbours
from .store import THUMBNAILS_FILE, ThumbnailReader
from .webreport import Section, relative_link, write_section
from .yolo import UltralyticsDetector

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
REENCODE_HINT = "re-encode it to H.264, e.g. ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p OUTPUT.mp4"


@dataclass(frozen=True)
class Frame:
    """A decoded frame: index in the stream, time in seconds, uint8 (H, W, 3) RGB pixels."""

    index: int
    time_s: float
    rgb: np.ndarray


def find_video(video_dir: Path, clip: str) -> Path:
    """<video_dir>/<clip>.mp4 (or another common container when that is what exists)."""
    direct = video_dir / clip
    if direct.suffix.lower() in VIDEO_SUFFIXES and direct.is_file():
        return direct
    candidates = [video_dir / f"{clip}{s}" for s in VIDEO_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    raise PipelineError(
        f"video not found: {video_dir / (clip + '.mp4')} (also looked for "
        f"{', '.join(c.suffix for c in candidates[1:])}); check --video_dir and --video_clip"
    )


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


def draw_frame_picture(
    frame_rgb: np.ndarray, persons: Sequence[Person], rows: list[Image.Image], max_width: int = 1280
) -> Image.Image:
    """The frame (scaled to max_width) with numbered boxes, above one match row per person."""
    im = Image.fromarray(frame_rgb)
    scale = min(1.0, max_width / im.width)
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for k, person in enumerate(persons):
        x1, y1, x2, y2 = (float(v) * scale for v in person.box_xyxy)
        score = person.confidence
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


def run_video(cfg: RunConfig, detector: Detector | None = None, segmenter: Segmenter | None = None) -> RunSummary:
    """--video_clip: gallery (cache or built), then detect, (segment), embed, match, draw per frame.

    detector, segmenter: stand-ins for the Ultralytics models (benchmarks, tests).
    """
    video = cfg.video
    if video.clip is None:
        raise PipelineError("run_video needs --video_clip")
    summary = RunSummary(mode=f"video {video.clip}" + (" (segmented)" if cfg.segmented else ""))
    path = find_video(video.folder, video.clip)
    open_video(path).release()  # fail on an unreadable file before any model is loaded
    out_dir = cfg.video_results_dir
    check_writable(out_dir)
    with summary.stage("load embedder"):
        embedder = make_embedder(cfg.embedder)
    gallery = open_gallery(cfg, summary, embedder=embedder)
    embedded = gallery.embedded
    if not embedded:
        raise PipelineError(f"the gallery in {cfg.store_dir} has no embedded items to match against")
    with summary.stage("load detector"):
        detector = detector or UltralyticsDetector(
            video.det_model, video.det_conf, device=cfg.embedder.device, backend=video.det_backend
        )
        if cfg.segmented and segmenter is None:
            segmenter = segmenter_factory(cfg)
    thumbs = ThumbnailReader(cfg.store_dir / THUMBNAILS_FILE)
    names = [r.file for r in embedded]
    for old in out_dir.glob("frame_*.jpg"):
        old.unlink()
    total = frame_count(path)
    times = dict.fromkeys(("read", "detect", "segment", "embed", "match", "draw"), 0.0)
    results: list[str] = []
    shown: list[dict] = []  # for the report
    n_frames = n_persons = n_empty = 0
    t_read = time.perf_counter()
    bar = tqdm(total=total or None, unit="frame", desc=f"video {video.clip}", disable=not cfg.progress)
    last_index = -1
    reader = FrameReader(path, video.frame_stride)
    try:
        for frame in reader:
            t0 = time.perf_counter()
            times["read"] += t0 - t_read
            bar.update(frame.index - last_index)
            last_index = frame.index
            persons = detector.detect([frame.rgb])[0]
            t1 = time.perf_counter()
            if segmenter is not None and persons:
                persons = with_masks(persons, segmenter.segment([frame.rgb])[0])
            t2 = time.perf_counter()
            # person k keeps number k (the #k drawn on the frame) even when another has no crop
            crops = {k: c for k, p in enumerate(persons) if (c := person_crop(frame.rgb, p)) is not None and c.size}
            crop_images = {k: Image.fromarray(c) for k, c in crops.items()}
            if crops:
                queries = embedder.embed(preprocess_batch(list(crop_images.values()), embedder.preprocess_cfg))
            t3 = time.perf_counter()
            nb = topk_neighbours(queries, gallery.embeddings, cfg.top_k) if crops else None
            t4 = time.perf_counter()
            found, pic_rows = [], []
            for qi, k in enumerate(crops):
                matches = [
                    {
                        "rank": r + 1,
                        "file": embedded[j].file,
                        "row": embedded[j].index,
                        "source_row": embedded[j].source_row,
                        "distance": round(float(d), 6),
                    }
                    for r, (j, d) in enumerate(zip(nb.indices[qi], nb.distances[qi]))
                    if j >= 0
                ]
                found.append(
                    {
                        "person": k,
                        "box_xyxy": [round(float(v), 2) for v in persons[k].box_xyxy],
                        "score": round(float(persons[k].confidence), 6),
                        "masked": persons[k].mask is not None,
                        "matches": matches,
                    }
                )
                tiles, labels = neighbour_tiles(nb.indices[qi], nb.distances[qi], lambda j: thumbs[j].copy(), names)
                pic_rows.append(
                    compose_matches(make_thumbnail(crop_images[k], THUMB_SIZE), f"person #{k}", tiles, labels)
                )
            picture = draw_frame_picture(frame.rgb, persons, pic_rows)
            save_jpeg(picture, out_dir / f"frame_{frame.index:06d}.jpg", quality=88)
            t5 = time.perf_counter()
            results.append(json.dumps({"frame": frame.index, "time_s": round(frame.time_s, 3), "persons": found}))
            shown.append(
                {
                    "frame": frame.index,
                    "time_s": round(frame.time_s, 3),
                    "persons": found,
                    "picture": relative_link(out_dir / f"frame_{frame.index:06d}.jpg", cfg.plots_dir),
                }
            )
            for key, (a, b) in {
                "detect": (t0, t1),
                "segment": (t1, t2),
                "embed": (t2, t3),
                "match": (t3, t4),
                "draw": (t4, t5),
            }.items():
                times[key] += b - a
            n_frames += 1
            n_persons += len(found)
            n_empty += not found
            t_read = time.perf_counter()
    finally:
        bar.update(max(0, reader.frames_read - 1 - last_index))
        bar.close()
        thumbs.close()
    results_path = out_dir / "results.jsonl"
    atomic_write_text(results_path, "\n".join(results) + ("\n" if results else ""))
    read_frames = reader.frames_read
    if read_frames < video.frame_stride:
        summary.notes.append(
            f"the video has {read_frames} frame(s), fewer than --frame-stride {video.frame_stride}: only frame 0 was "
            f"analysed"
        )
    summary.counts.update(
        {
            "frames read": read_frames,
            "frames processed": n_frames,
            "persons": n_persons,
            "frames without persons": n_empty,
        }
    )
    video_wall = sum(times.values())
    for k, v in times.items():
        summary.stages[f"video {k}"] = v
    if video_wall > 0:
        summary.notes.append(f"{n_frames / video_wall:.2f} processed frames per second of wall time (gallery excluded)")
    summary.outputs["frame pictures"] = f"{out_dir}/frame_*.jpg"
    summary.outputs["results"] = str(results_path)
    with summary.stage("report"):
        section = Section(f"video_{video.clip}", "video", f"Video {video.clip}", summary, {"frames": shown})
        summary.outputs["report"] = str(write_section(cfg.plots_dir, section))
    return summary


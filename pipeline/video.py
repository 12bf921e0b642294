"""Video matching: a video file in; for every --frame-stride-th frame the people in it (boxes,
optional white-background masks) and their catalogue matches; each person followed through the clip
(tracking.py) and given one look; out in video_results/<clip>/: one picture per analysed frame,
results.jsonl, tracks.json, a contact sheet per track and the annotated video (annotate.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .annotate import AnnotatedVideoWriter, Drawing, draw, output_size
from .config import CLIP_SUFFIXES, RunConfig, VideoSpec
from .derived import made_on, video_outputs
from .embedders import Embedder, make_embedder, on_cuda
from .errors import PipelineError, UsageError
from .fileio import atomic_write_text, check_writable, printable_name, read_json_dict, stops_held
from .filters import FilterError
from .galleries import (
    Gallery,
    group_by,
    load_gallery_cache,
    open_gallery,
    open_searcher,
    segmenter_factory,
    with_metadata,
    with_store_embedder,
)
from .persons import Detector, Person, Segmenter, person_crops, with_masks
from .plots import (
    THUMB_SIZE,
    caption_size,
    compose_matches,
    draw_caption,
    make_thumbnail,
    neighbour_tiles,
    save_jpeg,
)
from .preprocess import preprocess_batch
from .report import RunSummary, terminal_text
from .retrieval import Neighbours
from .searcher import Hit, Searcher
from .store import SIDECAR_FILE, ThumbnailReader, shown_name
from .tracking import Tracker
from .webreport import Section, drop_section, relative_link, write_section
from .yolo import ULTRALYTICS_MAX_DET, UltralyticsDetector, check_yolo_name

log = logging.getLogger(__name__)

_ATTACHED_PIC = 1 << 10  # AV_DISPOSITION_ATTACHED_PIC: a cover picture, not the clip
REENCODE_HINT = "re-encode it to H.264, e.g. ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p OUTPUT.mp4"


@dataclass(frozen=True)
class Frame:
    """A frame: index in the stream, time in seconds, uint8 (H, W, 3) RGB pixels (analysed frames),
    and, when the reader decodes every frame, the BGR pixels at the annotated video's size."""

    index: int
    time_s: float
    rgb: np.ndarray | None
    analysed: bool = True
    small_bgr: np.ndarray | None = None

    def rgb_pixels(self) -> np.ndarray:
        """The RGB pixels, which only analysed frames carry."""
        if self.rgb is None:
            raise ValueError(f"frame {self.index} is not an analysed frame: it has no RGB pixels")
        return self.rgb

    def small_bgr_pixels(self) -> np.ndarray:
        """The BGR pixels at the annotated video's size, which frames carry when one is written."""
        if self.small_bgr is None:
            raise ValueError(f"frame {self.index} has no BGR pixels: the reader was given no small_size")
        return self.small_bgr


def find_video(video_dir: Path, clip: str) -> Path:
    """<video_dir>/<clip>.mp4 (or another common container when that is what exists, its suffix in
    any case: a phone's IMG_1234.MOV; the first in CLIP_SUFFIXES' order when several are, said); else
    `clip` as a file's name in video_dir, or a path to the file itself, whatever its suffix (a
    camcorder's .MTS: the decoder says whether it reads it)."""
    direct = video_dir / clip
    if direct.suffix.lower() in CLIP_SUFFIXES and direct.is_file():
        return direct
    if video_dir.exists() and not video_dir.is_dir() and not Path(clip).is_file():
        raise UsageError(f"--video_dir {video_dir} is a file, not a folder of clips; give the folder, or the clip's "
                         "file as --video_clip")
    candidates = [video_dir / f"{clip}{s}" for s in CLIP_SUFFIXES]
    folder = direct.parent  # <video_dir>/sub for a clip named sub/a
    named = sorted({p for p in (folder.iterdir() if folder.is_dir() else ())
                    if p.stem == direct.name and p.suffix.lower() in CLIP_SUFFIXES and p.is_file()},
                   key=lambda p: (CLIP_SUFFIXES.index(p.suffix.lower()), p.name))
    if named:
        if len(named) > 1:
            log.warning("%s are all clip %s: playing %s (give --video_clip the file's whole name to choose "
                        "another)", ", ".join(p.name for p in named), clip, named[0].name)
        return named[0]
    own = Path(clip)  # a path to the clip itself (videos/clip_1.mp4), from here or absolute
    for given in (direct, own):
        if given.suffix and given.is_file():
            return given
    if own.suffix.lower() in CLIP_SUFFIXES or own.is_absolute():
        also = "" if own.is_absolute() else f", nor {video_dir / clip}"
        raise PipelineError(f"video not found: {own}{also}; check --video_clip and --video_dir")
    if not video_dir.is_dir():
        raise PipelineError(f"video not found: the folder {video_dir} does not exist; check --video_dir")
    there = sorted(p.name for p in video_dir.iterdir() if p.suffix.lower() in CLIP_SUFFIXES and p.is_file())
    held = (f"; its clips: {', '.join(there[:8])}" + (f" and {len(there) - 8:,} more" if len(there) > 8 else "")
            if there else f"; {video_dir} holds no video file")
    raise PipelineError(
        f"video not found: {video_dir / (clip + '.mp4')} (also looked for "
        f"{', '.join(c.suffix for c in candidates[1:])}){held}; check --video_dir and --video_clip"
    )


def open_video(path: Path):
    """The PyAV container of a file known to open and to hold a video stream; PipelineError naming
    the file otherwise."""
    import av

    if path.stat().st_size == 0:
        raise PipelineError(f"video {path} is empty (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="replace")  # a tag in Latin-1 ("Vidéo") is no reason to stop
    except av.FFmpegError as e:
        if mp4_cut_short(path):  # its index (moov) last, as most writers put it, and cut before it
            raise PipelineError(f"cannot open video {path}: it is cut short (its MP4 index, the moov atom, is "
                                "missing, as a copy or download that stopped leaves it): copy or download it again"
                                ) from e
        raise PipelineError(f"cannot open video {path}: unsupported or damaged ({e}); {REENCODE_HINT}") from e
    if not container.streams.video:
        streams = ", ".join(sorted({st.type for st in container.streams})) or "none"
        container.close()
        raise PipelineError(f"cannot open video {path}: it has no video stream (its streams: {streams}); is it the "
                            "clip you meant?")
    return container


def video_stream(container):
    """The clip's moving picture: the video stream ffmpeg itself would play (`av_find_best_stream`,
    through PyAV's `streams.best`), which passes over a cover picture or a thumbnail track stored as a
    video stream of one frame (Matroska attachments, an MP4's `covr`), whatever its place; the first
    video stream where ffmpeg names none."""
    best = container.streams.best("video") if hasattr(container.streams, "best") else None  # PyAV 13 on
    if best is not None and not _cover(best):
        return best
    moving = [st for st in container.streams.video if not _cover(st)]
    return (moving or list(container.streams.video))[0]


def _cover(stream) -> bool:
    """Whether a video stream is a cover picture (its disposition a plain Flag before PyAV 15)."""
    disposition = getattr(stream, "disposition", 0)
    return bool(int(getattr(disposition, "value", disposition) or 0) & _ATTACHED_PIC)


def mp4_cut_short(path: Path) -> bool:
    """Whether an MP4/MOV file (its first box `ftyp`) ends inside one of its top-level boxes, or before
    its index (`moov`): what a copy or download that stopped leaves. Reads the box headers alone."""
    try:
        return _boxes_cut_short(path)
    except OSError:  # unreadable: the caller's own error says so
        return False


def _boxes_cut_short(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as f:
        at, moov, first = 0, False, True
        while at + 8 <= size:
            f.seek(at)
            head = f.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if first and kind != b"ftyp":
                return False  # not an MP4 of boxes
            first = False
            if length == 1 and len(head) >= 16:  # a 64-bit length follows
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:  # to the end of the file
                return not (moov or kind == b"moov")
            if length < 8 or at + length > size:
                return True
            moov = moov or kind == b"moov"
            at += length
        return not first and not moov


def pixel_aspect(stream) -> float:
    """The width of a coded pixel over its height (1.0: square): camcorder and broadcast clips (HDV's
    1440x1080 shown 16:9) are shown wider than they are coded, which players apply."""
    sar = stream.codec_context.sample_aspect_ratio
    return float(sar) if sar else 1.0  # None or 0/1: not said, square


def square_pixels(frame, aspect: float) -> dict[str, int]:
    """upright()'s size for a frame of non-square pixels shown as it is meant to be (people and
    garments not squeezed); {} for square ones."""
    if abs(aspect - 1.0) < 1e-3:
        return {}
    width, height = max(1, round(frame.width * aspect)), frame.height
    turned = quarter_turns(frame) % 2 == 1  # upright() takes the size as shown
    return {"width": height, "height": width} if turned else {"width": width, "height": height}


def quarter_turns(frame) -> int:
    """How many quarter turns a decoded frame's display matrix (a phone clip's rotation) asks for, 0-3."""
    return int(round((frame.rotation or 0) / 90)) % 4


def upright(frame, **reformat) -> np.ndarray:
    """A decoded frame as an array turned as it is meant to be shown (phone clips carry a rotation
    in their display matrix, which players, OpenCV and we apply)."""
    turns = quarter_turns(frame)
    if turns % 2 and "width" in reformat:  # the coded frame is the displayed one turned on its side
        reformat["width"], reformat["height"] = reformat["height"], reformat["width"]
    array = frame.to_ndarray(**reformat)
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


class FrameReader:
    """Read a video front to back with PyAV (FFmpeg's decoder on all cores): every stride-th frame
    (the analysed ones) as RGB at full size, and when `small_size` asks for it every frame as BGR
    at that size (the annotated video), scaled by FFmpeg in the same pass as the colour conversion.

    Never seeks (seeking is slow and inexact for inter-frame codecs). A damaged packet is skipped
    and counted (`damaged_packets`), not fatal: its frame keeps its number (the frames after it keep
    theirs, as in the stream), and where it was to be analysed the next good frame is. After
    iteration, `frames_read` is the number of frames the stream had, damaged ones included (the
    container's count is only a hint).
    """

    def __init__(self, path: Path, stride: int, small_size: tuple[int, int] | None = None) -> None:
        self.path, self.stride, self.small_size = path, stride, small_size
        self.frames_read = 0
        self.damaged_packets = 0
        self.fps = 0.0
        self.last_time_s: float | None = None  # the last frame's time in the clip, where frames carry one

    @property
    def seconds(self) -> float:
        """The clip's length as read: its last frame's time plus a frame at the nominal rate (a
        variable-rate clip is not timed by its frame count), else frames / rate."""
        step = 1 / self.fps if self.fps > 0 else 0.0
        if self.last_time_s is not None:
            return self.last_time_s + step
        return self.frames_read * step

    def __iter__(self) -> Iterator[Frame]:
        import av

        container = open_video(self.path)
        try:
            stream = video_stream(container)
            stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of a video's read cost
            rate = stream.average_rate or stream.guessed_rate
            fps = self.fps = float(rate) if rate else 0.0
            aspect = pixel_aspect(stream)
            # Times are the frames' own (their pts from the stream's start): a variable-rate phone
            # clip, or one with damaged packets, is not timed by a frame count
            known = stream.start_time is not None and stream.time_base
            start = float(stream.start_time * stream.time_base) if known else None
            index, due, good = 0, 0, 0  # due: the next frame to analyse (a damaged one's next good frame goes instead)
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.FFmpegError as e:
                    self.damaged_packets += 1
                    if self.damaged_packets == 1:
                        log.warning("%s: skipping a damaged packet at frame %d (%s)", self.path.name, index, e)
                    index += 1  # the frame it held: the frames after it keep their numbers in the stream
                    self.frames_read = index
                    continue
                for frame in decoded:
                    if frame.time is not None:
                        start = frame.time if start is None else start
                        self.last_time_s = max(self.last_time_s or 0.0, frame.time - start)
                    analysed = index >= due
                    if analysed:
                        due = (index // self.stride + 1) * self.stride
                    if analysed or self.small_size:
                        if frame.time is not None:
                            start = frame.time if start is None else start
                            t = max(0.0, frame.time - start)
                        else:
                            t = index / fps if fps > 0 else 0.0
                        self.frames_read = index + 1
                        rgb = upright(frame, format="rgb24", **square_pixels(frame, aspect)) if analysed else None
                        small = None
                        if self.small_size:
                            w, h = self.small_size
                            small = upright(frame, width=w, height=h, format="bgr24", interpolation="AREA")
                        yield Frame(index, float(t), rgb, analysed, small)
                    index += 1
                    good += 1
                    self.frames_read = index
            if good == 0:
                raise PipelineError(f"video {self.path} has no readable frames (empty or damaged); {REENCODE_HINT}")
        finally:
            container.close()


def probe(path: Path) -> tuple[int, float, int, int]:
    """(frame count, fps, width, height as shown) as the container says (the count may be wrong or 0:
    it guides the progress bar, and says whether the clip ended early; where the container keeps no
    count, its length at the frame rate)."""

    with open_video(path) as container:  # a file it cannot open refused, saying why
        stream = video_stream(container)
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        width = max(1, round(width * pixel_aspect(stream))) if width else width  # as shown: square pixels
        turned, seen, read = False, False, {"ended": False, "damaged": False}
        for frame in _first_frames(container, stream, read):  # the rotation: from the first frame
            turned, seen = quarter_turns(frame) % 2 == 1, True
            break
        if not seen and read["ended"] and not read["damaged"]:  # nothing in it: re-encoding would give nothing either
            raise PipelineError(f"video {path} holds no frames: its video stream ended before its first (a recording "
                                "stopped at once, or a file written without frames)")
        if not seen:  # refused now, before a run removes the clip's earlier outputs
            where = "" if read["ended"] else f" in its first {FIRST_PACKETS} packets"
            raise PipelineError(f"video {path} has no readable frames{where} (damaged); {REENCODE_HINT}")
        count = int(stream.frames or 0)
        if count <= 0 and rate:  # Matroska and WebM count no frames: their video's length, at the rate, does
            count = int(round(_stream_seconds(stream, container) * float(rate)))
        return (
            max(0, count),
            float(rate) if rate else 0.0,
            *((height, width) if turned else (width, height)),
        )


def _stream_seconds(stream, container) -> float:
    """How long a video stream is as its container says: its own duration, else the DURATION tag
    ffmpeg's Matroska muxer writes for each stream ("00:00:03.000000000"), else the container's
    (which an audio stream running longer stretches)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION", "")
    if m := re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", tag.strip()):
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    return (container.duration or 0) / 1e6


FIRST_PACKETS = 1024  # how far a clip's first frame is looked for (past a keyframe interval: x264's is 250)


def _first_frames(container, stream, read: dict[str, bool] | None = None, max_packets: int = FIRST_PACKETS
                  ) -> Iterator:
    """The frames of the first packets that decode (a damaged packet is skipped, as FrameReader
    skips it); read["ended"]: whether the stream ended within them; read["damaged"]: whether a
    packet failed to decode."""
    import av

    for k, packet in enumerate(container.demux(stream)):
        if k >= max_packets:
            return
        try:
            yield from packet.decode()
        except av.FFmpegError:
            if read is not None:
                read["damaged"] = True
            continue
    if read is not None:
        read["ended"] = True


def box_label(track: int | None, confidence: float) -> str:
    """A person's box label on a frame picture: its track's number (its match row says the same), or,
    for a person with nothing to cut, that it has no crop (and so no match row)."""
    return f"{f'#{track}' if track else 'no crop'} · {confidence:.2f}"


def draw_frame_picture(
    frame_rgb: np.ndarray, persons: Sequence[Person], rows: list[Image.Image], max_width: int = 1280,
    track_of: dict[int, int] | None = None,
) -> Image.Image:
    """The frame (scaled to max_width) with each person's box, above one match row per person.
    A person on a track is drawn as the annotated video draws it: "#<track>" in the track's colour,
    with the detector's confidence; one without (nothing to cut: no track, no match row) as "no crop" in grey."""
    from .annotate import track_colour

    im = Image.fromarray(frame_rgb)
    scale = min(1.0, max_width / im.width)
    if scale < 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    size = max(12, im.height // 40)  # readable on a 1080p frame too
    try:
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont = ImageFont.load_default(size=size)
    except ImportError:  # a Pillow built without FreeType: its fixed small font
        font = ImageFont.load_default()
    for k, person in enumerate(persons):
        x1, y1, x2, y2 = (float(v) * scale for v in person.box_xyxy)
        track = (track_of or {}).get(k)
        colour = tuple(reversed(track_colour(track))) if track else (120, 120, 120)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
        label = box_label(track, person.confidence)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = max(0, y1 - (bottom - top) - 6)
        draw.rectangle([x1, ty, x1 + right - left + 8, ty + bottom - top + 6], fill=colour)
        draw.text((x1 + 4 - left, ty + 3 - top), label, fill=(255, 255, 255), font=font)
    width = max([im.width] + [r.width for r in rows])
    height = im.height + sum(r.height for r in rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(im, (0, 0))
    y = im.height
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


@dataclass(frozen=True)
class Clip:
    """The clip being matched: its file, what its container says (the frame count only guides the
    progress bar: it may be wrong or 0), and the annotated video's (width, height) (None: none is
    written) with its scale relative to the frames."""

    path: Path
    frames_hint: int
    fps: float
    small_size: tuple[int, int] | None
    scale: float

    @classmethod
    def from_file(cls, path: Path, annotated_video: bool) -> Clip:
        total, fps, width, height = probe(path)
        small = output_size(width, height) if annotated_video and width and height else None
        return cls(path, total, fps, small, small[0] / width if small else 1.0)


MAX_PENDING_FRAMES = 64  # frames between two analysed ones held to interpolate boxes (720p: 180 MB)
MAX_CROPS_KEPT = 64  # a track's crops kept for its contact sheet (8 drawn), evenly spread over its sightings

Crop = tuple[float, float, np.ndarray]  # (time, area x score x uncovered share, thumbnail)


@dataclass
class CropSample:
    """A track's crops for its contact sheet, in bounded memory however long the clip: the best
    (by area x score x uncovered share) and at most MAX_CROPS_KEPT evenly spread over its sightings
    (every step-th one; when full, every other kept crop goes and the step doubles)."""

    best: Crop | None = None
    kept: list[Crop] = field(default_factory=list)
    step: int = 1
    seen: int = 0

    def add(self, crop: Crop) -> None:
        if self.best is None or crop[1] > self.best[1]:
            self.best = crop
        if self.seen % self.step == 0:
            self.kept.append(crop)
            if len(self.kept) > MAX_CROPS_KEPT:
                self.kept, self.step = self.kept[::2], self.step * 2
        self.seen += 1


# the frame loop's steps, timed one by one for the summary's stages "clip/<step>" (in this order),
# with the label each is shown by
LOOP_STEPS = {
    "read": "read frames",
    "detect": "detect persons",
    "segment": "segment persons",
    "embed": "embed crops",
    "match": "match",
    "track": "track",
    "draw": "frame pictures",
    "video": "annotated video",
}


class VideoRun:
    """One --video_clip run's state: the frame loop's pieces, the matches and tracks found so far, its
    counts and timings, and the annotated video being written (writer None: none is)."""

    def __init__(
        self,
        cfg: RunConfig,
        embedder,
        searcher: Searcher,
        out_dir: Path,
        thumbs: ThumbnailReader,
        clip: Clip,
        writer: AnnotatedVideoWriter | None,
    ) -> None:
        self.cfg, self.embedder, self.searcher, self.out_dir, self.thumbs = cfg, embedder, searcher, out_dir, thumbs
        self.clip, self.writer = clip, writer
        self.reader = FrameReader(clip.path, cfg.video.frame_stride, clip.small_size)
        self.names = [r.file for r in searcher.rows]
        self.tracker = Tracker(max_gap=cfg.video.track_gap)
        # track -> (time, area x score x uncovered share, thumbnail) per crop
        self.crops: dict[int, CropSample] = {}
        self._best: dict[int, tuple[int, str, np.ndarray | None]] = {}  # track -> (sightings, caption, tile)
        self.results: list[dict] = []
        self.times = dict.fromkeys(LOOP_STEPS, 0.0)
        self.n_frames = self.n_persons = self.n_empty = 0
        self.n_unmasked = 0  # a segmented run's persons whom no segmented person overlapped: matched by their box
        self.annotated: Path | None = None  # the annotated video, once finished
        self.allowed: np.ndarray | None = None  # --filter: the items matches may come from

    @staticmethod
    def matches(hits: list[Hit]) -> list[dict]:
        """A person's or a track's matches as results.jsonl and tracks.json write them ("row": the
        manifest line; "person": the number of the gallery's person crop, in a segmented gallery)."""
        return [
            {"rank": h.rank, "file": h.file, "row": h.line, "source_row": h.source_row, "source": h.source,
             **({"person": h.person} if h.person >= 0 else {}), "distance": round(h.distance, 6)}
            for h in hits
        ]

    def analyse_frames(self, detector: Detector, segmenter: Segmenter | None) -> None:
        """The frame loop: every analysed frame analysed; with an annotated video, the frames up to
        each analysed one drawn once it is known (their boxes are interpolated up to it)."""
        pending: list[Frame] = []  # frames since the last analysed one, waiting for the next to interpolate
        clip, reader = self.clip, self.reader
        bar = tqdm(
            total=clip.frames_hint or None,
            unit="frame",
            desc=terminal_text(f"video {self.cfg.video.clip_name}"),  # a clip name: never run by the terminal
            disable=not self.cfg.progress,
        )
        t_read = time.perf_counter()
        ok = False
        try:
            for frame in reader:
                self.times["read"] += time.perf_counter() - t_read
                last = self.results[-1]["frame"] if self.results else -1
                bar.update(1 if clip.small_size else frame.index - last)
                if not frame.analysed:
                    pending.append(frame)
                    if self.writer is not None and len(pending) >= MAX_PENDING_FRAMES:
                        # A long stride: these frames go now, their boxes moved on from the last analysed
                        # frame, rather than held in memory until the next (a minute at 720p: 5 GB)
                        self.write_video(self.writer, pending)
                        pending.clear()
                    t_read = time.perf_counter()
                    continue
                self.count(analyse(self, frame, detector, segmenter, self.times))
                if self.writer is not None:
                    self.write_video(self.writer, [*pending, frame])
                    pending.clear()
                t_read = time.perf_counter()
            if self.writer is not None:
                self.write_video(self.writer, pending)  # after the last analysed frame
            ok = True
        finally:
            bar.update(max(0, reader.frames_read - bar.n))  # not the container's count: a cut file ends early
            bar.close()
            if self.writer is not None and not ok:
                self.writer.abort()

    def count(self, found: list[dict]) -> None:
        """An analysed frame and the persons found in it."""
        self.n_frames += 1
        self.n_persons += len(found)
        self.n_empty += not found

    def write_video(self, writer: AnnotatedVideoWriter, frames: list[Frame]) -> None:
        """Frames into the annotated video, each with the tracks spanning it."""
        t = time.perf_counter()
        for f in frames:
            writer.write(draw(f.small_bgr_pixels(), drawings_at(self, f.index), self.clip.scale), f.time_s)
        self.times["video"] += time.perf_counter() - t

    def record_persons(
        self,
        frame: Frame,
        persons: list[Person],
        images: dict[int, Image.Image],
        track_of: dict[int, int],
        nb: Neighbours,
    ) -> tuple[list[dict], list[Image.Image]]:
        """Each cropped person's results entry and picture row (its tile, then its matches); its tile
        kept for its track, weighted by area x score x the share of it not covered by others. The
        picture's rows: the first MAX_FRAME_ROWS persons', MAX_PICTURE_MATCHES matches each (a crowd
        of 300 at --top-k 100 made a picture 822 x 51,780 px); results.jsonl holds them all."""
        found: list[dict] = []
        rows: list[Image.Image] = []
        hidden = 0
        for qi, k in enumerate(images):
            tile = make_thumbnail(images[k], THUMB_SIZE)
            x1, y1, x2, y2 = (float(v) for v in persons[k].box_xyxy)
            uncovered = 1.0 - self.tracker.tracks[track_of[k] - 1].last.covered
            self.crops.setdefault(track_of[k], CropSample()).add(
                (frame.time_s, (x2 - x1) * (y2 - y1) * persons[k].confidence * uncovered, tile)
            )
            found.append(
                {
                    "person": k,
                    "track": track_of[k],
                    "box_xyxy": [round(float(v), 2) for v in persons[k].box_xyxy],
                    "score": round(float(persons[k].confidence), 6),
                    "masked": persons[k].mask is not None,
                    "matches": self.matches(self.searcher.hits(nb, qi)),
                }
            )
            if len(rows) == MAX_FRAME_ROWS:  # a crowd: the picture shows the first, results.jsonl every one
                hidden += 1
                continue
            top = nb.indices[qi][:MAX_PICTURE_MATCHES]
            shown = {int(j): self.searcher.rows[int(j)].shown_name for j in top if j >= 0}  # the hits'
            tiles, labels = neighbour_tiles(top, nb.distances[qi][:MAX_PICTURE_MATCHES],
                                            lambda j: self.thumbs[j].copy(), shown)
            rows.append(compose_matches(tile, f"#{track_of[k]}", tiles, labels))  # as its box is labelled
        if hidden:
            rows.append(note_row(f"+ {hidden} more person(s) with matches, not drawn here: results.jsonl lists "
                                 "every person's matches"))
        return found, rows

    def best_match(self, track_id: int) -> tuple[str, np.ndarray | None]:
        """A track's current top-1: its caption and its thumbnail (searched again only when the
        track has been seen again)."""
        track = self.tracker.tracks[track_id - 1]
        cached = self._best.get(track_id)
        if cached is None or cached[0] != len(track.sightings):
            hits = self.searcher.search(track.look[None], 1, self.allowed)[0]
            best = ((f"{hits[0].shown_name} d={hits[0].distance:.2f}", self.thumbs[hits[0].row].copy()) if hits
                    else ("", None))
            cached = self._best[track_id] = (len(track.sightings), *best)
        return cached[1], cached[2]

    def finish_video(self) -> None:
        """The annotated video's last frames encoded and the file closed (part of its loop step)."""
        t = time.perf_counter()
        self.annotated = self.writer.close() if self.writer is not None else None
        self.times["video"] += time.perf_counter() - t

    def finish_tracks(self, summary: RunSummary) -> list[dict]:
        """The "tracks" stage: every track's summary (tracks.json's entries) and contact sheet."""
        with summary.stage("tracks", "track looks and contact sheets"):
            tracks = self.track_summaries()
            for track in tracks:
                self.contact_sheet(track)
            self.thumbs.close()
        return tracks

    def track_summaries(self) -> list[dict]:
        """tracks.json: per track its sightings and its look's top-k."""
        out = []
        for t in self.tracker.tracks:
            hits = self.searcher.search(t.look[None], self.cfg.top_k, self.allowed)[0]
            best = self.crops[t.id].best if t.id in self.crops else None
            out.append(
                {
                    "id": t.id,
                    "first_frame": t.sightings[0].frame,
                    "last_frame": t.last.frame,
                    "first_s": round(t.sightings[0].time_s, 3),
                    "last_s": round(t.last.time_s, 3),
                    "frames": len(t.sightings),
                    "sightings": [
                        {
                            "frame": s.frame,
                            "time_s": round(s.time_s, 3),
                            "box_xyxy": [round(float(v), 2) for v in s.box_xyxy],
                            "score": round(s.confidence, 6),
                        }
                        for s in t.sightings
                    ],
                    "best_crop_s": round(best[0], 3) if best else None,
                    "matches": self.matches(hits),
                    "sheet": f"track_{t.id:03d}.jpg",
                }
            )
        return out

    def contact_sheet(self, track: dict) -> Path:
        """A track's crops over time (up to 8, evenly spread) above its look's matches."""
        sample = self.crops.get(track["id"], CropSample())
        crops = sample.kept
        picks = [crops[int(k)] for k in np.linspace(0, len(crops) - 1, min(8, len(crops)))] if crops else []
        strip = (
            compose_matches(
                picks[0][2],
                f"{picks[0][0]:.1f} s",
                [c[2] for c in picks[1:]],
                [f"{c[0]:.1f} s" for c in picks[1:]],
                title=f"Track {track['id']}: the person over time",
                first_is_query=False,
            )
            if picks
            else None
        )
        nb_idx = [self.names.index(m["file"]) for m in track["matches"]]
        best = sample.best[2] if sample.best else np.full((THUMB_SIZE, THUMB_SIZE, 3), 255, np.uint8)
        looks = compose_matches(
            best,
            "best crop",
            [self.thumbs[j].copy() for j in nb_idx[:MAX_PICTURE_MATCHES]],
            # captioned from each match's own source: photos of equal bytes share a file, not a name
            [f"d={m['distance']:.3f}\n{match_name(m)}" for m in track["matches"][:MAX_PICTURE_MATCHES]],
            title=f"Track {track['id']}: its look's catalogue matches ({track['first_s']:.1f}-{track['last_s']:.1f} s)",
        )
        parts = [p for p in (strip, looks) if p is not None]
        sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), (255, 255, 255))
        y = 0
        for p in parts:
            sheet.paste(p, (0, y))
            y += p.height
        path = self.out_dir / track["sheet"]
        save_jpeg(sheet, path)
        return path

    def write_results(self, tracks: list[dict]) -> Path:
        """results.jsonl (a line per analysed frame) and tracks.json; returns results.jsonl's path."""
        video = self.cfg.video
        results_path = self.out_dir / "results.jsonl"
        atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in self.results))
        atomic_write_text(
            self.out_dir / "tracks.json",
            json.dumps(
                {
                    "clip": video.clip_name,
                    "source": printable_name(str(self.clip.path.resolve())),  # another clip may share its name
                    "fps": self.clip.fps,
                    "frames": self.reader.frames_read,
                    "stride": video.frame_stride,
                    "tracks": tracks,
                },
                indent=1,
            ),
        )
        return results_path

    def summarize(self, summary: RunSummary, tracks: list[dict]) -> None:
        """The run's notes, counts and per-step times into the summary."""
        stride, read_frames = self.cfg.video.frame_stride, self.reader.frames_read
        if read_frames < stride:
            summary.notes.append(
                f"the video has {read_frames} frame(s), fewer than --frame-stride {stride}: only frame 0 was analysed"
            )
        if self.reader.damaged_packets:
            summary.notes.append(f"{self.reader.damaged_packets} damaged packet(s) in the video were skipped")
        if note := short_read_note(self.clip, read_frames, self.reader.seconds):
            log.warning("%s", note)
            summary.notes.append(note)
        if self.n_unmasked:  # said, not passed over: these crops are boxes of background, not cut-outs
            summary.notes.append(
                f"{self.n_unmasked:,} of the {self.n_persons:,} persons had no mask (no person the segmenter found "
                "overlapped the detector's box by IoU 0.5 or more): they were matched by their whole box, marked "
                "\"masked\": false in results.jsonl")
        if self.n_frames and not self.n_persons:
            note = nobody_found_note(self.cfg.video, self.n_frames)
            log.warning("%s", note)
            summary.notes.append(note)
        summary.counts.update(
            {
                "frames read": read_frames,
                "frames analysed": self.n_frames,
                "persons": self.n_persons,
                "frames without persons": self.n_empty,
                "tracks": len(tracks),
                "tracks seen twice or more": sum(t["frames"] > 1 for t in tracks),
            }
        )
        video_wall = sum(self.times.values())
        for k, v in self.times.items():  # the parts of the clip's wall time
            if k == "segment" and not self.cfg.segmented or k == "video" and self.writer is None:
                continue  # a step this run does not have
            summary.timed(f"clip/{k}", v, LOOP_STEPS[k])
        if self.writer is not None:  # on its own thread, overlapping the rest: not part of the sum
            summary.timed("encode video", self.writer.encode_seconds, "video encoding (background thread, overlapped)")
        if video_wall > 0:
            summary.notes.append(
                f"{self.n_frames / video_wall:.2f} analysed frames per second, {read_frames / video_wall:.1f} video "
                f"frames per second of wall time (gallery excluded; "
                f"{self.reader.seconds / video_wall:.2f}x real time)"
            )


def run_video(cfg: RunConfig, detector: Detector | None = None, segmenter: Segmenter | None = None) -> RunSummary:
    """--video_clip: gallery (cache or built), then for each analysed frame detect, (segment), embed,
    match, track and draw; every frame into the annotated video; tracks and their looks at the end.

    detector, segmenter: stand-ins for the Ultralytics models (benchmarks, tests).
    """
    video = cfg.video
    if video.clip is None:
        raise PipelineError("run_video needs --video_clip")
    summary = RunSummary(mode=f"video {video.clip_name}" + (" (segmented)" if cfg.segmented else ""))
    path = find_video(video.folder, video.clip)
    if "video_dir" in cfg.explicit and not path.resolve().is_relative_to(Path(video.folder).resolve()):
        said = f"--video_clip {video.clip} is a file of its own: --video_dir {video.folder} is not used"
        log.warning(said)
        summary.notes.append(said)
    open_video(path).close()  # fail on an unreadable file before any model is loaded
    if detector is None and "det_model" in cfg.explicit:  # a path mistyped: said before the gallery is embedded
        check_yolo_name(video.det_model)
    check_writable(cfg.video_results_dir)
    embedder, gallery = load_gallery(cfg, summary)
    detector, segmenter = load_detector(cfg, summary, detector, segmenter)
    run = start_run(cfg, summary, path, embedder, gallery)
    staging = run.out_dir
    try:
        with summary.stage("clip", "clip (frame loop)"):
            run.analyse_frames(detector, segmenter)
            run.finish_video()
        tracks = run.finish_tracks(summary)
        run.write_results(tracks)
    except BaseException:  # a stop or a failure midway: the last complete run's results stay, whole
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with stops_held():  # the last results are replaced, and the report names the new ones, whole or not at all
        out_dir = publish(cfg, run)
        results_path = out_dir / "results.jsonl"
        run.summarize(summary, tracks)
        summary.outputs["frame pictures"] = f"{out_dir}/frame_*.jpg ({run.n_frames})"
        summary.outputs["results"] = str(results_path)
        summary.outputs["tracks"] = str(out_dir / "tracks.json")
        if tracks:  # a contact sheet per track; none when nobody was found
            summary.outputs["track sheets"] = f"{out_dir}/track_*.jpg ({len(tracks)})"
        if run.annotated:
            summary.outputs["annotated video"] = str(run.annotated)
        write_video_section(cfg, summary, run, tracks)
    return summary


def load_gallery(cfg: RunConfig, summary: RunSummary) -> tuple[Embedder, Gallery]:
    """The embedder and the gallery (cache or built) it matches against, which must hold embeddings."""
    if cfg.from_cache and not cfg.output_url and not (cfg.store_dir / SIDECAR_FILE).is_file():
        load_gallery_cache(cfg)  # no store there: refused with the command that builds one, before a model loads
    with summary.stage("load model"):  # the same stage as a gallery build's, which then finds it loaded
        # against the cached gallery with no --model, --onnx or --backend: the store's own embedder
        embedder = make_embedder((with_store_embedder(cfg) if cfg.from_cache else cfg).embedder)
    gallery = open_gallery(cfg, summary, embedder=embedder)
    if not gallery.embedded:
        raise PipelineError(f"the gallery in {cfg.store_dir} has no embedded items to match against")
    return embedder, gallery


def match_name(match: dict) -> str:
    """A match's caption (store.shown_name) from its results.jsonl / tracks.json fields."""
    return shown_name(match.get("source", ""), match["file"], person=match.get("person", -1))


def load_detector(
    cfg: RunConfig, summary: RunSummary, detector: Detector | None, segmenter: Segmenter | None
) -> tuple[Detector, Segmenter | None]:
    """The person detector (and the segmenter of a segmented run) unless stand-ins were given.

    Frames are not capped by --max-persons (a frame may hold a crowd, and the detector's boxes cost
    no masks): detection and the frames' masks keep Ultralytics' own limit a frame.
    """
    video = cfg.video
    with summary.stage("load detector", "load detector + segmenter" if cfg.segmented else None):
        detector = detector or UltralyticsDetector(
            video.det_model, video.det_conf, device=cfg.embedder.device, backend=video.det_backend
        )
        if cfg.segmented and segmenter is None:
            segmenter = segmenter_factory(replace(cfg, segment=replace(cfg.segment, max_persons=ULTRALYTICS_MAX_DET)))
    return detector, segmenter


def short_read_note(clip: Clip, frames: int, seconds: float) -> str | None:
    """What a clip that ended well before its container's count says (a file cut short, a copy that
    stopped), so that the frames never analysed are not passed over in silence."""
    if clip.frames_hint <= 0 or clip.frames_hint - frames < 2:
        return None
    if frames >= 0.95 * clip.frames_hint:
        # A few lost inside: damaged frames the decoder skipped, said where the count is exact (AVI's
        # header counts its frames; Matroska's is estimated from its length, an MP4's edit list may
        # leave a frame or two out of a healthy clip)
        if Path(clip.path).suffix.lower() != ".avi":
            return None
        return (f"{clip.frames_hint - frames} of the {clip.frames_hint} frames its container announces were not read "
                "(damaged frames the decoder skipped?): the frame numbers and times after them may be early by as "
                "many frames")
    length = f" ({seconds:.1f} of {clip.frames_hint / clip.fps:.1f} s)" if clip.fps > 0 else ""
    return (f"the clip ended after {frames} of the {clip.frames_hint} frames its container announces{length}: the "
            f"file may be cut short (an interrupted copy or download); the rest was not analysed")


def nobody_found_note(video: VideoSpec, frames: int) -> str:
    """Why no analysed frame may have had a person, and what to try."""
    said = f"no person found in any of the {frames} analysed frame(s)"
    if video.det_model.endswith(".yaml"):
        return (
            f"{said}: --det-model {video.det_model} is a model .yaml, which builds the network with random "
            "weights; pass trained weights (.pt or .onnx), e.g. --det-model yolov8n.pt"
        )
    return (
        f"{said} at --det-conf {video.det_conf:g}: try a lower --det-conf (e.g. {video.det_conf / 2:g}), "
        "and check that the clip shows people"
    )


def video_section_id(cfg: RunConfig) -> str:
    return f"video_{cfg.video.clip_name}"


def start_run(cfg: RunConfig, summary: RunSummary, path: Path, embedder: Embedder, gallery: Gallery) -> VideoRun:
    """The run's outputs made ready (an earlier run's pictures removed, the annotated video opened)
    and the gallery's index loaded."""
    out_dir = cfg.video_results_dir
    clip = Clip.from_file(path, annotated_video=not cfg.video.no_annotated_video)
    thumbs = ThumbnailReader.of(cfg.store_dir)
    with summary.stage("load index"):
        gpu = on_cuda(embedder)
        searcher = open_searcher(cfg, gallery.embeddings, gallery.embedded, gpu=gpu, build_named=True,
                                 renew=not cfg.from_cache)
    summary.notes.append("search: " + searcher.describe())
    allowed = None
    if cfg.filter or cfg.group_by:  # every person's and track's matches among the items the filter keeps
        group_by(cfg, with_metadata(cfg, searcher), summary)
        allowed = searcher.allowed(cfg.filter)
        if allowed is not None and not allowed.any():  # before the clip is decoded: every person would match none
            raise FilterError(f"--filter {cfg.filter!r} keeps none of the {len(allowed):,} gallery items: no person "
                              "in the clip could be matched; loosen it (values are compared as written: 'Dress' is not "
                              "'dress')")
        if allowed is not None:
            summary.notes.append(f"--filter {cfg.filter!r}: matches among {int(allowed.sum()):,} of "
                                 f"{len(allowed):,} items")
    earlier = read_json_dict(out_dir / "tracks.json").get("source")
    if isinstance(earlier, str) and earlier != printable_name(str(path.resolve())):  # kept by the clip's name alone
        said = (f"{out_dir} held the results of another clip named alike, {earlier}: replaced by this clip's "
                "(run that clip again to have them back)")
        log.warning(said)
        summary.notes.append(said)
    # The run writes into a folder of its own, moved into place when it has finished (publish): one
    # stopped midway leaves the last complete run's results and report section as they were
    staging = out_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # a stopped run's pictures
    staging.mkdir(parents=True)
    writer = AnnotatedVideoWriter(staging / "annotated.mp4", clip.fps, clip.small_size) if clip.small_size else None
    run = VideoRun(cfg, embedder, searcher, staging, thumbs, clip, writer)
    run.allowed = allowed
    return run


MAX_FRAME_ROWS = 12  # persons drawn with their matches under a frame picture
MAX_PICTURE_MATCHES = 10  # matches drawn a person (or track); the rest are in results.jsonl and tracks.json


def note_row(text: str, width: int = 640) -> Image.Image:
    """A line of text under a frame picture's rows (what they leave out)."""
    size = caption_size(THUMB_SIZE)
    row = Image.new("RGB", (width, round(size * 2.4)), (255, 255, 255))
    draw_caption(row, (8, round(size * 0.6)), text, width - 16, size, (90, 98, 112))
    return row


STAGING_DIR = ".partial"  # video_results/<clip>/.partial: a run's outputs until it has finished


def publish(cfg: RunConfig, run: VideoRun) -> Path:
    """A finished run's outputs moved from its staging folder into the clip's folder, in place of an
    earlier run's (all of them, and its report section first: a run that writes no annotated video
    must not leave one that contradicts its own results beside them, nor a section naming files that
    are gone). Returns the clip's folder, which the run then names."""
    staging = run.out_dir
    out_dir = staging.parent
    drop_section(cfg.plots_dir, video_section_id(cfg))
    for old in video_outputs(out_dir):
        old.unlink(missing_ok=True)
    for made in video_outputs(staging):
        os.replace(made, out_dir / made.name)
    shutil.rmtree(staging, ignore_errors=True)
    run.out_dir = out_dir
    if run.annotated is not None:
        run.annotated = out_dir / run.annotated.name
    return out_dir


def write_video_section(cfg: RunConfig, summary: RunSummary, run: VideoRun, tracks: list[dict]) -> None:
    """The run's section of the HTML report: its frames, its tracks and the annotated video."""
    out_dir = run.out_dir
    with summary.stage("report"):
        data = {
            "frames": [
                {**r, "picture": relative_link(out_dir / f"frame_{r['frame']:06d}.jpg", cfg.plots_dir)}
                for r in run.results
            ],
            "tracks": [{**t, "sheet": relative_link(out_dir / t["sheet"], cfg.plots_dir)} for t in tracks],
            "video": relative_link(run.annotated, cfg.plots_dir) if run.annotated else None,
            "made_on": made_on(cfg.store_dir, cfg.output_dir, out_dir),  # retired when the store changes
        }
        section = Section(video_section_id(cfg), "video", f"Video {cfg.video.clip_name}", summary, data)
        summary.outputs["report"] = str(write_section(cfg.plots_dir, section))


def analyse(
    run: VideoRun, frame: Frame, detector: Detector, segmenter: Segmenter | None, times: dict[str, float]
) -> list[dict]:
    """One analysed frame: persons, crops, their vectors and matches, their tracks, the frame picture
    and its results line. Person k keeps number k (the #k drawn) even when another has no crop."""
    cfg, embedder = run.cfg, run.embedder
    rgb = frame.rgb_pixels()
    t0 = time.perf_counter()
    persons = detector.detect([rgb])[0]
    t1 = time.perf_counter()
    if segmenter is not None and persons:
        persons = with_masks(persons, segmenter.segment([rgb])[0])
    t2 = time.perf_counter()
    crops = person_crops(rgb, persons)
    if segmenter is not None:
        run.n_unmasked += sum(persons[k].mask is None for k in crops)
    images = {k: Image.fromarray(c) for k, c in crops.items()}
    vectors = embedder.embed(preprocess_batch(list(images.values()), embedder.preprocess_cfg)) if crops else None
    t3 = time.perf_counter()
    nb = run.searcher.neighbours(vectors, cfg.top_k, run.allowed) if vectors is not None else None
    t4 = time.perf_counter()
    by_person = {k: vectors[q] for q, k in enumerate(crops)} if vectors is not None else {}
    track_of = run.tracker.update(frame.index, frame.time_s, persons, by_person)
    t5 = time.perf_counter()
    found, rows = run.record_persons(frame, persons, images, track_of, nb) if nb is not None else ([], [])
    save_jpeg(draw_frame_picture(rgb, persons, rows, track_of=track_of), run.out_dir / f"frame_{frame.index:06d}.jpg",
              quality=88)
    run.results.append({"frame": frame.index, "time_s": round(frame.time_s, 3), "persons": found})
    t6 = time.perf_counter()
    for key, (a, b) in {
        "detect": (t0, t1),
        "segment": (t1, t2),
        "embed": (t2, t3),
        "match": (t3, t4),
        "track": (t4, t5),
        "draw": (t5, t6),
    }.items():
        times[key] += b - a
    return found


def drawings_at(run: VideoRun, frame: int) -> list[Drawing]:
    """What the annotated video shows at `frame`: every track seen in the analysed frames on both
    sides of it, its box interpolated between them, with its current best match (none across the
    frames of an absence); after the last analysed frame, the tracks seen there, moved on by their
    last velocity for up to one stride."""
    out = []
    seen = run.tracker.frames_seen
    for t in run.tracker.tracks:
        box = t.box_at(frame, run.cfg.video.frame_stride)
        if box is None and seen and t.last.frame == seen[-1] < frame <= seen[-1] + run.cfg.video.frame_stride:
            box = t.predicted_box(frame)
        if box is not None:
            caption, tile = run.best_match(t.id)
            out.append(Drawing(box, t.id, caption, tile))
    return out

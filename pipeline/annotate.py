"""The annotated video: the whole clip with each tracked person's box, track id and current best
catalogue match drawn on it, encoded as H.264 in MP4 (libx264 through PyAV; VP9 in WebM where the
FFmpeg at hand has no H.264 encoder), which Chromium plays.

Written streaming: frames arrive in order and go to the encoder on a background thread through a
bounded queue; between two analysed frames the caller buffers only the frames in between (at the
output size), because the boxes there are interpolated from the analysed frames on both sides.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import PipelineError

log = logging.getLogger(__name__)

# The encoders tried, best first, with their container's suffix. A Literal, so PyAV's typing knows
# add_stream returns a video stream.
VideoCodec = Literal["libx264", "h264", "libvpx-vp9"]
_CODECS: tuple[tuple[VideoCodec, str], ...] = (("libx264", ".mp4"), ("h264", ".mp4"), ("libvpx-vp9", ".webm"))

MAX_WIDTH = 1280  # the annotated video is for watching: 720p at most (either way up) keeps encoding cheap
MAX_SHORT_SIDE = 720
TICKS_PER_SECOND = 90_000
COLOURS_BGR = [
    (40, 40, 230),
    (230, 120, 30),
    (40, 180, 60),
    (200, 60, 200),
    (20, 180, 220),
    (150, 90, 40),
    (90, 90, 90),
]


@dataclass
class Drawing:
    """One person on one frame: box in source pixels, the track's id, a caption, an optional tile."""

    box_xyxy: np.ndarray
    track: int
    caption: str
    tile_rgb: np.ndarray | None = None  # uint8 (T, T, 3): the track's best match


def track_colour(track: int) -> tuple[int, int, int]:
    """Track `track`'s colour (BGR), the same in the annotated video and the frame pictures."""
    return COLOURS_BGR[(track - 1) % len(COLOURS_BGR)]


def output_size(width: int, height: int, max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """Even dimensions (yuv420p), the long side at most max_width and the short one at most 720
    (720p, landscape or portrait), the source aspect kept; each side at least 2 pixels (a clip one
    pixel wide, or 8000x4, would otherwise round a side to 0, which no encoder takes)."""
    scale = min(1.0, max_width / max(width, height), MAX_SHORT_SIDE / min(width, height))
    w, h = int(round(width * scale)), int(round(height * scale))
    return max(2, w - w % 2), max(2, h - h % 2)


def pick_codec() -> tuple[VideoCodec, str]:
    """(codec, container suffix): H.264 if this FFmpeg has it, else VP9."""
    import av

    for codec, suffix in _CODECS:
        try:
            av.Codec(codec, "w")
            return codec, suffix
        except Exception:  # av raises UnknownCodecError and others  # noqa: BLE001
            continue
    raise PipelineError(
        "no H.264 or VP9 encoder in this PyAV/FFmpeg: install a PyAV wheel with libx264, or use --no-annotated-video"
    )


class AnnotatedVideoWriter:
    """Encodes BGR frames (already at `size`) to `path` (its suffix chosen by the codec found)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        try:
            import av
        except ImportError as e:
            raise PipelineError("the annotated video needs PyAV: pip install av (or --no-annotated-video)") from e
        codec, suffix = pick_codec()
        self.path, self.size, self.frames = path.with_suffix(suffix), size, 0
        self.tmp = self.path.with_name(f".{self.path.name}.part{suffix}")
        # The MP4's index first (a container option: as an encoder option it is ignored), so that a
        # browser plays it before it has all of it.
        self.container = av.open(str(self.tmp), "w", options={"movflags": "+faststart"} if suffix == ".mp4" else {})
        # The clip's own rate, 30000/1001 kept as such (rounded to 30 a clip drifts 3.6 s an hour),
        # and each frame stamped with its time in the clip, on MPEG's 90 kHz clock: a variable-rate
        # clip keeps its timing
        self.rate = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(30)
        self.stream = self.container.add_stream(codec, rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = size[0], size[1], "yuv420p"
        self.stream.codec_context.time_base = Fraction(1, TICKS_PER_SECOND)
        if codec == "libx264":
            self.stream.options = {"preset": "veryfast", "crf": "26"}
        self._last_pts, self._step = -1, round(TICKS_PER_SECOND / self.rate)  # a frame's ticks at the rate
        self._av = av
        self.encode_seconds = 0.0  # time the background thread spent converting and encoding
        self._q: queue.Queue = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="annotated-video", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._q.get()) is not None:
                frame, pts = item
                t = time.perf_counter()
                vf = self._av.VideoFrame.from_ndarray(frame, format="bgr24")
                vf.pts = pts
                for packet in self.stream.encode(vf):
                    self.container.mux(packet)
                self.encode_seconds += time.perf_counter() - t
        except BaseException as e:  # handed to the caller at the next write or at close
            self._error = e
            # The queue is still emptied, up to close's or abort's None: a caller blocked in put()
            # (the queue full) would otherwise wait forever and never see the error.
            while self._q.get() is not None:
                pass

    def write(self, frame_bgr: np.ndarray, time_s: float | None = None) -> None:
        """One frame, shown at `time_s` into the clip (None: right after the last one)."""
        if self._error is not None:
            raise PipelineError(f"writing {self.path} failed: {self._error}") from self._error
        at = self._last_pts + self._step if time_s is None else round(time_s * TICKS_PER_SECOND)
        pts = max(self._last_pts + 1, at)
        self._last_pts = pts
        self._q.put((frame_bgr, pts))
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        import os

        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            self.container.close()
            self.tmp.unlink(missing_ok=True)
            raise PipelineError(f"writing {self.path} failed: {self._error}") from self._error
        t = time.perf_counter()
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.encode_seconds += time.perf_counter() - t
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._q.put(None)
        self._thread.join(5)
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - already failing
            pass
        self.tmp.unlink(missing_ok=True)


def draw(frame_bgr: np.ndarray, drawings: list[Drawing], scale: float) -> np.ndarray:
    """Boxes, track ids and match tiles on a frame already scaled by `scale` (in place). Text and
    tiles are sized by the frame's height (a sixth of it for the tile, 32 to 96 px) and kept inside
    the frame."""
    import cv2

    h, w = frame_bgr.shape[:2]
    font = max(0.35, min(0.6, h / 1200))
    thick = 2 if h >= 480 else 1
    side = max(32, min(96, h // 6))
    for d in drawings:
        colour = track_colour(d.track)
        x1, y1, x2, y2 = (int(round(float(v) * scale)) for v in d.box_xyxy)
        if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:  # moved out of the frame (predicted past the last analysed one)
            continue
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w - 1, x2), min(h - 1, y2)
        cv2.rectangle(frame_bgr, (x1, y1), (x2, y2), colour, max(3, h // 240))  # survives chroma subsampling
        label = f"#{d.track} {d.caption}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        lx = max(0, min(x1, w - tw - 8))
        top = max(0, y1 - th - base - 6)
        cv2.rectangle(frame_bgr, (lx, top), (lx + tw + 8, top + th + base + 6), colour, -1)
        cv2.putText(
            frame_bgr, label, (lx + 4, top + th + 3), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA
        )
        if d.tile_rgb is not None and side < min(w, h):
            tile = cv2.cvtColor(cv2.resize(d.tile_rgb, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
            # right of the box, or left of it where the frame ends
            tx = x2 + 4 if x2 + 4 + side <= w else min(max(0, x1 - 4 - side), w - side)
            ty = min(max(0, y1), h - side)
            frame_bgr[ty : ty + side, tx : tx + side] = tile
            cv2.rectangle(frame_bgr, (tx, ty), (tx + side - 1, ty + side - 1), colour, thick)
    return frame_bgr

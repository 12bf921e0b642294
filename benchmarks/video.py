"""Video speed on a generated 1080p 30 fps clip (H.264, as users' clips are): the whole clip processed
(read, detect, segment, embed, match, track, draw, and every frame into the annotated video) against
the clip's own length, with the annotated video on and off in the same run.

The detector is Ultralytics yolov8n (its architecture, random weights made to see persons) and really
runs on every analysed frame; its boxes are replaced by three persons walking across the frame, so
the embed, match, track and draw stages do their real work. The gallery is N generated JPEGs embedded
with the int8 ONNX model of the real FashionCLIP architecture.

    python -m benchmarks.video [--seconds 20] [--segmented] [--repeats 1]
    python -m benchmarks.video --tiny                 # 2 s at 320x180, tiny model, 16 items: checks the script
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import Assets, machine_line, make_parser, parse_args, photo_like

FPS, STRIDE = 30, 30
FULL_HD = (1920, 1080)


def walkers(frame: int, size_wh: tuple[int, int] = FULL_HD) -> list[list[float]]:
    """Three persons (400 x 900 boxes at 1080p) walking at 2-4 px a frame, bouncing off the frame's
    sides; everything scaled with the frame."""
    sx, sy = size_wh[0] / FULL_HD[0], size_wh[1] / FULL_HD[1]
    out = []
    for k, (x0, speed, y1) in enumerate(((100, 4, 150), (900, -3, 100), (1400, 2, 170))):
        span = FULL_HD[0] - 400
        x = (x0 + speed * frame) % (2 * span)
        x = x if x <= span else 2 * span - x
        out.append([x * sx, y1 * sy, (x + 400) * sx, (y1 + 900 - 60 * k) * sy])
    return out


def make_clip(path: Path, seconds: int, size_wh: tuple[int, int] = FULL_HD) -> Path:
    """The clip: a photo-like floor with three garment blocks moving as `walkers` says, H.264."""
    import av

    if path.is_file():
        return path
    base = np.asarray(photo_like(7, *size_wh)).copy()
    colours = [(200, 30, 30), (30, 60, 200), (240, 200, 40)]
    stripe = max(2, round(40 * size_wh[1] / FULL_HD[1]))
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = size_wh[0], size_wh[1], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(seconds * FPS):
            frame = base.copy()
            for (x1, y1, x2, y2), c in zip(walkers(i, size_wh), colours):
                frame[int(y1) : int(y2), int(x1) : int(x2)] = c
                frame[int(y1) : int(y2) : stripe, int(x1) : int(x2)] = 255  # stripes
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


class Walkers:
    """Runs the real detector (for its cost) and reports the three walkers (call n = frame n x 30)."""

    def __init__(self, real, size_wh: tuple[int, int], stride: int = STRIDE) -> None:
        self.real, self.size_wh, self.stride, self.calls = real, size_wh, stride, 0

    def detect(self, frames):
        from pipeline.persons import Person

        self.real.detect(frames)
        out = []
        for _ in frames:
            boxes = walkers(self.calls * self.stride, self.size_wh)
            self.calls += 1
            out.append([Person(np.array(b, np.float32), s) for b, s in zip(boxes, (0.9, 0.8, 0.7))])
        return out


def masked_walkers(spec, size_wh: tuple[int, int]):
    """A segmenter that runs the real segmentation model (for its cost) and returns masks for the walkers."""
    from pipeline.persons import Person
    from pipeline.yolo import UltralyticsSegmenter

    class MaskedWalkers(UltralyticsSegmenter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = 0

        def segment(self, images_rgb):
            super().segment(images_rgb)
            out = []
            for im in images_rgb:
                h, w = im.shape[:2]
                mx, my = round(40 * w / FULL_HD[0]), round(50 * h / FULL_HD[1])
                persons = []
                for box in walkers(self.calls * STRIDE, size_wh):
                    x1, y1, x2, y2 = (int(v) for v in box)
                    m = np.zeros((h, w), bool)
                    m[y1 + my : y2 - my, x1 + mx : x2 - mx] = True
                    persons.append(Person(np.array(box, np.float32), 0.9, m))
                self.calls += 1
                out.append(persons)
            return out

    return MaskedWalkers(spec, device="cpu")


def person_detector(work: Path, backend: str):
    """yolov8n's architecture saved as .pt (random weights made to see persons), so that the product's
    own rule applies: on the CPU a .pt runs as its verified ONNX export unless --det-backend torch."""
    from pipeline.yolo import UltralyticsDetector

    det_pt = work / "person-yolov8n.pt"
    if not det_pt.is_file():
        from tests.assets import person_yolo

        person_yolo("yolov8n.yaml", score_gain=0.1, score_bias=2.0).save(det_pt)
    return UltralyticsDetector(str(det_pt), 0.25, device="cpu", backend=backend)


def parse(argv: list[str] | None):
    ap = make_parser(__doc__)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", default="1920x1080", help="the clip's frame size, WxH")
    ap.add_argument("--gallery", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each setting, interleaved")
    ap.add_argument("--segmented", action="store_true", help="also mask persons with a segmentation model")
    ap.add_argument("--seg-model", default="yolov8n-seg.yaml")
    ap.add_argument(
        "--det-backend",
        choices=["auto", "onnx", "torch"],
        default="auto",
        help="detector backend, as --det-backend in main.py (auto: the .pt's ONNX export on the CPU)",
    )
    return parse_args(ap, argv, tiny={"seconds": 2, "size": "320x180", "gallery": 16})


def run_settings(args, cfg, real, size_wh: tuple[int, int]) -> list[tuple]:
    """Each setting (annotated video on, off) run --repeats times, interleaved: (annotated, whole
    call seconds, stages of the clip wall, counts, encoder thread seconds) per run."""
    from pipeline.video import run_video

    out, rows = cfg.output_dir, []
    for r in range(args.repeats):
        for annotated in (True, False):
            run_cfg = replace(
                cfg,
                video=replace(cfg.video, no_annotated_video=not annotated),
                use_embeddings=(out / "embeddings" / "embeddings.json").is_file(),
            )
            shutil.rmtree(out / "video_results", ignore_errors=True)
            segmenter = masked_walkers(cfg.segment, size_wh) if args.segmented else None
            t = time.perf_counter()
            summary = run_video(run_cfg, detector=Walkers(real, size_wh), segmenter=segmenter)
            whole = time.perf_counter() - t
            if r == 0 and annotated:
                print(summary.format())
            # the clip's steps by name: clip/read, clip/detect, ..., clip/video (drawing the annotated video)
            stages = {k.removeprefix("clip/"): v for k, v in summary.stages.items() if k.startswith("clip/")}
            if not stages:
                raise SystemExit(f"no 'clip/<step>' stages in the run's summary: {sorted(summary.stages)}")
            encode = summary.stages.get("encode video", 0.0)
            rows.append((annotated, whole, stages, summary.counts, encode))
    return rows


def print_table(rows: list[tuple], seconds: int) -> None:
    print(
        f"{'annotated video':16s} {'clip wall':>9s} {'x real time':>11s} {'analysed/s':>10s} {'tracks':>6s}  "
        "stage shares of the clip wall"
    )
    for annotated, whole, stages, counts, encode in rows:
        total = sum(stages.values())
        shares = "  ".join(f"{k} {v / total:.0%}" for k, v in stages.items() if v / total >= 0.005)
        print(
            f"{'on' if annotated else 'off':16s} {total:8.1f}s {seconds / total:10.2f}x "
            f"{counts['frames analysed'] / total:10.2f} {counts['tracks']:6d}  {shares}"
        )
        if annotated:
            print(f"{'':16s} encoder thread busy {encode:.1f} s = {encode / total:.0%} of the clip wall (overlapped)")
        print(f"{'':16s} (whole call with gallery load and outputs: {whole:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(machine_line(), flush=True)
    from pipeline.config import RunConfig, VideoSpec
    from pipeline.dataset import DatasetSpec
    from pipeline.embedders import EmbedderSpec
    from pipeline.yolo import SegmentSpec

    assets = Assets.from_args(args)
    size_wh = tuple(int(v) for v in args.size.lower().split("x"))
    (args.work / "videos").mkdir(parents=True, exist_ok=True)
    clip = make_clip(
        args.work / "videos" / f"walkers_{size_wh[0]}x{size_wh[1]}_{args.seconds}s.mp4", args.seconds, size_wh
    )
    cfg = RunConfig(
        dataset=DatasetSpec(str(assets.dataset(args.gallery)), limit=args.gallery),
        embedder=EmbedderSpec(onnx=str(assets.onnx("static")), backend="onnx"),
        segment=SegmentSpec(model=args.seg_model),
        output_dir=args.work / ("video-run-tiny" if args.tiny else "video-run"),
        progress=False,
        video=VideoSpec(clip=clip.stem, folder=clip.parent, det_model="yolov8n.yaml"),
    )
    real = person_detector(args.work, args.det_backend)
    print(
        f"detector: yolov8n, {real.backend}; clip {clip.name}: {args.seconds} s, {size_wh[0]}x{size_wh[1]}, "
        f"{FPS} fps, stride {STRIDE}"
    )
    rows = run_settings(args, cfg, real, size_wh)
    print(
        f"\n== {size_wh[1]}p {args.seconds} s clip, stride {STRIDE}, detector {real.backend}"
        f"{', segmented (' + args.seg_model + ')' if args.segmented else ''}, gallery {args.gallery}"
    )
    print_table(rows, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

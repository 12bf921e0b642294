"""Video speed on a generated 1080p 30 fps clip (H.264, as users' clips are): the whole clip processed
(read, detect, segment, embed, match, track, draw, and every frame into the annotated video) against
the clip's own length, with the annotated video on and off in the same run.

The detector is Ultralytics yolov8n (its architecture, random weights made to see persons) and really
runs on every analysed frame; its boxes are replaced by three persons walking across the frame, so
the embed, match, track and draw stages do their real work. The gallery is N generated JPEGs embedded
with the int8 ONNX model of the real FashionCLIP architecture.

    python -m benchmarks.video [--seconds 20] [--segmented] [--repeats 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, make_jpeg_dataset, photo_like, real_arch_onnx

W, H, FPS = 1920, 1080, 30


def walkers(frame: int) -> list[list[float]]:
    """Three persons (400 x 900 boxes) walking at 2-4 px a frame, bouncing off the frame's sides."""
    out = []
    for k, (x0, speed, y1) in enumerate(((100, 4, 150), (900, -3, 100), (1400, 2, 170))):
        span = W - 400
        x = (x0 + speed * frame) % (2 * span)
        x = x if x <= span else 2 * span - x
        out.append([x, y1, x + 400, y1 + 900 - 60 * k])
    return out


def make_clip(path: Path, seconds: int) -> Path:
    """The clip: a photo-like floor with three garment blocks moving as `walkers` says, H.264."""
    import av

    if path.is_file():
        return path
    base = np.asarray(photo_like(7, W, H)).copy()
    colours = [(200, 30, 30), (30, 60, 200), (240, 200, 40)]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(seconds * FPS):
            frame = base.copy()
            for (x1, y1, x2, y2), c in zip(walkers(i), colours):
                frame[int(y1) : int(y2), int(x1) : int(x2)] = c
                frame[int(y1) : int(y2) : 40, int(x1) : int(x2)] = 255  # stripes
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


class Walkers:
    """Runs the real detector (for its cost) and reports the three walkers (call n = frame n x 30)."""

    def __init__(self, real, stride: int = 30) -> None:
        self.real, self.stride, self.calls = real, stride, 0

    def detect(self, frames):
        from pipeline.persons import Person

        self.real.detect(frames)
        out = []
        for _ in frames:
            boxes = walkers(self.calls * self.stride)
            self.calls += 1
            out.append([Person(np.array(b, np.float32), s) for b, s in zip(boxes, (0.9, 0.8, 0.7))])
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--seconds", type=int, default=20)
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
    args = ap.parse_args()
    print(machine_line(), flush=True)
    from dataclasses import replace

    from pipeline.config import RunConfig, VideoSpec
    from pipeline.dataset import DatasetSpec
    from pipeline.embedders import EmbedderSpec
    from pipeline.persons import Person
    from pipeline.video import run_video
    from pipeline.yolo import SegmentSpec, UltralyticsDetector

    (args.work / "videos").mkdir(parents=True, exist_ok=True)
    clip = make_clip(args.work / "videos" / f"walkers_1080p_{args.seconds}s.mp4", args.seconds)
    onnx = real_arch_onnx(args.work, "static")
    ds = make_jpeg_dataset(args.work, 1000)
    out = args.work / "video-run"
    cfg = RunConfig(
        dataset=DatasetSpec(str(ds), limit=args.gallery),
        embedder=EmbedderSpec(onnx=str(onnx), backend="onnx"),
        segment=SegmentSpec(model=args.seg_model),
        output_dir=out,
        progress=False,
        video=VideoSpec(clip=clip.stem, folder=clip.parent, det_model="yolov8n.yaml"),
    )
    if args.segmented:
        from pipeline.yolo import UltralyticsSegmenter

        class MaskedWalkers(UltralyticsSegmenter):
            """Runs the real segmentation model (for its cost) and returns masks for the walkers."""

            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.calls = 0

            def segment(self, images_rgb):
                super().segment(images_rgb)
                out = []
                for im in images_rgb:
                    h, w = im.shape[:2]
                    persons = []
                    for box in walkers(self.calls * 30):
                        x1, y1, x2, y2 = (int(v) for v in box)
                        m = np.zeros((h, w), bool)
                        m[y1 + 50 : y2 - 50, x1 + 40 : x2 - 40] = True
                        persons.append(Person(np.array(box, np.float32), 0.9, m))
                    self.calls += 1
                    out.append(persons)
                return out

    # yolov8n's architecture saved as .pt (random weights made to see persons), so that the product's
    # own rule applies: on the CPU a .pt runs as its verified ONNX export unless --det-backend torch.
    det_pt = args.work / "person-yolov8n.pt"
    if not det_pt.is_file():
        from tests.assets import person_yolo

        person_yolo("yolov8n.yaml", score_gain=0.1, score_bias=2.0).save(det_pt)
    real = UltralyticsDetector(str(det_pt), 0.25, device="cpu", backend=args.det_backend)
    print(f"detector: yolov8n, {real.backend}; clip {clip.name}: {args.seconds} s, {W}x{H}, {FPS} fps, stride 30")
    rows = []
    for r in range(args.repeats):
        for annotated in (True, False):
            run_cfg = replace(
                cfg,
                video=replace(cfg.video, no_annotated_video=not annotated),
                use_embeddings=(out / "embeddings" / "embeddings.json").is_file(),
            )
            shutil.rmtree(out / "video_results", ignore_errors=True)
            segmenter_now = MaskedWalkers(cfg.segment, device="cpu") if args.segmented else None
            t = time.perf_counter()
            summary = run_video(run_cfg, detector=Walkers(real), segmenter=segmenter_now)
            whole = time.perf_counter() - t
            if r == 0 and annotated:
                print(summary.format())
            stages = {
                k.replace("video ", ""): v
                for k, v in summary.stages.items()
                if k.startswith("video ") and "background" not in k
            }
            encode = summary.stages.get("video encoding (background thread)", 0.0)
            rows.append((annotated, whole, stages, summary.counts, encode))
    print(
        f"\n== 1080p {args.seconds} s clip, stride 30, detector {real.backend}"
        f"{', segmented (' + args.seg_model + ')' if args.segmented else ''}, gallery {args.gallery}"
    )
    print(
        f"{'annotated video':16s} {'clip wall':>9s} {'x real time':>11s} {'analysed/s':>10s} {'tracks':>6s}  "
        "stage shares of the clip wall"
    )
    for annotated, whole, stages, counts, encode in rows:
        total = sum(stages.values())
        shares = "  ".join(f"{k} {v / total:.0%}" for k, v in stages.items() if v / total >= 0.005)
        print(
            f"{'on' if annotated else 'off':16s} {total:8.1f}s {args.seconds / total:10.2f}x "
            f"{counts['frames processed'] / total:10.2f} {counts['tracks']:6d}  {shares}"
        )
        if annotated:
            print(f"{'':16s} encoder thread busy {encode:.1f} s = {encode / total:.0%} of the clip wall (overlapped)")
        print(f"{'':16s} (whole call with gallery load and outputs: {whole:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

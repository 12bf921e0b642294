"""Video matching speed on a generated 1080p 30 fps clip: processed frames per second of wall time
(everything included: read, detect, segment, embed, match, draw) and each stage's share.

The detector is Ultralytics yolov8n built from its yaml (random weights) and really runs on every
processed frame; since random weights find nobody, its output is replaced by three fixed person
boxes so the embed, match and draw stages do their real work. The gallery is N generated JPEGs
embedded with the int8 ONNX model of the real FashionCLIP architecture.

    python -m benchmarks.video [--seconds 20] [--segmented]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, make_jpeg_dataset, photo_like, real_arch_onnx


def make_clip(path: Path, seconds: int, fps: int = 30) -> Path:
    import cv2

    if path.is_file():
        return path
    w, h = 1920, 1080
    base = np.asarray(photo_like(7, w, h))[..., ::-1].copy()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(seconds * fps):
        writer.write(np.roll(base, 8 * i, axis=1))
    writer.release()
    return path


class FixedBoxes:
    """Runs the real detector (for its cost) and reports three fixed persons."""

    def __init__(self, real) -> None:
        self.real = real

    def detect(self, frames):
        from pipeline.persons import Person

        self.real.detect(frames)
        boxes = [[200, 150, 600, 1050], [800, 100, 1150, 1000], [1400, 200, 1750, 1070]]
        return [[Person(np.array(b, np.float32), s) for b, s in zip(boxes, (0.9, 0.8, 0.7))] for _ in frames]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--gallery", type=int, default=1000)
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
    from pipeline.config import RunConfig, VideoSpec
    from pipeline.dataset import DatasetSpec
    from pipeline.embedders import EmbedderSpec
    from pipeline.persons import Person
    from pipeline.video import run_video
    from pipeline.yolo import SegmentSpec, UltralyticsDetector

    (args.work / "videos").mkdir(parents=True, exist_ok=True)
    clip = make_clip(args.work / "videos" / f"bench_1080p_{args.seconds}s.mp4", args.seconds)
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
        use_embeddings=(out / "embeddings" / "embeddings.json").is_file(),
    )
    shutil.rmtree(out / "video_results", ignore_errors=True)
    segmenter = None
    if args.segmented:
        from pipeline.yolo import UltralyticsSegmenter

        class MaskedFixed(UltralyticsSegmenter):
            """Runs the real segmentation model (for its cost) and returns masks for the fixed boxes."""

            def segment(self, images_rgb):
                super().segment(images_rgb)
                out = []
                for im in images_rgb:
                    h, w = im.shape[:2]
                    persons = []
                    for x1, y1, x2, y2 in [[200, 150, 600, 1050], [800, 100, 1150, 1000], [1400, 200, 1750, 1070]]:
                        m = np.zeros((h, w), bool)
                        m[y1 + 50 : y2 - 50, x1 + 40 : x2 - 40] = True
                        persons.append(Person(np.array([x1, y1, x2, y2], np.float32), 0.9, m))
                    out.append(persons)
                return out

        segmenter = MaskedFixed(cfg.segment, device="cpu")
    # yolov8n's architecture saved as .pt (random weights made to see persons), so that the product's
    # own rule applies: on the CPU a .pt runs as its verified ONNX export unless --det-backend torch.
    det_pt = args.work / "person-yolov8n.pt"
    if not det_pt.is_file():
        from tests.assets import person_yolo

        person_yolo("yolov8n.yaml", score_gain=0.1, score_bias=2.0).save(det_pt)
    real = UltralyticsDetector(str(det_pt), 0.25, device="cpu", backend=args.det_backend)
    print(f"detector: yolov8n, {real.backend}")
    detector = FixedBoxes(real)
    t = time.perf_counter()
    summary = run_video(cfg, detector=detector, segmenter=segmenter)
    print(summary.format())
    stages = {k.replace("video ", ""): v for k, v in summary.stages.items() if k.startswith("video ")}
    total = sum(stages.values())
    frames = summary.counts["frames processed"]
    print(
        f"\n== 1080p {args.seconds} s clip, stride 30, detector "
        f"{real.backend}{', segmented (' + args.seg_model + ')' if args.segmented else ''}: "
        f"{frames} frames processed in {total:.1f} s = {frames / total:.2f} processed frames/s "
        f"({frames * 30 / total:.1f} video frames/s, {'faster' if frames / total >= 1 else 'slower'} than real time)"
    )
    for k, v in stages.items():
        print(f"  {k:8s} {v:6.1f} s  {v / total:6.1%}")
    print(f"(whole call including gallery load: {time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

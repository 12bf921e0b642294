"""Segmentation speed on generated 768x1024 images: yolov8n-seg and yolov8l-seg built from their yaml
(random weights; speed does not depend on them), Ultralytics predict alone, the share of the stage
spent outside predict (decode, crops, PNG encode, write), and the same model exported by
Ultralytics to ONNX and run by onnxruntime, with mask agreement (IoU) against the torch model.

Random weights detect nothing, so the class-0 bias of the head is raised to make "persons" appear
(max_det caps them at 4 per image); both the torch and the ONNX model carry the same weights.

    python benchmarks/segment.py [--images 8] [--models n l]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import photo_like


def biased_model(yaml: str, work: Path):
    """An Ultralytics YOLO from its yaml whose head calls everything class 0 (person) with high score."""
    import torch

    from pipeline.segment import load_yolo

    model = load_yolo(yaml, task="segment")
    head = model.model.model[-1]
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].bias[0] = 6.0
    model.overrides["max_det"] = 4
    return model


def mask_iou(a: list, b: list) -> float:
    """Mean IoU of masks matched by box IoU (greedy); 0 when one side has none."""
    from pipeline.video import box_iou

    if not a or not b:
        return float("nan") if not a and not b else 0.0
    ious = box_iou(np.stack([p.box_xyxy for p in a]), np.stack([p.box_xyxy for p in b]))
    vals = []
    for i in range(len(a)):
        j = int(ious[i].argmax())
        m1, m2 = a[i].mask, b[j].mask
        union = np.logical_or(m1, m2).sum()
        vals.append(np.logical_and(m1, m2).sum() / union if union else 1.0)
    return float(np.mean(vals))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["n", "l"])
    args = ap.parse_args()
    from pipeline.config import SegmentSpec
    from pipeline.dataset import Record
    from pipeline.segment import UltralyticsSegmenter, make_segment_items

    work = args.work / "segment"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # Ultralytics writes the ONNX export of a yaml-built model to the current folder
    records = []
    for i in range(args.images):
        buf = io.BytesIO()
        photo_like(i).save(buf, format="JPEG", quality=90)
        records.append(Record(i, f"gen[{i}]", buf.getvalue()))
    lines = ["| model | predict ms/img | stage ms/img | outside predict | ONNX predict ms/img | ONNX mask IoU |", "|---|---|---|---|---|---|"]
    for size in args.models:
        yaml = f"yolov8{size}-seg.yaml"
        seg = UltralyticsSegmenter(SegmentSpec(model=yaml), device="cpu")
        seg.model = biased_model(yaml, work)
        make_items = make_segment_items(seg, SegmentSpec(model=yaml))
        make_items(records[:2])  # warm-up
        seg.predict_seconds = 0.0
        t = time.perf_counter()
        persons = 0
        for k in range(0, len(records), 8):
            items = make_items(records[k : k + 8])
            for its in items:
                for it in its:
                    if it.data is not None:
                        (work / it.row.file).write_bytes(it.data)
                        persons += 1
        stage = time.perf_counter() - t
        predict = seg.predict_seconds
        # ONNX export by Ultralytics, run through the same segmenter class.
        onnx_path = Path(seg.model.export(format="onnx", imgsz=640, simplify=False, dynamic=False, verbose=False))
        arrays = [np.asarray(__import__("PIL.Image").Image.open(io.BytesIO(r.data)).convert("RGB")) for r in records]
        ref = seg.segment(arrays)
        oseg = UltralyticsSegmenter(SegmentSpec(model=str(onnx_path)), device="cpu", batch=1)
        oseg.model.overrides["max_det"] = 4
        oseg.segment(arrays[:1])
        oseg.predict_seconds = 0.0
        got = oseg.segment(arrays)
        onnx_ms = oseg.predict_seconds / len(arrays) * 1000
        iou = np.nanmean([mask_iou(a, b) for a, b in zip(ref, got)])
        lines.append(
            f"| yolov8{size}-seg | {predict / len(records) * 1000:.0f} | {stage / len(records) * 1000:.0f} | "
            f"{(stage - predict) / stage:.1%} | {onnx_ms:.0f} | {iou:.4f} |"
        )
        print(lines[-1], f"({persons} crops)", flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
